"""Two storage replicas behind one MeshClient, one of them in a network namespace of the test's
own whose link is slowed (200 ms one way) or cut (everything lost), with real mTLS over real
kernel networking (tests/netns.py; the replicas are tests/faults/replica_server.py).

What the mesh client does, as found in streammesh/mesh (replicas.py, ejection.py):
- It has no latency-based ejection: a slow replica whose answers still come within the
  caller's deadline is never ejected. Its picker sends each attempt to the admitted replica
  with the fewest attempts in flight, so under concurrent load a slow replica gets few calls.
- DEADLINE_EXCEEDED counts as an outage: a replica that misses callers' deadlines is ejected
  after `consecutive_outages` in a row, probed back after `base_ejection_seconds` (doubling
  while it still fails) and readmitted once it answers in time.
- DEADLINE_EXCEEDED is not retried (it is the call's own deadline, spent), so by default the
  calls that meet a replica cut off silently fail: nothing tells gRPC the connection is dead
  before keepalive (30 s + 10 s) does. They are bounded by the ejection: `consecutive_outages`
  calls, then one per probe while the link is down. With `RetryPolicy.attempt_timeout_seconds`
  such an attempt is cut short and retried on the other replica: no call fails.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from streammesh.api.storage.v1 import storage_pb2, storage_pb2_grpc
from streammesh.mesh import MeshServer
from streammesh.mesh.client import MeshClient, MeshClientConfig, TlsFiles
from streammesh.mesh.derived_config import RetryPolicy
from streammesh.mesh.ejection import EjectionPolicy
from tests.conftest import TRUST_DOMAIN
from tests.faults.replica_server import RECEIVED_KEY, REPLICA_KEY, SERVICE, start_replica
from tests.netns import NetNamespace, network_namespace

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

POLICY = EjectionPolicy(consecutive_outages=3, base_ejection_seconds=0.5, max_ejection_seconds=2)
DELAY_MS = 200
NEAR, FAR = "near", "far"
"""The replica on loopback and the one behind the namespace's link (channel 0 and 1)."""
ROOT = Path(__file__).resolve().parents[2]
FAR_PORT = 50055  # the namespace has its own ports: nothing else listens there


@dataclass
class Replicas:
    namespace: NetNamespace
    near: MeshServer
    far_address: str


@pytest.fixture(scope="module")
async def replicas(
    pki_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Replicas]:
    with network_namespace() as namespace:
        log = tmp_path_factory.mktemp("netns-replica") / "far.log"
        namespace.spawn(
            [sys.executable, "-m", "tests.faults.replica_server", FAR, namespace.address,
             str(FAR_PORT), str(pki_dir), TRUST_DOMAIN],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            log=log,
        )  # fmt: skip
        near = await start_replica(NEAR, "127.0.0.1", 0, pki_dir, TRUST_DOMAIN)
        try:
            yield Replicas(namespace, near, f"{namespace.address}:{FAR_PORT}")
        finally:
            await near.stop(0)


@asynccontextmanager
async def _warm_client(
    pki_dir: Path, replicas: Replicas, retry: RetryPolicy | None = None
) -> AsyncIterator[MeshClient]:
    """A client over both replicas, once both answered calls (the far one's process may still
    be starting); afterwards the link is healed and the client closed."""
    client = MeshClient(
        MeshClientConfig(
            server_name="storage",
            targets=(f"127.0.0.1:{replicas.near.port}", replicas.far_address),
            tls=TlsFiles.of(pki_dir, "processor"),
            services=(SERVICE,),
            timeout_seconds=5,
            ejection=POLICY,
            retry=retry or RetryPolicy(),
        )
    )
    try:
        for channel in client.channel.channels:
            await asyncio.wait_for(channel.channel_ready(), 30)
        warm = await _steady(client, seconds=0.5, timeout=5)
        assert set(warm.answered) == {NEAR, FAR} and not warm.failed, warm
        yield client
    finally:
        replicas.namespace.heal()
        await client.close()


@dataclass
class Outcomes:
    """What a run of calls got: who answered, which codes failed, the far replica's count."""

    answered: Counter[str] = field(default_factory=Counter)
    failed: Counter[grpc.StatusCode] = field(default_factory=Counter)
    far_received: int = 0
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def mean_ms(self, name: str) -> float:
        times = self.seconds.get(name, [])
        return 1000 * sum(times) / len(times) if times else float("nan")


async def _call(stub: storage_pb2_grpc.StorageServiceStub, timeout: float, out: Outcomes) -> None:
    started = time.monotonic()
    call = stub.StoreEvents(storage_pb2.StoreEventsRequest(), timeout=timeout)
    try:
        await call
    except grpc.aio.AioRpcError as error:
        out.failed[error.code()] += 1
        return
    trailing = await call.trailing_metadata()
    name = str(trailing.get(REPLICA_KEY))
    out.answered[name] += 1
    out.seconds.setdefault(name, []).append(time.monotonic() - started)
    if name == FAR:
        out.far_received = int(trailing.get(RECEIVED_KEY))


async def _steady(
    client: MeshClient, *, seconds: float, timeout: float, workers: int = 1, max_calls: int = 3000
) -> Outcomes:
    """`workers` callers in a loop for `seconds` (or `max_calls` calls in all)."""
    stub = client.stub(storage_pb2_grpc.StorageServiceStub)
    out = Outcomes()
    end = time.monotonic() + seconds
    made = 0

    async def worker() -> None:
        nonlocal made
        while time.monotonic() < end and made < max_calls:
            made += 1
            await _call(stub, timeout, out)
            await asyncio.sleep(0.005)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return out


async def _until_far_answers(client: MeshClient, timeout: float, wanted: int = 5) -> Outcomes:
    """Calls until the far replica answered `wanted` of them (bounded by `timeout` seconds)."""
    stub = client.stub(storage_pb2_grpc.StorageServiceStub)
    out = Outcomes()
    deadline = time.monotonic() + timeout
    while out.answered[FAR] < wanted:
        assert time.monotonic() < deadline, f"the far replica was not readmitted: {out}"
        await _call(stub, 1.0, out)
        await asyncio.sleep(0.01)
    return out


async def test_a_slow_replica_gets_few_calls_and_is_ejected_when_it_misses_deadlines(
    pki_dir: Path, replicas: Replicas
) -> None:
    async with _warm_client(pki_dir, replicas) as client:
        replicas.namespace.delay(DELAY_MS)
        # Slow but correct (answers well within the callers' 5 s): never ejected, yet the
        # least-in-flight picker keeps most calls off it under concurrent load.
        slow = await _steady(client, seconds=2, timeout=5, workers=4)
        assert not slow.failed, slow
        assert client.channel.ejector.ejections(1) == 0
        far_share = slow.answered[FAR] / sum(slow.answered.values())
        assert far_share < 0.2, slow
        assert slow.mean_ms(FAR) >= DELAY_MS, slow  # the delay is real

        # Callers whose deadline (150 ms) the slow replica cannot meet: its misses eject it.
        received_before = slow.far_received
        missed = await _steady(client, seconds=3, timeout=0.15)
        assert set(missed.failed) <= {grpc.StatusCode.DEADLINE_EXCEEDED}, missed
        assert missed.answered[FAR] == 0, missed
        ejections = client.channel.ejector.ejections(1)
        assert ejections >= 2, "ejected once, and again after failing a probe"
        assert client.channel.ejector.ejections(0) == 0

        replicas.namespace.heal()
        healed = time.monotonic()
        back = await _until_far_answers(client, timeout=10)
        readmitted_after = time.monotonic() - healed
        assert client.channel.ejector.ejected() == []
        # Every call the far replica got while it missed deadlines: the run that ejected it,
        # then one probe per readmission that ejected it again.
        sent_far_while_slow = back.far_received - back.answered[FAR] - received_before
        assert sent_far_while_slow == POLICY.consecutive_outages + ejections - 1
        assert missed.failed[grpc.StatusCode.DEADLINE_EXCEEDED] >= sent_far_while_slow
    print(
        f"\n[netns slow replica, {DELAY_MS} ms one way; shared machine] deadline 5 s, 4 callers, 2 s: "
        f"far got {slow.answered[FAR]} of {sum(slow.answered.values())} calls "
        f"({100 * far_share:.1f}%), mean {slow.mean_ms(FAR):.0f} ms vs near "
        f"{slow.mean_ms(NEAR):.1f} ms, never ejected; deadline 150 ms, 1 caller, 3 s: "
        f"{sum(missed.answered.values())} answered, "
        f"{missed.failed[grpc.StatusCode.DEADLINE_EXCEEDED]} DEADLINE_EXCEEDED "
        f"({sent_far_while_slow} of them sent to the far replica), {ejections} ejections; "
        f"readmitted {readmitted_after:.2f}s after the delay was removed"
    )


@pytest.mark.parametrize("attempt_timeout", [None, 0.15], ids=["whole-deadline", "attempt-150ms"])
async def test_a_cut_off_replica_is_ejected_and_readmitted_when_the_link_is_back(
    pki_dir: Path, replicas: Replicas, attempt_timeout: float | None
) -> None:
    retry = RetryPolicy(attempt_timeout_seconds=attempt_timeout)
    async with _warm_client(pki_dir, replicas, retry) as client:
        replicas.namespace.cut()
        cut = await _steady(client, seconds=3, timeout=0.5)
        ejections = client.channel.ejector.ejections(1)
        assert ejections >= 1
        assert cut.answered[FAR] == 0 and cut.answered[NEAR] > 0, cut
        lost = cut.failed[grpc.StatusCode.DEADLINE_EXCEEDED]
        if attempt_timeout is None:
            # The calls that met the silent replica waited out their deadline (not retried):
            # the run that ejected it and one per failed probe; the rest went to the near one.
            assert set(cut.failed) <= {grpc.StatusCode.DEADLINE_EXCEEDED}, cut
            assert POLICY.consecutive_outages <= lost <= POLICY.consecutive_outages + ejections
        else:
            # Each attempt that met it was cut short and retried on the near replica.
            assert not cut.failed, cut

        replicas.namespace.heal()
        healed = time.monotonic()
        await _until_far_answers(client, timeout=15)
        readmitted_after = time.monotonic() - healed
        assert client.channel.ejector.ejected() == []
    print(
        f"\n[netns cut replica, attempt timeout {attempt_timeout}; shared machine] deadline "
        f"500 ms, 1 caller, 3 s cut: {cut.answered[NEAR]} answered by the near replica, "
        f"{sum(cut.failed.values())} failed ({ {c.name: n for c, n in cut.failed.items()} }), "
        f"{ejections} ejections; "
        f"readmitted {readmitted_after:.2f}s after the link was back"
    )
