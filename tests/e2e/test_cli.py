"""The `streammesh` command against a real stack, as people and scripts use it: refusals with
every detail, tables, `--json` with every field, paging, and `| head -1`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pyotp
import pytest

from streammesh.cli.admin import create_user_as_operator
from streammesh.cli.main import EXIT_BROKEN_PIPE
from streammesh.cli.stack import StackConfig
from tests.cli.test_broken_pipe import run_into_closed_pipe
from tests.e2e.cli import run_cli, stack_env

pytestmark = pytest.mark.slow

PASSWORD = "a long admin passphrase"


@pytest.fixture(scope="module")
async def admin_env(
    stack: StackConfig, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, str]]:
    """The CLI's environment with a logged-in admin session in a state folder of its own."""
    state = tmp_path_factory.mktemp("cli-admin")
    (state / "pki").symlink_to(stack.pki_dir)
    env = stack_env(stack) | {"STREAMMESH_STATE_DIR": str(state)}
    name = f"root-{uuid.uuid4().hex[:6]}"
    code, _, err = await run_cli(
        env, "admin", "bootstrap", name, "--password-stdin", stdin=PASSWORD
    )
    assert code == 0, err
    await enrol_and_log_in(env, name)
    env["TEST_ADMIN"] = name
    yield env


def _cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "streammesh.cli.main", *args]


async def enrol_and_log_in(env: dict[str, str], name: str, *tenant: str) -> None:
    """`mfa enroll` through its prompts, then `login`, with the CLI (`tenant`: "--tenant", ID)."""
    # The enrolment's QR code and secret come first; the code is asked for after them.
    enroll = await asyncio.create_subprocess_exec(
        *_cli_argv("mfa", "enroll", name, "--password-stdin", *tenant),
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert enroll.stdin is not None and enroll.stdout is not None
    enroll.stdin.write(f"{PASSWORD}\n".encode())
    shown = b""
    async with asyncio.timeout(30):
        while b"first code" not in shown:
            shown += await enroll.stdout.read(4096)
    totp = pyotp.TOTP(shown.decode().split("secret: ", 1)[1].split()[0])
    out, _ = await asyncio.wait_for(enroll.communicate(f"{totp.now()}\n".encode()), 60)
    assert enroll.returncode == 0, out
    # The confirming code is spent; the next step's code is within the one step of drift.
    code, _, err = await run_cli(
        env,
        "login",
        name,
        "--password-stdin",
        "--code",
        totp.at(time.time() + 30),
        *tenant,
        stdin=PASSWORD,
    )
    assert code == 0, err


async def test_bootstrap_with_a_weak_password_names_the_problem(stack: StackConfig) -> None:
    env = stack_env(stack)
    name = f"weak-{uuid.uuid4().hex[:6]}"
    code, out, err = await run_cli(
        env, "admin", "bootstrap", name, "--password-stdin", stdin="password"
    )
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "INVALID_ARGUMENT: invalid account",
        "  password: is a commonly used password; choose a longer or less common one",
    ]


async def test_throttled_login_says_when_to_retry(stack: StackConfig) -> None:
    env = stack_env(stack)
    name = f"thr-{uuid.uuid4().hex[:6]}"
    await create_user_as_operator(stack, name, "correct horse battery staple", ["analyst"])
    seen = []
    for _ in range(12):  # a few free failures, then the delay answers
        code, _, err = await run_cli(
            env, "login", name, "--password-stdin", "--code", "000000", stdin="wrong password"
        )
        assert code == 1
        seen.append(err)
        if err.startswith("RESOURCE_EXHAUSTED"):
            break
    lines = seen[-1].splitlines()
    assert lines[0] == "RESOURCE_EXHAUSTED: too many failed attempts; retry later", seen
    assert len(lines) == 2 and lines[1].startswith("  retry after ") and lines[1].endswith(" s")
    assert float(lines[1].split()[2]) > 0


async def test_users_as_a_table_and_as_json_with_every_field(admin_env: dict[str, str]) -> None:
    admin = admin_env["TEST_ADMIN"]
    code, out, err = await run_cli(admin_env, "admin", "users", "--prefix", admin)
    assert code == 0, err
    header, _, row = out.splitlines()
    assert header.split()[:4] == ["username", "roles", "disabled", "mfa"]
    assert row.split()[:4] == [admin, "admin", "no", "yes"]
    code, out, err = await run_cli(admin_env, "admin", "users", "--prefix", admin, "--json")
    assert code == 0, err
    (user,) = json.loads(out)["users"]
    assert user["disabled"] is False and user["mfa_enabled"] is True
    assert user["locked_until"] is None and user["roles"] == ["admin"]


async def test_empty_lists(admin_env: dict[str, str]) -> None:
    nobody = f"nobody-{uuid.uuid4().hex[:6]}"
    code, out, _ = await run_cli(admin_env, "admin", "users", "--prefix", nobody)
    assert (code, out) == (0, "users: none\n")
    code, out, _ = await run_cli(admin_env, "admin", "users", "--prefix", nobody, "--json")
    assert json.loads(out) == {"users": [], "next_page_token": ""}
    code, out, _ = await run_cli(admin_env, "admin", "dead-letters", "--json")
    assert json.loads(out) == {"dead_letters": [], "next_page_token": ""}
    code, out, _ = await run_cli(admin_env, "admin", "dead-letters")
    assert (code, out) == (0, "dead letters: none\n")


async def test_users_and_audit_page_with_page_token(
    admin_env: dict[str, str], stack: StackConfig
) -> None:
    prefix = f"page-{uuid.uuid4().hex[:6]}-"
    names = [f"{prefix}{n}" for n in "ab"]
    for name in names:
        await create_user_as_operator(stack, name, "correct horse battery staple", [])
    seen: list[str] = []
    token = ""
    for _ in range(3):
        args = ["admin", "users", "--prefix", prefix, "--limit", "1", "--json"]
        code, out, err = await run_cli(admin_env, *args, "--page-token", token)
        assert code == 0, err
        page = json.loads(out)
        seen += [user["username"] for user in page["users"]]
        token = page["next_page_token"]
        if not token:
            break
    assert seen == names
    code, out, err = await run_cli(admin_env, "admin", "users", "--prefix", prefix, "--limit", "1")
    assert out.splitlines()[-1].split()[0] == names[0]
    assert err.startswith("more: repeat with --page-token ")

    code, out, err = await run_cli(admin_env, "admin", "audit", "--limit", "1", "--json")
    first = json.loads(out)
    assert first["next_page_token"], "the audit log holds more than one event by now"
    code, out, err = await run_cli(
        admin_env,
        "admin",
        "audit",
        "--limit",
        "1",
        "--json",
        "--page-token",
        first["next_page_token"],
    )
    assert code == 0, err
    second = json.loads(out)["events"]
    assert len(second) == 1 and second[0]["event_id"] != first["events"][0]["event_id"]


async def test_keys_table_and_json(admin_env: dict[str, str]) -> None:
    code, out, err = await run_cli(admin_env, "admin", "keys")
    assert code == 0, err
    assert out.splitlines()[0].split() == ["kid", "alg", "active", "created", "retired"]
    code, out, _ = await run_cli(admin_env, "admin", "keys", "--json")
    keys = json.loads(out)["keys"]
    assert [k["active"] for k in keys].count(True) == 1
    assert all(set(k) == {"kid", "alg", "active", "created_at", "retired_at"} for k in keys)


def test_admin_users_into_a_closed_pipe_exits_quietly(admin_env: dict[str, str]) -> None:
    result = run_into_closed_pipe(["admin", "users"], admin_env)
    assert (result.returncode, result.stderr) == (EXIT_BROKEN_PIPE, "")


def test_admin_users_piped_to_head(admin_env: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "head.sh"
    script.write_text('"$@" admin users | head -1\n')
    result = subprocess.run(
        ["sh", str(script), *_cli_argv()],
        capture_output=True,
        text=True,
        timeout=60,
        env=admin_env,
        check=False,
    )
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.split()[:2] == ["username", "roles"]


async def test_tenant_commands_print_tables_json_and_clear_refusals(
    admin_env: dict[str, str],
) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:6]}"
    code, out, err = await run_cli(admin_env, "tenant", "create", tenant, "--name", "Acme Corp")
    assert code == 0, err
    assert f"  tenant id: {tenant}" in out.splitlines()
    code, out, err = await run_cli(admin_env, "tenant", "list", "--limit", "500")
    assert code == 0, err
    header, _, *rows = out.splitlines()
    assert header.split() == ["id", "name", "disabled", "created", "disabled", "at"]
    assert [row.split()[:4] for row in rows if row.startswith(tenant)] == [
        [tenant, "Acme", "Corp", "no"]
    ]
    code, out, err = await run_cli(admin_env, "tenant", "disable", tenant, "--json")
    assert code == 0, err
    shown = json.loads(out)["tenant"]
    assert shown["disabled"] is True and shown["disabled_at"] is not None
    code, out, err = await run_cli(admin_env, "tenant", "enable", tenant)
    assert code == 0 and "  disabled: no" in out.splitlines(), err
    code, out, _ = await run_cli(admin_env, "tenant", "show", tenant, "--json")
    assert set(json.loads(out)["tenant"]) == {
        "tenant_id", "display_name", "disabled", "created_at", "disabled_at"
    }  # fmt: skip
    for args, expected in (
        (("show", "zz-missing"), ["NOT_FOUND: no such tenant"]),
        (
            ("create", "Bad Id"),
            [
                "INVALID_ARGUMENT: invalid tenant",
                "  tenant_id: 2 to 32 characters: a-z, 0-9 and '-', starting with a letter",
            ],
        ),
        (
            ("disable", "default"),
            [
                "FAILED_PRECONDITION: tenant default cannot be disabled: it holds the platform admins"
            ],
        ),
    ):
        code, out, err = await run_cli(admin_env, "tenant", *args)
        assert (code, out, err.splitlines()) == (1, "", expected)


async def test_a_tenant_admin_session_sees_only_its_tenant(
    admin_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:6]}"
    boss = f"boss-{uuid.uuid4().hex[:6]}"
    code, _, err = await run_cli(admin_env, "tenant", "create", tenant)
    assert code == 0, err
    code, out, err = await run_cli(
        admin_env,
        "admin",
        "create-user",
        boss,
        "--tenant",
        tenant,
        "--role",
        "tenant-admin",
        "--password-stdin",
        stdin=PASSWORD,
    )
    assert code == 0 and f"  tenant: {tenant}" in out.splitlines(), err
    state = tmp_path_factory.mktemp("cli-tenant-admin")
    (state / "pki").symlink_to(Path(admin_env["STREAMMESH_STATE_DIR"]) / "pki")
    env = admin_env | {"STREAMMESH_STATE_DIR": str(state)}
    await enrol_and_log_in(env, boss, "--tenant", tenant)
    code, out, _ = await run_cli(env, "whoami")
    assert out == f"{boss} in tenant {tenant} (roles: tenant-admin)\n"
    code, out, err = await run_cli(env, "admin", "users")
    assert code == 0, err
    header, _, row = out.splitlines()
    assert header.split()[-2:] == ["tenant", "id"] and row.split()[0] == boss
    assert row.split()[-2] == tenant
    for args, expected in (
        (("admin", "users", "--tenant", "default"), "NOT_FOUND: no such tenant"),
        (("admin", "disable", admin_env["TEST_ADMIN"]), "NOT_FOUND: no such user"),
        (
            ("tenant", "list"),
            "PERMISSION_DENIED: /streammesh.gateway.v1.AdminService/ListTenants needs the role "
            "admin",
        ),
        (("admin", "roles", boss, "admin"), "PERMISSION_DENIED: only a platform admin may grant "
         "the role admin"),
    ):  # fmt: skip
        code, out, err = await run_cli(env, *args)
        assert (code, out, err.splitlines()) == (1, "", [expected])


async def test_schema_commands(admin_env: dict[str, str], tmp_path: Path) -> None:
    event_type = f"cli.{uuid.uuid4().hex[:6]}"
    v1 = {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}
    breaking = {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "n": {"type": "number"}},
        "required": ["id", "n"],
    }
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    (tmp_path / "breaking.json").write_text(json.dumps(breaking))
    (tmp_path / "typo.json").write_text('{"type": "object",\n "properties": }')

    code, out, err = await run_cli(
        admin_env, "schema", "register", event_type, str(tmp_path / "v1.json")
    )
    assert (code, out.split()[:4]) == (0, ["registered", event_type, "version", "1"]), err
    code, out, _ = await run_cli(
        admin_env, "schema", "register", event_type, str(tmp_path / "v1.json")
    )
    assert out.startswith(f"already registered as {event_type} version 1")

    # check: a table of every violation, exit 1 for a CI job.
    code, out, err = await run_cli(
        admin_env, "schema", "check", event_type, str(tmp_path / "breaking.json")
    )
    assert code == 1, err
    assert "compatible: no" in out and "rule" in out and "/id" in out and "/n" in out
    code, out, _ = await run_cli(
        admin_env, "schema", "check", event_type, str(tmp_path / "breaking.json"), "--json"
    )
    report = json.loads(out)
    assert report["compatible"] is False and len(report["violations"]) >= 2
    assert report["compatibility"] == "COMPATIBILITY_MODE_BACKWARD"

    # register refused: the status with every violation on stderr.
    code, out, err = await run_cli(
        admin_env, "schema", "register", event_type, str(tmp_path / "breaking.json")
    )
    lines = err.splitlines()
    assert code == 1 and out == ""
    assert lines[0].startswith("INVALID_ARGUMENT: the schema is not BACKWARD compatible")
    assert len(lines) >= 3 and all(line.startswith("  schema_json#") for line in lines[1:])

    code, out, err = await run_cli(admin_env, "schema", "list")
    assert code == 0, err
    assert any(line.split()[:3] == [event_type, "BACKWARD", "1"] for line in out.splitlines())
    code, out, _ = await run_cli(admin_env, "schema", "list", event_type, "--json")
    assert [v["version"] for v in json.loads(out)["versions"]] == [1]
    code, out, err = await run_cli(admin_env, "schema", "show", event_type)
    assert code == 0 and json.loads(out) == v1 and "version 1 of 1" in err
    code, out, _ = await run_cli(admin_env, "schema", "mode", event_type, "NONE")
    assert code == 0 and "compatibility: NONE" in out
    code, out, _ = await run_cli(admin_env, "schema", "policy")
    assert (code, out) == (0, "unknown types: ACCEPT\n")

    code, out, err = await run_cli(
        admin_env, "schema", "register", event_type, str(tmp_path / "typo.json")
    )
    assert (code, out) == (2, "")
    assert err.startswith(f"{tmp_path / 'typo.json'} is not JSON: Expecting value at line 2")
    code, _, err = await run_cli(admin_env, "schema", "show", "no.such.type")
    assert code == 1 and err.startswith("NOT_FOUND: no schema is registered for event type")


async def test_rule_and_window_commands(admin_env: dict[str, str], tmp_path: Path) -> None:
    rule_id = f"hot-{uuid.uuid4().hex[:6]}"
    rule = {
        "id": rule_id,
        "kind": "threshold",
        "match": {"type": "reading"},
        "field": "payload.celsius",
        "op": "gt",
        "value": 80,
    }
    (tmp_path / "rule.json").write_text(json.dumps(rule))
    (tmp_path / "rule2.json").write_text(json.dumps({**rule, "value": 90}))
    (tmp_path / "bad.json").write_text(json.dumps({**rule, "id": "bad", "within": "soon"}))
    (tmp_path / "typo.json").write_text('{"id": "x",\n "kind": }')

    code, out, err = await run_cli(admin_env, "rule", "create", str(tmp_path / "rule.json"))
    assert (code, out) == (0, f"created rule {rule_id} version 1\n"), err
    code, out, err = await run_cli(
        admin_env, "rule", "update", rule_id, str(tmp_path / "rule2.json")
    )
    assert (code, out) == (0, f"updated rule {rule_id}: version 2\n"), err
    code, out, _ = await run_cli(admin_env, "rule", "disable", rule_id)
    assert out == f"disabled rule {rule_id}: version 3\n"
    code, out, _ = await run_cli(admin_env, "rule", "disable", rule_id)
    assert out.startswith(f"rule {rule_id} was already disabled (version 3)")
    code, out, err = await run_cli(admin_env, "rule", "list")
    assert code == 0, err
    row = next(line.split() for line in out.splitlines() if line.startswith(rule_id))
    assert row[:4] == [rule_id, "3", "no", "threshold"]
    code, out, err = await run_cli(admin_env, "rule", "show", rule_id, "--version", "1")
    assert code == 0 and json.loads(out)["value"] == 80 and "version 1 of 3" in err
    code, out, _ = await run_cli(admin_env, "rule", "show", rule_id, "--json")
    assert json.loads(out)["rule"]["version"] == 3

    # Refusals: the bad part named by the service; a file typo named before anything is sent.
    code, out, err = await run_cli(admin_env, "rule", "create", str(tmp_path / "bad.json"))
    assert (code, out) == (1, "")
    assert err.startswith("INVALID_ARGUMENT: definition.within:"), err
    assert "  definition.within:" in err
    code, out, err = await run_cli(admin_env, "rule", "create", str(tmp_path / "typo.json"))
    assert (code, out) == (2, "")
    assert err.startswith(f"{tmp_path / 'typo.json'} is not JSON: Expecting value at line 2")
    code, _, err = await run_cli(admin_env, "rule", "show", "no-such-rule")
    assert code == 1 and err.startswith("NOT_FOUND: no rule 'no-such-rule'")

    window_id = f"w-{uuid.uuid4().hex[:6]}"
    window = {
        "id": window_id,
        "event_type": "order.created",
        "kind": "tumbling",
        "size": "1m",
        "aggregates": [{"name": "orders", "fn": "count"}],
    }
    (tmp_path / "window.json").write_text(json.dumps(window))
    code, out, err = await run_cli(admin_env, "window", "create", str(tmp_path / "window.json"))
    assert (code, out) == (0, f"created window {window_id} version 1\n"), err
    code, out, _ = await run_cli(admin_env, "window", "list", "--json")
    assert window_id in [w["id"] for w in json.loads(out)["windows"]]
    code, out, err = await run_cli(admin_env, "window", "results", window_id, "--json")
    assert code == 0 and json.loads(out)["window_results"] == [], err
    code, out, err = await run_cli(admin_env, "alerts", "--rule", rule_id, "--json")
    assert code == 0 and json.loads(out)["alerts"] == [], err
