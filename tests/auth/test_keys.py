"""Signing keys: rotation with an overlap window, retirement, the JWKS, and the scheduled
rotation that one replica performs."""

from __future__ import annotations

import asyncio

import grpc
import jwt
import pytest
from sqlalchemy import text

from services.auth.server import AuthDependencies, run_maintenance
from streammesh.api.auth.v1 import auth_pb2
from streammesh.mesh.tasks import stop_task
from tests.auth.conftest import AuthFactory, audit_rows
from tests.auth.flows import FakeClock, Stub, as_user, enrol, failure, login, register, unique_name

ADMIN = as_user("user:keymaster", "192.0.2.10")
pytestmark = pytest.mark.usefixtures("platform_admins")


async def fresh_tokens(stub: Stub, clock: FakeClock) -> auth_pb2.SessionTokens:
    username = unique_name()
    await register(stub, username)
    secret = (await enrol(stub, username, clock)).secret
    return await login(stub, username, secret, clock)


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


async def jwks(stub: Stub) -> dict[str, auth_pb2.JsonWebKey]:
    reply = await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10)
    return {key.kid: key for key in reply.keys}


def verifies(token: str, keys: dict[str, auth_pb2.JsonWebKey]) -> bool:
    """Whether the token verifies with the published keys alone (as the gateway checks it)."""
    published = keys.get(kid_of(token))
    if published is None:
        return False
    key = jwt.PyJWK({"kty": published.kty, "crv": published.crv, "x": published.x})
    jwt.decode(token, key, algorithms=["EdDSA"], audience="streammesh", issuer="streammesh-auth")
    return True


async def rotate(stub: Stub) -> auth_pb2.RotateSigningKeyResponse:
    reply: auth_pb2.RotateSigningKeyResponse = await stub.RotateSigningKey(
        auth_pb2.RotateSigningKeyRequest(), metadata=ADMIN, timeout=10
    )
    return reply


async def test_rotation_keeps_tokens_of_the_old_key_verifying(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    before = await fresh_tokens(stub, clock)
    old_kid = kid_of(before.access_token)
    rotated = await rotate(stub)
    assert rotated.active.active and rotated.active.kid != old_kid
    assert list(rotated.retired) == []

    published = await jwks(stub)
    assert set(published) == {old_kid, rotated.active.kid}
    assert verifies(before.access_token, published)
    after = await fresh_tokens(stub, clock)
    assert kid_of(after.access_token) == rotated.active.kid
    assert verifies(after.access_token, published)

    listed = await stub.ListSigningKeys(
        auth_pb2.ListSigningKeysRequest(), metadata=ADMIN, timeout=10
    )
    assert [(k.kid, k.active, k.HasField("retired_at")) for k in listed.keys] == [
        (rotated.active.kid, True, False),
        (old_kid, False, False),
    ]
    [looked] = await audit_rows(deps, action="list_signing_keys")
    assert (looked["actor"], looked["details"]) == ("user:keymaster", {"count": "2"})
    [row] = await audit_rows(deps, action="key_rotation")
    assert (row["actor"], row["source"], row["details"]) == (
        "user:keymaster",
        "192.0.2.10",
        {"kid": rotated.active.kid},
    )


async def test_retired_keys_leave_the_jwks(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    before = await fresh_tokens(stub, clock)
    old_kid = kid_of(before.access_token)
    new_kid = (await rotate(stub)).active.kid

    error = await failure(
        stub.RetireSigningKey(
            auth_pb2.RetireSigningKeyRequest(kid=new_kid), metadata=ADMIN, timeout=10
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    error = await failure(
        stub.RetireSigningKey(
            auth_pb2.RetireSigningKeyRequest(kid="no-such-kid"), metadata=ADMIN, timeout=10
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND

    reply = await stub.RetireSigningKey(
        auth_pb2.RetireSigningKeyRequest(kid=old_kid), metadata=ADMIN, timeout=10
    )
    assert reply.key.kid == old_kid and reply.key.HasField("retired_at")
    published = await jwks(stub)
    assert set(published) == {new_kid}
    assert not verifies(before.access_token, published)
    # Retiring again changes nothing.
    again = await stub.RetireSigningKey(
        auth_pb2.RetireSigningKeyRequest(kid=old_kid), metadata=ADMIN, timeout=10
    )
    assert again.key.retired_at == reply.key.retired_at
    retired = await audit_rows(deps, action="key_retired")
    assert [(r["outcome"], r["reason"]) for r in retired] == [
        ("failure", "active_key"),
        ("failure", "unknown_key"),
        ("success", ""),
        ("success", ""),
    ]
    assert retired[2]["actor"] == "user:keymaster"


async def test_rotation_retires_keys_past_their_overlap_window(
    auth_factory: AuthFactory,
) -> None:
    auth = await auth_factory(key_overlap_seconds=600)
    stub = auth.stub()
    first = (await jwks(stub)).keys()
    second = await rotate(stub)
    third = await rotate(stub)
    assert list(second.retired) == list(third.retired) == []
    assert len(await jwks(stub)) == 3
    # The first two keys were replaced more than the overlap window ago.
    async with auth.deps.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE signing_keys SET deactivated_at = now() - interval '601 s' WHERE NOT active"
            )
        )
    fourth = await rotate(stub)
    assert sorted(k.kid for k in fourth.retired) == sorted([*first, second.active.kid])
    assert set(await jwks(stub)) == {third.active.kid, fourth.active.kid}


async def test_overlap_defaults_to_twice_the_access_token_lifetime(
    auth_factory: AuthFactory,
) -> None:
    auth = await auth_factory(access_token_ttl_seconds=60)
    assert auth.settings.key_overlap == 120
    stub = auth.stub()
    await rotate(stub)
    async with auth.deps.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE signing_keys SET deactivated_at = now() - interval '119 s' WHERE NOT active"
            )
        )
    assert list((await rotate(stub)).retired) == []
    async with auth.deps.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE signing_keys SET deactivated_at = now() - interval '121 s' WHERE NOT active"
            )
        )
    assert len((await rotate(stub)).retired) == 2


async def test_a_rotation_on_one_replica_applies_on_all(
    auth_factory: AuthFactory, clock: FakeClock
) -> None:
    first, second = await auth_factory(), await auth_factory()
    new_kid = (await rotate(second.stub())).active.kid
    tokens = await fresh_tokens(first.stub(), clock)
    assert kid_of(tokens.access_token) == new_kid


async def age_active_key(deps: AuthDependencies, days: int) -> None:
    async with deps.engine.begin() as conn:
        await conn.execute(
            text("UPDATE signing_keys SET created_at = now() - make_interval(days => :d)"),
            {"d": days},
        )


async def test_scheduled_rotation_happens_once_across_replicas(
    auth_factory: AuthFactory,
) -> None:
    replicas = [await auth_factory(key_rotation_days=30) for _ in range(3)]
    deps = replicas[0].deps
    assert (await deps.admin.maintain_keys(30)).active is None  # a fresh key is not due
    await age_active_key(deps, 31)
    results = await asyncio.gather(*(r.deps.admin.maintain_keys(30) for r in replicas))
    assert sum(result.active is not None for result in results) == 1
    async with deps.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT active FROM signing_keys"))).all()
    assert sorted(active for (active,) in rows) == [False, True]
    [row] = await audit_rows(deps, action="key_rotation")
    assert row["actor"] == "service:auth"


async def test_scheduled_rotation_can_be_turned_off(auth_factory: AuthFactory) -> None:
    auth = await auth_factory(key_rotation_days=0)
    await age_active_key(auth.deps, 3650)
    assert (await auth.deps.admin.maintain_keys(0)).active is None
    assert len(await jwks(auth.stub())) == 1


@pytest.mark.timeout(30)
async def test_the_background_task_rotates_when_due(auth_factory: AuthFactory) -> None:
    auth = await auth_factory(key_rotation_days=1, maintenance_interval_seconds=0.05)
    old = set(await jwks(auth.stub()))
    await age_active_key(auth.deps, 2)
    task = asyncio.create_task(run_maintenance(auth.settings, auth.deps))
    try:
        for _ in range(200):
            current = await auth.deps.keys.current()
            if current.kid not in old:
                break
            await asyncio.sleep(0.05)
        assert current.kid not in old
    finally:
        assert await stop_task(task), "the maintenance loop did not stop"
