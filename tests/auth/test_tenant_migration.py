"""Migration 0004 on a schema that already holds users: every one of them moves to tenant
"default" with its roles, and usernames become unique per tenant."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from services.auth.store import MIGRATIONS_PACKAGE, AuthStore
from streammesh.mesh.postgres import create_engine, load_migrations, migrate


async def test_existing_users_move_to_the_default_tenant(database_url: str, pg_schema: str) -> None:
    engine = create_engine(database_url, schema=pg_schema, application_name="migration-test")
    try:
        before = [m for m in load_migrations(MIGRATIONS_PACKAGE) if m.version < 4]
        await migrate(engine, schema=pg_schema, migrations=before)
        users = {"old-admin": ["admin"], "old-analyst": ["analyst"]}
        async with engine.begin() as conn:
            for name, roles in users.items():
                await conn.execute(
                    text(
                        "INSERT INTO users (id, username, password_hash, roles)"
                        " VALUES (:id, :name, 'x', :roles)"
                    ),
                    {"id": uuid.uuid4(), "name": name, "roles": roles},
                )
        assert await AuthStore(engine, schema=pg_schema).migrate() == [4]
        store = AuthStore(engine, schema=pg_schema)
        for name, roles in users.items():
            user = await store.get_user(name)
            assert user is not None
            assert (user.tenant, list(user.roles), user.tenant_disabled) == (
                "default",
                roles,
                False,
            )
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO tenants (id, display_name) VALUES ('acme', 'A')"))
        # The same name in another tenant is another account; twice in one tenant it is not.
        assert await store.create_user(
            user_id=uuid.uuid4(), username="old-admin", password_hash="x", roles=[], tenant="acme"
        )
        assert not await store.create_user(
            user_id=uuid.uuid4(), username="old-admin", password_hash="x", roles=[]
        )
        with pytest.raises(IntegrityError):  # a tenant that does not exist
            await store.create_user(
                user_id=uuid.uuid4(), username="x-user", password_hash="x", roles=[], tenant="nope"
            )
    finally:
        await engine.dispose()
