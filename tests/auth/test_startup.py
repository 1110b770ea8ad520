"""Start-up of auth replicas: the secret key file, migrations and the signing-key bootstrap."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg
import pytest
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.engine import make_url

from services.auth.crypto import SecretBox
from services.auth.server import build_dependencies, serve
from services.auth.settings import AuthSettings
from streammesh.mesh.settings import write_secret_file
from streammesh.mesh.startup import EXIT_CONFIG, StartupError
from tests.service_process import run_until_exit


def process_env(settings: AuthSettings) -> dict[str, str]:
    """The environment that makes `python -m services.auth` use `settings`."""
    fields = (
        "port",
        "tls_dir",
        "trust_domain",
        "database_url",
        "db_schema",
        "secret_key_file",
        "redis_url",
        "redis_prefix",
    )
    return {f"STREAMMESH_AUTH_{name.upper()}": str(getattr(settings, name)) for name in fields}


async def _schema_exists(database_url: str, schema: str) -> bool:
    url = make_url(database_url)
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database
    )
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema))
    finally:
        await conn.close()


async def test_concurrent_replicas_share_one_active_key(auth_settings: AuthSettings) -> None:
    replicas = await asyncio.gather(*(build_dependencies(auth_settings) for _ in range(4)))
    try:
        kids = {(await replica.keys.current()).kid for replica in replicas}
        assert len(kids) == 1
        async with replicas[0].engine.connect() as conn:
            rows = (await conn.execute(text("SELECT kid, active FROM signing_keys"))).all()
        assert [(kid, active) for kid, active in rows] == [(kids.pop(), True)]
    finally:
        for replica in replicas:
            await replica.close()


async def test_restart_keeps_the_key(auth_settings: AuthSettings) -> None:
    first = await build_dependencies(auth_settings)
    first_kid = (await first.keys.current()).kid
    await first.close()
    second = await build_dependencies(auth_settings)
    second_kid = (await second.keys.current()).kid
    await second.close()
    assert first_kid == second_kid


async def test_group_readable_secret_key_file_is_refused(
    auth_settings: AuthSettings, database_url: str, pg_schema: str
) -> None:
    os.chmod(auth_settings.secret_key_file, 0o644)
    with pytest.raises(StartupError, match="chmod 600"):
        await serve(auth_settings)
    # Refused before touching the database.
    assert not await _schema_exists(database_url, pg_schema)


async def test_missing_secret_key_file_is_refused(
    auth_settings: AuthSettings, tmp_path: Path
) -> None:
    settings = auth_settings.model_copy(update={"secret_key_file": tmp_path / "absent"})
    with pytest.raises(StartupError, match="secret key file"):
        await build_dependencies(settings)


async def test_another_secret_key_cannot_open_the_stored_keys(
    auth_settings: AuthSettings, tmp_path: Path
) -> None:
    await (await build_dependencies(auth_settings)).close()
    other_key = tmp_path / "other-key"
    write_secret_file(other_key)
    settings = auth_settings.model_copy(update={"secret_key_file": other_key})
    with pytest.raises(StartupError, match="were sealed under secret key"):
        await build_dependencies(settings)


def test_settings_defaults_and_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMMESH_STATE_DIR", "/state")
    monkeypatch.setenv("STREAMMESH_AUTH_ACCESS_TOKEN_TTL_SECONDS", "600")
    monkeypatch.setenv("STREAMMESH_AUTH_DEFAULT_ROLES", '["analyst"]')
    monkeypatch.setenv("STREAMMESH_AUTH_REDIS_PREFIX", "stack1:auth:")
    settings = AuthSettings()
    assert settings.port == 50052
    assert settings.db_schema == "auth"
    assert settings.secret_key_file == Path("/state/secrets/auth-secret-key")
    assert settings.access_token_ttl_seconds == 600
    assert settings.key_overlap == 1200  # 2 x access-token TTL unless set
    assert settings.default_roles == ("analyst",)
    assert (settings.redis_url, settings.redis_prefix) == (
        "redis://127.0.0.1:6379/0",
        "stack1:auth:",
    )
    assert (settings.issuer, settings.audience, settings.totp_issuer) == (
        "streammesh-auth",
        "streammesh",
        "StreamMesh",
    )


def test_security_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STREAMMESH_AUTH_"):
            monkeypatch.delenv(name)
    settings = AuthSettings()
    assert settings.access_token_ttl_seconds == 300
    assert settings.refresh_token_ttl_seconds == 30 * 86400
    assert settings.session_max_seconds == 90 * 86400
    assert settings.login_challenge_ttl_seconds == 300
    assert (settings.lockout_threshold, settings.lockout_seconds) == (10, 900)
    assert settings.key_rotation_days == 30
    assert settings.key_overlap == 600


@pytest.mark.parametrize(
    "override",
    [{"default_roles": ("root",)}, {"lockout_threshold": 100}, {"lockout_threshold": 0}],
)
def test_unsafe_settings_are_refused(override: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AuthSettings(**override)  # type: ignore[arg-type]


async def test_a_process_with_another_secret_key_exits_with_one_line(
    auth_settings: AuthSettings, tmp_path: Path
) -> None:
    """The operator changed the state folder (so the key file) but kept the database."""
    await (await build_dependencies(auth_settings)).close()
    sealed_with = SecretBox.from_file(auth_settings.secret_key_file).key_id
    other_key = tmp_path / "new-state" / "secrets" / "auth-secret-key"
    write_secret_file(other_key)
    settings = auth_settings.model_copy(update={"secret_key_file": other_key})
    exited = await run_until_exit("auth", process_env(settings))
    assert exited.status == EXIT_CONFIG, exited.output
    assert "Traceback" not in exited.output
    [line] = exited.critical_lines()
    schema = auth_settings.db_schema
    assert line.startswith(
        f"the secrets in Postgres schema '{schema}' were sealed under secret key {sealed_with}, "
        f"but {other_key} holds key {SecretBox.from_file(other_key).key_id}: restore the secret "
        "key file that was used with this database (back it up with the database)"
    )
    assert "STREAMMESH_AUTH_SECRET_KEY_FILE" in line and "fresh schema" in line
