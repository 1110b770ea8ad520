"""The lease fence of StoreEvents (migrations/0016_event_fences.sql).

A processor names its lease epoch on every partition it stores for (StoreEventsRequest.fences).
The insert then runs as the fenced twin of its statement (services/storage/sql.py,
FENCED_INSERTS), still one statement and one round trip: it upserts each fence into
`event_fences`, raising the row to the request's epoch when that is at least the stored one and
locking it to the commit either way (ON CONFLICT DO UPDATE locks the row even when its WHERE is
false), and lets the rows in only when every fence was raised. Otherwise the statement fails
with event_fence_refused's SQLSTATE and nothing of it is kept: the request is refused whole,
FailedPrecondition, reason STALE_LEASE_EPOCH, message naming the stream, partition and both
epochs.

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

Cost: the upsert of one row per fenced partition in the insert's statement (no round trip
more); the rows are updated in place (HOT, fillfactor 50). scripts/bench_event_fences.py
measures it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.storage.sql import STALE_LEASE_EPOCH_SQLSTATE
from streammesh.api.storage.v1 import definitions_pb2
from streammesh.mesh.errors import FailedPrecondition, InvalidArgument

__all__ = ["STALE_LEASE_EPOCH", "Fence", "check_fences", "fence_arguments", "stale"]

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


def fence_arguments(fences: Sequence[Fence]) -> tuple[list[str], list[int], list[int]]:
    """The fenced insert's $13, $14 and $15 (services/storage/sql.py FENCED_INSERTS): the
    streams, partitions and epochs of `fences` (sorted, from check_fences)."""
    return (
        [f.stream for f in fences],
        [f.partition for f in fences],
        [f.lease_epoch for f in fences],
    )


def stale(error: BaseException) -> FailedPrecondition | None:
    """The refusal to answer for a fenced insert that failed on a stale epoch (the SQLSTATE
    of event_fence_refused, migration 0016); None for any other failure."""
    if getattr(error, "sqlstate", None) != STALE_LEASE_EPOCH_SQLSTATE:
        return None
    return FailedPrecondition(str(error), error_reason=STALE_LEASE_EPOCH)
