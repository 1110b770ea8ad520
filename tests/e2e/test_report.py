"""`streammesh report` on a running stack of its own (with its own Redis, AOF on), as an operator
runs it: its throughput figure matches the load it drove, it writes Markdown and a self-contained
HTML file with plots, turning Redis's AOF off produces the matching finding, and so does an
account whose second factor an admin reset."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streammesh.cli.admin import create_user_as_operator
from streammesh.cli.processes import free_ports
from streammesh.cli.stack import StackConfig
from tests.e2e.cli import run_cli, stack_env
from tests.e2e.conftest import new_stack_config, running_stack
from tests.e2e.test_cli import PASSWORD, enrol_and_log_in

pytestmark = pytest.mark.slow

REDIS = shutil.which("redis-server")
AOF_FINDING = "Redis keeps the queue in memory only"
MFA_FINDING = "without a second factor"


@pytest.fixture(scope="module")
async def aof_redis(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A redis-server of this module's own, AOF on, on a free loopback port."""
    if REDIS is None:
        pytest.skip("redis-server is not installed")
    folder = tmp_path_factory.mktemp("report-redis")
    (port,) = free_ports("127.0.0.1", 1)
    process = subprocess.Popen(  # noqa: ASYNC220 (started once for the module)
        [
            REDIS,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = aioredis.Redis.from_url(url)
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    await client.ping()
                    break
                except (OSError, RedisError):
                    await asyncio.sleep(0.1)
        yield url
    finally:
        await client.aclose()
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
async def report_env(
    aof_redis: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[StackConfig, dict[str, str]]]:
    config = new_stack_config(tmp_path_factory.mktemp("report-stack")).model_copy(
        update={"redis_url": aof_redis}
    )
    async with running_stack(config) as stack:
        env = stack_env(stack)
        name = f"ops-{uuid.uuid4().hex[:6]}"
        await create_user_as_operator(stack, name, PASSWORD, ["admin", "producer"])
        await enrol_and_log_in(env, name)
        yield stack, env


async def _report(env: dict[str, str], folder: Path, *args: str) -> str:
    code, out, err = await run_cli(env, "report", "--output-dir", str(folder), *args, timeout=180)
    assert code == 0, err + out
    return out


def _number(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in:\n{text}"
    return int(found[1].replace(",", ""))


async def test_throughput_matches_the_load_and_files_are_written(
    report_env: tuple[StackConfig, dict[str, str]], tmp_path: Path
) -> None:
    _, env = report_env
    out = await _report(env, tmp_path, "--window", "6", "--load", "1000")
    driven = _number(r"([\d,]+) events acknowledged in", out)
    counted = _number(r"acknowledged \(in\)\s+[\d,]+/s \(([\d,]+) in the window\)", out)
    assert driven >= 4000
    assert abs(counted - driven) <= 0.1 * driven, out
    assert "bottleneck stage" in out and "ack-to-stored ms" in out
    assert AOF_FINDING not in out  # this stack's Redis keeps an AOF
    assert MFA_FINDING not in out  # its one account enrolled a second factor
    assert re.search(r"a Redis process crash would lose\s+nothing", out), out
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "<h2>Throughput</h2>" in html
    assert "## Persistence" in (tmp_path / "report.md").read_text()


async def test_turning_aof_off_produces_the_finding(
    report_env: tuple[StackConfig, dict[str, str]], aof_redis: str, tmp_path: Path
) -> None:
    _, env = report_env
    client = aioredis.Redis.from_url(aof_redis)
    try:
        await client.config_set("appendonly", "no")
        out = await _report(env, tmp_path, "--window", "1")
    finally:
        await client.config_set("appendonly", "yes")
        await client.aclose()
    assert f"[critical] {AOF_FINDING}" in out, out
    assert "appendonly no" in out


async def test_an_account_without_mfa_produces_the_finding(
    report_env: tuple[StackConfig, dict[str, str]], tmp_path: Path
) -> None:
    stack, env = report_env
    name = f"reset-{uuid.uuid4().hex[:6]}"
    await create_user_as_operator(stack, name, PASSWORD, ["analyst"])
    other = env | {"STREAMMESH_STATE_DIR": str(tmp_path / "other")}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pki").symlink_to(stack.pki_dir)
    await enrol_and_log_in(other, name)
    code, _, err = await run_cli(env, "admin", "reset-mfa", name)
    assert code == 0, err
    after = await _report(env, tmp_path, "--window", "1")
    assert f"1 active account(s) {MFA_FINDING}" in after, after
    assert f"default/{name}" in after
