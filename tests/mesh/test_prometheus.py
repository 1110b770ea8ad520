"""A real Prometheus (Debian's package; scripts/ensure-prometheus.sh installs it, and `make test`
runs that) scrapes a running ingest over real Redis: the counts and a rate read back through its
HTTP API match the calls driven. The shipped alerting rules pass `promtool check` and their
unit tests, and load in that Prometheus."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from services.ingest.pressure import BackPressure
from services.ingest.server import IngestDeps, create_server, pressure_limits
from services.ingest.settings import IngestSettings
from streammesh.api.common.v1 import event_pb2
from streammesh.api.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from streammesh.mesh import MeshServer, TlsMaterial, create_channel, service_config
from streammesh.streams import StreamLayout
from tests.conftest import TRUST_DOMAIN

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docs" / "prometheus"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="Prometheus is not installed and could not be: run scripts/ensure-prometheus.sh "
    "(`make test` runs it; it needs apt-get and root)",
)
pytestmark = needs_prometheus


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def shipped_alerts() -> set[str]:
    """The alert names alerts.yml declares (each rule is an `- alert: Name` line)."""
    lines = (RULES / "alerts.yml").read_text().splitlines()
    return {line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("- alert:")}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=RULES, check=False
    )


def test_the_alerting_rules_pass_promtool() -> None:
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(shipped_alerts())} rules found" in checked.stdout
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


class Prometheus:
    """A Prometheus process on a free loopback port, scraping its targets every second."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        """`targets`: each service's /metrics address (host:port), labelled `service`."""
        self.port = free_port()
        self.workdir = workdir
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES / "alerts.yml")],
            "scrape_configs": [
                {
                    "job_name": "streammesh",
                    "static_configs": [
                        {"targets": [target], "labels": {"service": service}}
                        for service, target in targets.items()
                    ],
                }
            ],
        }
        # JSON is YAML: no YAML writer needed.
        self.config = workdir / "prometheus.yml"
        self.config.write_text(json.dumps(config))
        self.log = workdir / "prometheus.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        assert PROMETHEUS is not None
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                PROMETHEUS,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        await self.until(lambda: self._get("/-/ready") is not None, "ready")

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), timeout=15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    def _get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                body = r.read()
        except OSError:
            return None
        return json.loads(body) if path.startswith("/api/") else body

    async def api(self, path: str) -> Any:
        reply = await asyncio.to_thread(self._get, path)
        assert reply is not None and reply["status"] == "success", reply
        return reply["data"]

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant vector's samples, through /api/v1/query."""
        data = await self.api("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert data["resultType"] == "vector", data
        return list(data["result"])

    async def scalar(self, promql: str) -> float | None:
        result = await self.query(promql)
        return float(result[0]["value"][1]) if result else None

    async def until(self, check: Any, what: str, timeout: float = 45) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.process is not None and self.process.returncode is not None:
                pytest.fail(f"prometheus exited: {self.log.read_text()[-2000:]}")
            outcome = check()
            if asyncio.iscoroutine(outcome):
                outcome = await outcome
            if outcome:
                return
            if loop.time() > deadline:
                pytest.fail(
                    f"Prometheus: {what} not seen in {timeout}s; log:\n"
                    + self.log.read_text()[-2000:]
                )
            await asyncio.sleep(0.25)


@pytest.fixture
async def ingest(pki_dir: Path, redis_url: str, redis_prefix: str) -> AsyncIterator[MeshServer]:
    client = aioredis.Redis.from_url(redis_url)
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=4)
    await layout.ensure_group(client)
    settings = IngestSettings(
        port=0, tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, partitions=4, metrics_port=free_port()
    )
    pressure = BackPressure(client, layout, pressure_limits(settings))
    await pressure.sample()
    pressure.start()
    mesh = create_server(settings, IngestDeps(client, layout, pressure))
    await mesh.start()
    try:
        yield mesh
    finally:
        await mesh.stop(0)
        await pressure.stop()
        await client.aclose()


@pytest.fixture
async def prometheus(ingest: MeshServer, tmp_path: Path) -> AsyncIterator[Prometheus]:
    assert ingest.metrics_endpoint is not None and ingest.metrics_endpoint.port
    server = Prometheus(tmp_path, {"ingest": f"127.0.0.1:{ingest.metrics_endpoint.port}"})
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


def _batch(n: int, events: int) -> ingest_pb2.PublishBatchRequest:
    return ingest_pb2.PublishBatchRequest(
        events=[
            event_pb2.Event(id=f"prom-{n}-{i}", key=f"k{i}", type="t", payload=b"{}")
            for i in range(events)
        ]
    )


@pytest.mark.slow
async def test_prometheus_scrapes_counts_and_rates_of_a_running_service(
    ingest: MeshServer, prometheus: Prometheus, pki_dir: Path
) -> None:
    await prometheus.until(lambda: prometheus.scalar('up{job="streammesh"} == 1'), "the target up")
    channel = create_channel(
        f"127.0.0.1:{ingest.port}",
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="ingest",
        config=service_config("streammesh.ingest.v1.IngestService", health_checked=False),
    )
    async with channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        # Spread over a few scrapes, so that the rate has samples to be computed from.
        for n in range(20):
            await stub.PublishBatch(_batch(n, 5), timeout=5)
            await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PublishBatch(
                ingest_pb2.PublishBatchRequest(events=[event_pb2.Event(key="no id")]), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    ok = (
        'grpc_server_handled_total{job="streammesh",grpc_service="streammesh.ingest.v1.'
        'IngestService",grpc_method="PublishBatch",grpc_type="unary",grpc_code="OK"}'
    )

    async def all_scraped() -> bool:
        return await prometheus.scalar(ok) == 20 and (
            await prometheus.scalar(
                'grpc_server_handled_total{grpc_method="PublishBatch",grpc_code="InvalidArgument"}'
            )
            == 1
        )

    await prometheus.until(all_scraped, "the 21 calls")
    assert await prometheus.scalar("streammesh_ingest_events_accepted_total") == 100
    assert await prometheus.scalar('grpc_server_started_total{grpc_method="PublishBatch"}') == 21
    assert (
        await prometheus.scalar('grpc_server_handling_seconds_count{grpc_method="PublishBatch"}')
        == 21
    )
    rate = await prometheus.scalar(f"rate({ok}[1m])")
    assert rate is not None and rate > 0
    events = await prometheus.scalar("sum(streammesh_queue_unacked_events)")
    assert events is not None and events >= 0  # sampled by back-pressure, present per partition
    version = await prometheus.query("streammesh_build_info")
    assert version and version[0]["metric"]["version"]
    # The shipped rules load in a real Prometheus and evaluate.
    rules = await prometheus.api("/api/v1/rules")
    loaded = {rule["name"]: rule["health"] for group in rules["groups"] for rule in group["rules"]}
    assert set(loaded) == shipped_alerts()
    assert "err" not in loaded.values(), loaded
