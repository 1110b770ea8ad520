"""Engine checkpoints in storage, real Postgres through the real gRPC server over mTLS: outputs and
checkpoint in one transaction fenced by the lease epoch (a stale epoch is refused with
FAILED_PRECONDITION and writes nothing), a new owner's load that returns the latest checkpoint and
fences the old owner out, and a crash and takeover mid-stream whose stored outputs equal an
uninterrupted run's, none missing and none twice."""

from __future__ import annotations

import json
import random
from typing import Any

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.processor.delivery.engine_outputs import outputs_request
from services.processor.engine.clock import ClockConfig
from services.processor.engine.events import EngineEvent
from services.processor.engine.partition import PartitionEngine, PartitionOutputs
from streammesh.api.storage.v1 import definitions_pb2 as pb
from tests.processor.engine.test_partition import rules, windows
from tests.storage import test_definitions as definitions_tests
from tests.storage.test_definitions import Definitions, outputs, refused
from tests.storage.test_schema_registry import field_violations

# The mTLS stubs of the definition tests (fixtures: a processor's and the gateway's).
stub_for = definitions_tests.stub_for
processor = definitions_tests.processor
gateway = definitions_tests.gateway

STREAM = "streammesh:events"
CLOCK = ClockConfig(out_of_orderness_nanos=10, idle_timeout_nanos=1_000)


def checkpoint(epoch: int, entry: str, snapshot: bytes = b"state", partition: int = 0) -> Any:
    return pb.EngineCheckpoint(
        stream=STREAM,
        partition=partition,
        lease_epoch=epoch,
        last_entry_id=entry,
        snapshot=snapshot,
    )


def stream_events(count: int) -> list[EngineEvent]:
    rng = random.Random(7)
    events, t = [], 0
    for n in range(count):
        t = max(0, t + (rng.randrange(-40, 0) if rng.random() < 0.15 else rng.randrange(0, 10)))
        payload: dict[str, Any] = {"g": rng.choice("xy"), "v": rng.randrange(11)}
        kind = rng.choice("aabc")
        events.append(
            EngineEvent(f"e{n:04d}", rng.choice(["k1", "k2", "k3"]), kind, t, 0, "acme", payload)
        )
    return events


def entry(n: int) -> str:
    """The queue entry id of the n-th event (one event per entry here)."""
    return f"{1_000 + n}-0"


async def stored(engine: AsyncEngine) -> dict[str, set[Any]]:
    async with engine.connect() as conn:
        alerts = {row[0] for row in await conn.execute(text("SELECT alert_id FROM alerts"))}
        results = {
            (*row[:-1], json.dumps(json.loads(row[-1]), sort_keys=True))
            for row in await conn.execute(
                text(
                    "SELECT window_id, window_version, partition, group_key, start_nanos,"
                    ' end_nanos, revision, "values"::text FROM window_results'
                )
            )
        }
        late = {
            tuple(row)
            for row in await conn.execute(
                text(
                    "SELECT source, definition_id, definition_version, event_id,"
                    " window_start_nanos FROM late_events"
                )
            )
        }
    return {"alerts": alerts, "results": results, "late": late}


def expected(outs: list[PartitionOutputs]) -> dict[str, set[Any]]:
    return {
        "alerts": {a.alert_id for o in outs for a in o.alerts},
        "results": {
            (
                r.window_id,
                r.window_version,
                r.partition,
                r.group,
                r.start_nanos,
                r.end_nanos,
                r.revision,
                json.dumps(json.loads(json.dumps(dict(r.values))), sort_keys=True),
            )
            for o in outs
            for r in o.window_results
        },
        "late": {
            ("window", w.window_id, w.window_version, w.event_id, w.window_start_nanos)
            for o in outs
            for w in o.window_late
        }
        | {("rule", x.rule_id, x.rule_version, x.event_id, 0) for o in outs for x in o.rule_late},
    }


async def test_a_takeover_mid_stream_stores_every_output_exactly_once(
    processor: Definitions, engine: AsyncEngine
) -> None:
    events = stream_events(400)
    reference = PartitionEngine(0, CLOCK, windows(), rules())
    reference_outs = [reference.process(events[i : i + 25], 0) for i in range(0, 400, 25)]
    reference_outs += [reference.process([], 0), reference.process([], 10**12)]

    # The first owner (epoch 1) commits 6 batches of 25, then computes a seventh it never
    # stores before the new owner fences it out.
    first = PartitionEngine(0, CLOCK, windows(), rules())
    assert not (
        await processor.LoadEngineCheckpoint(
            pb.LoadEngineCheckpointRequest(stream=STREAM, partition=0, lease_epoch=1)
        )
    ).found
    for i in range(0, 150, 25):
        out = first.process(events[i : i + 25], 0, last_entry_id=entry(i + 24))
        reply = await processor.StoreEngineOutputs(
            outputs_request(out, checkpoint=checkpoint(1, first.last_entry_id, first.snapshot()))
        )
        assert reply.checkpoint_saved
    in_flight = first.process(events[150:175], 0, last_entry_id=entry(174))
    late_write = outputs_request(
        in_flight, checkpoint=checkpoint(1, first.last_entry_id, first.snapshot())
    )
    assert len(in_flight) > 0, "the refused write must have had outputs to lose"

    # The new owner (epoch 2) loads, which fences epoch 1 out; its late write is refused whole.
    loaded = await processor.LoadEngineCheckpoint(
        pb.LoadEngineCheckpointRequest(stream=STREAM, partition=0, lease_epoch=2)
    )
    assert loaded.found and loaded.checkpoint.last_entry_id == entry(149)
    assert loaded.checkpoint.lease_epoch == 2
    before = await stored(engine)
    error = await refused(processor.StoreEngineOutputs(late_write))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "lease epoch 1 is older than the stored epoch 2" in (error.details() or "")
    assert await stored(engine) == before

    # It resumes after the checkpoint's entry, in other batches, and one store is retried.
    second = PartitionEngine.restore(loaded.checkpoint.snapshot, CLOCK, windows(), rules())
    resume = next(n for n in range(400) if entry(n) == loaded.checkpoint.last_entry_id) + 1
    for i in range(resume, 400, 40):
        batch = events[i : i + 40]
        out = second.process(batch, 0, last_entry_id=entry(i + len(batch) - 1))
        message = outputs_request(
            out, checkpoint=checkpoint(2, second.last_entry_id, second.snapshot())
        )
        await processor.StoreEngineOutputs(message)
        if i == resume:
            again = await processor.StoreEngineOutputs(message)  # a retry: nothing new
            assert (again.alerts_written, again.window_results_written) == (0, 0)
            assert again.late_events_written == 0 and again.checkpoint_saved
    for now in (0, 10**12):
        out = second.process([], now)
        await processor.StoreEngineOutputs(
            outputs_request(out, checkpoint=checkpoint(2, second.last_entry_id, second.snapshot()))
        )
    final = await stored(engine)
    want = expected(reference_outs)
    assert final == want
    assert all(want.values()), "the stream should produce every kind of output"


async def test_a_stale_epoch_is_refused_and_writes_nothing(
    processor: Definitions, engine: AsyncEngine
) -> None:
    await processor.StoreEngineOutputs(
        pb.StoreEngineOutputsRequest(checkpoint=checkpoint(5, "10-0"))
    )
    stale = outputs()
    stale.checkpoint.CopyFrom(checkpoint(4, "99-0", b"old owner"))
    error = await refused(processor.StoreEngineOutputs(stale))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await stored(engine) == {"alerts": set(), "results": set(), "late": set()}
    # The same epoch and a higher one are accepted, with their outputs.
    same = outputs()
    same.checkpoint.CopyFrom(checkpoint(5, "11-0", b"same owner"))
    assert (await processor.StoreEngineOutputs(same)).alerts_written == 3
    newer = pb.StoreEngineOutputsRequest(checkpoint=checkpoint(6, "12-0", b"next owner"))
    assert (await processor.StoreEngineOutputs(newer)).checkpoint_saved
    latest = await processor.LoadEngineCheckpoint(
        pb.LoadEngineCheckpointRequest(stream=STREAM, partition=0)
    )
    assert (latest.checkpoint.lease_epoch, latest.checkpoint.snapshot) == (6, b"next owner")


async def test_load_returns_the_latest_and_never_moves_back_within_an_epoch(
    processor: Definitions,
) -> None:
    def load(partition: int = 0, epoch: int = 0) -> Any:
        return processor.LoadEngineCheckpoint(
            pb.LoadEngineCheckpointRequest(stream=STREAM, partition=partition, lease_epoch=epoch)
        )

    assert not (await load()).found
    for n, (epoch, entry_id) in enumerate([(1, "5-0"), (1, "5-3"), (1, "10-0")]):
        saved = checkpoint(epoch, entry_id, f"s{n}".encode())
        reply = await processor.StoreEngineOutputs(pb.StoreEngineOutputsRequest(checkpoint=saved))
        assert reply.checkpoint_saved
    other = checkpoint(1, "1-0", b"partition 1", partition=1)
    await processor.StoreEngineOutputs(pb.StoreEngineOutputsRequest(checkpoint=other))
    latest = (await load()).checkpoint
    assert (latest.last_entry_id, latest.snapshot, latest.lease_epoch) == ("10-0", b"s2", 1)
    assert latest.save_time.seconds > 0
    assert (await load(partition=1)).checkpoint.snapshot == b"partition 1"
    # A delayed retry of an earlier call in the same epoch: its outputs are stored (they were
    # already), the later checkpoint is kept. Entry ids compare as numbers, not as text.
    delayed = outputs()
    delayed.checkpoint.CopyFrom(checkpoint(1, "9-0", b"earlier"))
    reply = await processor.StoreEngineOutputs(delayed)
    assert not reply.checkpoint_saved and reply.alerts_written == 3
    assert (await load()).checkpoint.snapshot == b"s2"
    # A load with a lower epoch than the fence is refused; with the fence's own, it reads.
    await load(epoch=3)
    assert (await refused(load(epoch=2))).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await load(epoch=3)).checkpoint.lease_epoch == 3
    # A fence on a partition that never saved state: found stays false, but it fences.
    assert not (await load(partition=2, epoch=4)).found
    lower = pb.StoreEngineOutputsRequest(checkpoint=checkpoint(3, "1-0", partition=2))
    assert (await refused(processor.StoreEngineOutputs(lower))).code() == (
        grpc.StatusCode.FAILED_PRECONDITION
    )


async def test_outputs_without_a_checkpoint_can_be_fenced(
    processor: Definitions, engine: AsyncEngine
) -> None:
    def fenced(epoch: int, tenant: str) -> pb.StoreEngineOutputsRequest:
        message = outputs(tenant)
        message.fence.CopyFrom(pb.PartitionFence(stream=STREAM, partition=0, lease_epoch=epoch))
        return message

    # No checkpoint yet: nothing to be stale against.
    assert (await processor.StoreEngineOutputs(fenced(1, "t1"))).alerts_written == 3
    await processor.LoadEngineCheckpoint(
        pb.LoadEngineCheckpointRequest(stream=STREAM, partition=0, lease_epoch=2)
    )
    error = await refused(processor.StoreEngineOutputs(fenced(1, "t2")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    async with engine.connect() as conn:
        tenants = set((await conn.execute(text("SELECT DISTINCT tenant FROM alerts"))).scalars())
    assert tenants == {"t1"}
    reply = await processor.StoreEngineOutputs(fenced(2, "t2"))
    assert reply.alerts_written == 3 and not reply.checkpoint_saved
    both = fenced(2, "t3")
    both.checkpoint.CopyFrom(checkpoint(2, "1-0"))
    error = await refused(processor.StoreEngineOutputs(both))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error)[0][0] == "fence"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"stream": ""}, "checkpoint.stream"),
        ({"lease_epoch": 0}, "checkpoint.lease_epoch"),
        ({"last_entry_id": ""}, "checkpoint.last_entry_id"),
        ({"last_entry_id": "12"}, "checkpoint.last_entry_id"),
        ({"last_entry_id": "99999999999999999999-0"}, "checkpoint.last_entry_id"),
        ({"partition": 2**31}, "checkpoint.partition"),
    ],
)
async def test_a_bad_checkpoint_is_refused_naming_the_field(
    processor: Definitions, change: dict[str, Any], field: str
) -> None:
    saved = checkpoint(1, "1-0")
    for name, value in change.items():
        setattr(saved, name, value)
    error = await refused(
        processor.StoreEngineOutputs(pb.StoreEngineOutputsRequest(checkpoint=saved))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error)[0][0] == field


async def test_only_the_processor_loads_checkpoints(
    gateway: Definitions, processor: Definitions
) -> None:
    load = pb.LoadEngineCheckpointRequest(stream=STREAM, partition=0)
    assert (await refused(gateway.LoadEngineCheckpoint(load))).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    no_stream = await refused(processor.LoadEngineCheckpoint(pb.LoadEngineCheckpointRequest()))
    assert no_stream.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(no_stream)[0][0] == "stream"
