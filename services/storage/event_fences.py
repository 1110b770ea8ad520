"""The lease fence of StoreEvents (migrations/0016_event_fences.sql).

A processor names its lease epoch on every partition it stores for (StoreEventsRequest.fences).
In the insert's transaction, before the rows, each fence is upserted into `event_fences`: the
row is raised to the request's epoch when that is at least the stored one, and locked until
the commit either way (ON CONFLICT DO UPDATE locks the row even when its WHERE is false). A
request with an epoch below the stored one is refused whole: FailedPrecondition, reason
STALE_LEASE_EPOCH, message naming the stream, partition and both epochs, nothing written.

Why FAILED_PRECONDITION and not ABORTED: gRPC's status guide keeps ABORTED for a conflict the
client resolves by retrying its read-modify-write at a higher level, FAILED_PRECONDITION for a
state the client must not retry against until the system changed. A fenced-out processor must
not retry at all (the partition has a newer owner who stores the entries again), and the
engine's outputs, fenced the same way (engine_output_store.py), already answer
FAILED_PRECONDITION.

Ordering. Two requests of one partition serialize on its row: the old owner's store that
commits first is followed by the new owner's (which stores the same pending entries again, a
no-op by the idempotent insert); once the new owner's epoch is committed, the old one's is
refused. Fences are upserted in (stream, partition) order, so two requests over the same
partitions cannot deadlock on them.

Cost: one statement more per fenced request, and BEGIN/COMMIT around it and the insert (a
request without fences stays one autocommitted statement). Each store updates its partitions'
rows in place (HOT, fillfactor 50), so the table stays one page per few hundred partitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from streammesh.api.storage.v1 import definitions_pb2
from streammesh.mesh.errors import FailedPrecondition, InvalidArgument

__all__ = ["STALE_LEASE_EPOCH", "Fence", "check_fences", "raise_fences"]

STALE_LEASE_EPOCH = "STALE_LEASE_EPOCH"
"""ErrorInfo reason of a store refused for a lease epoch below the partition's fence."""


@dataclass(frozen=True, slots=True)
class Fence:
    """A partition and the writer's lease epoch on it (events here, engine outputs in
    engine_output_store.py)."""

    stream: str
    partition: int
    lease_epoch: int


_MAX_PARTITION = 2**31 - 1  # the column is an integer
_MAX_EPOCH = 2**63 - 1  # bigint

_RAISE = """
INSERT INTO event_fences AS f (stream, partition, lease_epoch)
SELECT * FROM unnest($1::text[], $2::int4[], $3::int8[])
ON CONFLICT (stream, partition) DO UPDATE SET lease_epoch = EXCLUDED.lease_epoch
    WHERE f.lease_epoch <= EXCLUDED.lease_epoch
RETURNING stream, partition
"""
_STORED = """
SELECT stream, partition, lease_epoch FROM event_fences
WHERE (stream, partition) IN (SELECT * FROM unnest($1::text[], $2::int4[]))
"""


def check_fences(fences: Sequence[definitions_pb2.PartitionFence]) -> list[Fence]:
    """The request's fences, validated and sorted by (stream, partition); InvalidArgument for
    an empty stream, a partition beyond the column, an epoch of 0 or beyond bigint, or a
    partition named twice."""
    checked: dict[tuple[str, int], Fence] = {}
    for index, fence in enumerate(fences):
        field = f"fences[{index}]"
        problem = ""
        if not fence.stream:
            problem = "stream is empty"
        elif fence.partition > _MAX_PARTITION:
            problem = f"partition {fence.partition} is above {_MAX_PARTITION}"
        elif not 1 <= fence.lease_epoch <= _MAX_EPOCH:
            problem = f"lease_epoch must be between 1 and {_MAX_EPOCH}"
        elif (fence.stream, fence.partition) in checked:
            problem = f"partition {fence.partition} of {fence.stream} is fenced twice"
        if problem:
            raise InvalidArgument(f"{field}: {problem}", field_violations=[(field, problem)])
        checked[(fence.stream, fence.partition)] = Fence(
            fence.stream, fence.partition, fence.lease_epoch
        )
    return [checked[where] for where in sorted(checked)]


async def raise_fences(conn: asyncpg.Connection, fences: Sequence[Fence]) -> None:
    """Raise each partition's fence to the request's epoch (locking its row to the end of the
    transaction `conn` is in); FailedPrecondition when a stored epoch is higher. `fences` come
    sorted from check_fences."""
    streams = [f.stream for f in fences]
    partitions = [f.partition for f in fences]
    raised = await conn.fetch(_RAISE, streams, partitions, [f.lease_epoch for f in fences])
    if len(raised) == len(fences):
        return
    stored = {
        (row["stream"], row["partition"]): row["lease_epoch"]
        for row in await conn.fetch(_STORED, streams, partitions)
    }
    stale = [f for f in fences if stored.get((f.stream, f.partition), 0) > f.lease_epoch]
    first = stale[0] if stale else fences[0]
    raise FailedPrecondition(
        f"events of {first.stream} partition {first.partition}: lease epoch {first.lease_epoch}"
        f" is older than the stored epoch {stored.get((first.stream, first.partition), 0)}"
        f"; the partition has a newer owner, nothing was written"
        + (f" ({len(stale)} partitions fenced out)" if len(stale) > 1 else ""),
        error_reason=STALE_LEASE_EPOCH,
    )
