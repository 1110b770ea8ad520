"""Every start-up failure an operator can cause ends a service with one line saying what is
wrong and a non-zero exit status (78 for a wrong setting, file or credential, 69 for an
unreachable dependency), never a traceback. Each case starts the service as a real process."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError

from streammesh.cli.stack import free_ports
from streammesh.legacy_keys import legacy_key
from streammesh.mesh.postgres import create_engine, migrate
from streammesh.mesh.settings import write_secret_file
from streammesh.mesh.startup import (
    EXIT_CONFIG,
    EXIT_UNAVAILABLE,
    StartupError,
    reaching,
    redact_url,
)
from streammesh.streams import StreamLayout
from tests.conftest import TRUST_DOMAIN
from tests.service_process import run_until_exit

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Case:
    service: str
    env: dict[str, str]
    status: int
    line: str
    """What the one line starts with; `{closed}` and `{tmp}` are filled in."""


def closed_port() -> int:
    """A port nothing listens on (free a moment ago)."""
    return free_ports(HOST)[0]


def base_env(service: str, pki_dir: Path, tmp_path: Path, database_url: str) -> dict[str, str]:
    """A configuration that would start `service` (each case then breaks one thing)."""
    prefix = f"STREAMMESH_{service.upper()}_"
    env = {"PORT": "0", "HOST": HOST, "TLS_DIR": str(pki_dir), "TRUST_DOMAIN": TRUST_DOMAIN}
    if service in ("auth", "storage"):
        env |= {"DATABASE_URL": database_url, "DB_SCHEMA": f"t_{uuid.uuid4().hex[:16]}"}
    if service == "auth":
        key = tmp_path / "auth-secret-key"
        write_secret_file(key)
        env |= {"SECRET_KEY_FILE": str(key), "REDIS_PREFIX": f"smtest:{uuid.uuid4().hex[:12]}:"}
    return {prefix + name: value for name, value in env.items()}


CASES = {
    "auth-postgres-down": Case(
        "auth",
        {"STREAMMESH_AUTH_DATABASE_URL": "postgresql://postgres:pw@127.0.0.1:{closed}/streammesh"},
        EXIT_UNAVAILABLE,
        "cannot reach Postgres at postgresql://postgres:***@127.0.0.1:{closed}/streammesh: ",
    ),
    "auth-redis-down": Case(
        "auth",
        {"STREAMMESH_AUTH_REDIS_URL": "redis://127.0.0.1:{closed}/0"},
        EXIT_UNAVAILABLE,
        "cannot reach Redis at redis://127.0.0.1:{closed}/0: ",
    ),
    "auth-no-secret-key-file": Case(
        "auth",
        {"STREAMMESH_AUTH_SECRET_KEY_FILE": "{tmp}/absent"},
        EXIT_CONFIG,
        "secret key file {tmp}/absent is missing; create it",
    ),
    "auth-tls-missing": Case(
        "auth",
        {"STREAMMESH_AUTH_TLS_DIR": "{tmp}"},
        EXIT_CONFIG,
        "TLS material for 'auth' missing ({tmp}/ca.pem); run `streammesh pki init`",
    ),
    "storage-postgres-down": Case(
        "storage",
        {"STREAMMESH_STORAGE_DATABASE_URL": "postgresql://postgres@127.0.0.1:{closed}/streammesh"},
        EXIT_UNAVAILABLE,
        "cannot reach Postgres at postgresql://postgres@127.0.0.1:{closed}/streammesh: ",
    ),
    "storage-port-taken": Case(
        "storage",
        {"STREAMMESH_STORAGE_PORT": "{taken}"},
        EXIT_CONFIG,
        "cannot listen on 127.0.0.1:{taken}: Address already in use",
    ),
    "ingest-redis-down": Case(
        "ingest",
        {"STREAMMESH_INGEST_REDIS_URL": "redis://127.0.0.1:{closed}/0"},
        EXIT_UNAVAILABLE,
        "cannot reach Redis at redis://127.0.0.1:{closed}/0: ",
    ),
    "gateway-tls-missing": Case(
        "gateway",
        {"STREAMMESH_GATEWAY_TLS_DIR": "{tmp}"},
        EXIT_CONFIG,
        "TLS material for 'gateway' missing ({tmp}/ca.pem); run `streammesh pki init`",
    ),
    "processor-tls-missing": Case(
        "processor",
        {"STREAMMESH_PROCESSOR_TLS_DIR": "{tmp}"},
        EXIT_CONFIG,
        "TLS material for 'processor' missing ({tmp}/ca.pem); run `streammesh pki init`",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_start_up_failure_is_one_line_and_an_exit_status(
    name: str, pki_dir: Path, tmp_path: Path, database_url: str
) -> None:
    case = CASES[name]
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        fill = {"closed": closed_port(), "taken": taken.getsockname()[1], "tmp": tmp_path}
        env = base_env(case.service, pki_dir, tmp_path, database_url)
        env |= {key: value.format(**fill) for key, value in case.env.items()}
        exited = await run_until_exit(case.service, env)
    assert exited.status == case.status, exited.output
    assert "Traceback" not in exited.output
    [line] = exited.critical_lines()
    assert line.startswith(case.line.format(**fill)), line


@pytest.mark.parametrize(
    ("service", "variable", "value", "problem"),
    [
        ("auth", "STREAMMESH_AUTH_LOCKOUT_THRESHOLD", "100", "less than or equal to 50"),
        ("gateway", "STREAMMESH_GATEWAY_PORT", "http", "valid integer"),
    ],
)
async def test_invalid_settings_are_one_line_on_stderr(
    service: str, variable: str, value: str, problem: str
) -> None:
    exited = await run_until_exit(service, {variable: value})
    assert exited.status == EXIT_CONFIG, exited.output
    assert "Traceback" not in exited.output
    [line] = exited.output.splitlines()
    assert line.startswith(f"{service}: invalid settings: {variable}: "), line
    assert problem in line
    assert value not in line.removeprefix(f"{service}: invalid settings: {variable}")


async def test_a_refused_login_to_postgres_is_a_setting_problem(database_url: str) -> None:
    url = make_url(database_url).set(database=f"absent_{uuid.uuid4().hex[:8]}")
    engine = create_engine(url.render_as_string(), schema="s", application_name="t")
    try:
        with (
            pytest.raises(StartupError, match="does not exist") as caught,
            reaching("Postgres", url.render_as_string()),
        ):
            await migrate(engine, schema="s", migrations=[])
    finally:
        await engine.dispose()
    assert caught.value.exit_code == EXIT_CONFIG
    assert str(caught.value).startswith(f"Postgres at {url.render_as_string()} refused us: ")


async def test_other_database_errors_keep_their_type(database_url: str, pg_schema: str) -> None:
    """Only connection failures are the operator's: an SQL error is a bug, with a traceback."""
    engine = create_engine(database_url, schema=pg_schema, application_name="t")
    try:
        with pytest.raises(ProgrammingError), reaching("Postgres", database_url):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT no_such_column FROM no_such_table"))
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://ada:s3cret@db:5432/x", "postgresql://ada:***@db:5432/x"),
        ("redis://:s3cret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize("service", ["ingest", "processor"])
async def test_entries_under_both_stream_names_refuse_the_start(
    service: str,
    pki_dir: Path,
    tmp_path: Path,
    database_url: str,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """An earlier release wrote its stream after this one moved it (streammesh/legacy_keys.py):
    the start refuses with the two keys named, a setting-class problem (78)."""
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=2)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.xadd(legacy_key(layout, "stream", 1), {"cols": b"", "events": 0})
        await client.xadd(layout.stream(1), {"cols": b"", "events": 0})
    finally:
        await client.aclose()
    prefix = f"STREAMMESH_{service.upper()}_"
    env = base_env(service, pki_dir, tmp_path, database_url)
    env |= {f"{prefix}STREAM_PREFIX": layout.prefix, f"{prefix}PARTITIONS": "2"}
    exited = await run_until_exit(service, env)
    assert exited.status == EXIT_CONFIG, exited.output
    assert "Traceback" not in exited.output
    [line] = exited.critical_lines()
    assert line.startswith(
        f"partition 1: both {legacy_key(layout, 'stream', 1)} (1 entries, written by a release"
    ), line
