"""The developer tooling works: compose file, generated code, buf, CI entry point, scripts, make.

Tools are taken from the directory of the running interpreter (the project venv), so these tests
work from any venv location. Nothing here starts or stops a server.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.environment import clean_environ

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
OVERRIDE_FILE = ROOT / "compose" / "host-network.override.yml"
SERVICES = ("gateway", "auth", "ingest", "processor", "storage")
SCRIPTS = sorted([*ROOT.glob("scripts/*.sh"), ROOT / ".ci" / "run"])


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        env={**clean_environ(), **(env or {})},
    )


def tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} not found next to {sys.executable}; install the dev extras")
    return path


def load_compose() -> dict[str, Any]:
    yaml = pytest.importorskip("ruamel.yaml")
    with COMPOSE_FILE.open() as handle:
        data: dict[str, Any] = yaml.YAML(typ="safe").load(handle)
    return data


# --- compose -----------------------------------------------------------------------------------


def test_compose_file_follows_the_compose_spec() -> None:
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_each_service_from_the_one_image() -> None:
    services = load_compose()["services"]
    images = {services[name]["image"] for name in (*SERVICES, "pki")}
    assert len(images) == 1
    for name in SERVICES:
        assert services[name]["command"] == ["python", "-m", f"services.{name}"]
        assert services[name]["healthcheck"]["test"][-1] == name


def test_compose_publishes_only_the_gateway() -> None:
    services = load_compose()["services"]
    published = {name for name, spec in services.items() if spec.get("ports")}
    assert published == {"gateway"}
    assert services["gateway"]["ports"] == ["127.0.0.1:50051:50051"]


def test_compose_dependencies_exist_and_wait_for_readiness() -> None:
    services = load_compose()["services"]
    for name, spec in services.items():
        for dependency, rule in spec.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            expected = (
                "service_completed_successfully" if dependency == "pki" else "service_healthy"
            )
            assert rule["condition"] == expected, f"{name} -> {dependency}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency


def test_compose_keeps_passwords_out_of_urls() -> None:
    services = load_compose()["services"]
    for name, spec in services.items():
        for key, value in spec.get("environment", {}).items():
            assert not re.search(r"://[^/@\s]*:[^/@\s]*@", str(value)), f"{name}: {key}"


def _settings_fields(service: str) -> set[str]:
    from streammesh.mesh.settings import ServiceSettings

    try:
        module = importlib.import_module(f"services.{service}.settings")
    except ModuleNotFoundError:
        pytest.skip(f"services.{service}.settings does not exist yet")
    classes = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, ServiceSettings)
        and value.__module__ == module.__name__
    ]
    assert len(classes) == 1, f"expected one settings class in {module.__name__}"
    return set(classes[0].model_fields)


@pytest.mark.parametrize("service", SERVICES)
def test_compose_sets_only_settings_the_service_has(service: str) -> None:
    """STREAMMESH_<SERVICE>_<FIELD> must name a field, or the value is silently ignored."""
    environment = load_compose()["services"][service]["environment"]
    prefix = f"STREAMMESH_{service.upper()}_"
    names = [key for key in environment if key.startswith("STREAMMESH_")]
    assert names
    fields = _settings_fields(service)
    for key in names:
        assert key.startswith(prefix), f"{key} is not {service}'s"
        assert key.removeprefix(prefix).lower() in fields, f"{key}: no such setting"


def test_compose_ingest_and_processor_agree_on_streams() -> None:
    services = load_compose()["services"]
    ingest = services["ingest"]["environment"]
    processor = services["processor"]["environment"]
    for field in ("REDIS_URL", "STREAM_PREFIX", "PARTITIONS"):
        assert ingest[f"STREAMMESH_INGEST_{field}"] == processor[f"STREAMMESH_PROCESSOR_{field}"]


def offline_config(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """The effective configuration of the offline run (both files), from Compose itself.

    `docker compose config` needs no engine; DOCKER_HOST points nowhere to prove it. The
    override uses Compose's `!reset` tag, which only Compose understands, so the schema check
    runs on this merged result.
    """
    result = run(
        tool("docker-compose"),
        *("-f", COMPOSE_FILE, "-f", OVERRIDE_FILE, "config", "--format", "json"),
        env={
            "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock",
            "STREAMMESH_COMPOSE_BASE_IMAGE": "base",
        },
    )
    assert result.returncode == 0, result.stderr
    merged = tmp_path / "effective.json"
    merged.write_text(result.stdout)
    config: dict[str, Any] = json.loads(result.stdout)
    return config, merged


def test_compose_offline_config_follows_the_compose_spec(tmp_path: Path) -> None:
    _, merged = offline_config(tmp_path)
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", merged)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_offline_run_stays_on_loopback(tmp_path: Path) -> None:
    services = offline_config(tmp_path)[0]["services"]
    for name, spec in services.items():
        assert spec["network_mode"] == "host", name
        assert not spec.get("ports"), f"{name} publishes ports on the host network"
    for name in SERVICES:
        environment = services[name]["environment"]
        assert environment[f"STREAMMESH_{name.upper()}_HOST"] == "127.0.0.1", name
        for key, value in environment.items():
            for host in re.findall(r"(?:://(?:[^@/]*@)?|^)([a-z0-9.-]+):\d+", str(value)):
                assert host == "127.0.0.1", f"{name}: {key}={value}"


def test_compose_offline_run_works_on_engines_before_25(tmp_path: Path) -> None:
    """healthcheck.start_interval needs engine 25; Debian's docker.io is 20.10."""
    services = offline_config(tmp_path)[0]["services"]
    base = load_compose()["services"]
    for name, spec in services.items():
        assert "start_interval" not in spec.get("healthcheck", {}), name
        if "healthcheck" in base[name]:
            assert spec["healthcheck"]["test"], name


def base_config(tmp_path: Path) -> dict[str, Any]:
    """The effective configuration of docker-compose.yml alone, from Compose itself."""
    result = run(
        tool("docker-compose"),
        *("-f", COMPOSE_FILE, "config", "--format", "json"),
        env={"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"},
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


@pytest.mark.parametrize("offline", [False, True], ids=["registry", "offline"])
def test_compose_containers_hold_only_their_own_key(tmp_path: Path, offline: bool) -> None:
    """The operator key (CreateUser on auth) and other services' keys stay out of a service.

    Only the one-shot `pki` job mounts the PKI it makes (`pki`, with the operator key) and the
    CA key (`pki-ca`); each service mounts one TLS volume, its own, read-only, and finds its
    certificate there. Checked on the merged configuration, as the containers would get it.
    """
    config = offline_config(tmp_path)[0] if offline else base_config(tmp_path)
    services = config["services"]
    for name, spec in services.items():
        if name == "pki":
            continue
        sources = {mount["source"] for mount in spec.get("volumes", [])}
        assert not sources & {"pki", "pki-ca"}, f"{name} mounts the operator or CA key"
        tls = sorted(source for source in sources if source.startswith("tls-"))
        if name not in SERVICES:
            assert not tls, f"{name} mounts {tls}"
            continue
        assert tls == [f"tls-{name}"], f"{name} mounts {tls}"
        (mount,) = (m for m in spec["volumes"] if m["source"] == f"tls-{name}")
        assert mount["read_only"] is True, name
        assert spec["environment"][f"STREAMMESH_{name.upper()}_TLS_DIR"] == mount["target"]
    job = {mount["source"] for mount in services["pki"]["volumes"]}
    assert {"pki", "pki-ca", *(f"tls-{name}" for name in SERVICES)} <= job


def test_compose_offline_ports_agree_with_the_script(tmp_path: Path) -> None:
    script = (ROOT / "scripts" / "compose-offline.sh").read_text()
    declared = dict(re.findall(r"\[([A-Z]+)\]=(\d+)", script))
    override = OVERRIDE_FILE.read_text()
    used = dict(re.findall(r"STREAMMESH_COMPOSE_([A-Z]+)_PORT:-(\d+)", override))
    assert used == declared
    assert set(declared) == {*(name.upper() for name in SERVICES), "POSTGRES", "REDIS"}
    # Clear of the machine's own PostgreSQL and Redis and of a `streammesh up` stack.
    assert not {int(port) for port in declared.values()} & {5432, 6379, *range(50051, 50056)}


# --- protos ------------------------------------------------------------------------------------


def test_generated_code_is_fresh() -> None:
    result = run(sys.executable, ROOT / "scripts" / "gen_protos.py", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_passes() -> None:
    result = run(tool("buf"), "lint")
    assert result.returncode == 0, result.stdout + result.stderr


# --- CI entry point, scripts, make -------------------------------------------------------------


def test_ci_entry_point_is_executable_and_runs_make_test() -> None:
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    lines = [line.strip() for line in ci.read_text().splitlines()]
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    commands = [line for line in lines if line and not line.startswith("#")]
    assert "make test" in commands


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_script_parses(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} must be executable"
    result = run("bash", "-n", script)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck() -> None:
    result = run("shellcheck", *SCRIPTS)
    assert result.returncode == 0, result.stdout + result.stderr


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


@needs_make
def test_make_help_lists_the_targets() -> None:
    result = run("make", "help")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    wanted = {"venv", "install", "backends", "test", "check", "proto", "demo", "bench", "down"}
    assert wanted <= listed, wanted - listed


@needs_make
def test_make_test_runs_pytest_with_the_given_arguments() -> None:
    result = run("make", "--dry-run", "test", "PYTEST_ARGS=-x -k smoke")
    assert result.returncode == 0, result.stderr
    assert "scripts/ensure-backends.sh" in result.stdout
    assert "-m pytest --durations=25 -x -k smoke" in result.stdout


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_ensure_backends_check_mode_names_what_is_unreachable() -> None:
    port = _closed_port()
    result = run(
        ROOT / "scripts" / "ensure-backends.sh",
        "--check",
        env={"STREAMMESH_PG_HOST": "127.0.0.1", "STREAMMESH_PG_PORT": str(port)},
    )
    assert result.returncode == 1
    assert f"PostgreSQL is not reachable on 127.0.0.1:{port}" in result.stderr


def test_ensure_backends_is_quiet_when_both_answer() -> None:
    """The suite needs both backends anyway; with them up the script says nothing."""
    result = run(ROOT / "scripts" / "ensure-backends.sh", "--check")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
