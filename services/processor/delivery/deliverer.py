"""Storing what a round read, partition by partition in ID order, and acknowledging it.

- An entry is acknowledged (through the `Fence`, the source's fenced ack) only after storage
  confirmed it (committed, or already there), or after its dead letter was recorded.
- A partition's entries are stored one group after another (`grouping.py`); the leading groups
  of several partitions share one call (`across.py`). A failure stops the partition's round
  (RETRY), and the retry starts again from its oldest pending entry, so a later batch never
  overtakes an earlier one.
- Poison: a failed store that is not an outage counts toward the entry's limit
  (`max_deliveries`); at the limit the entry is recorded as a dead letter in storage and then
  acknowledged, so the entries behind it flow. Outages never count (`dead_letters.py`).
- Fencing: every store carries our lease epoch of each partition in it (QueuedBody.fences).
  Storage refuses a store whose epoch is below the partition's fence (StaleLeaseEpoch: a newer
  owner stored already); that partition is lost at once: nothing acknowledged, nothing
  counted or dead-lettered, its pending entries left to the new owner. A refused call across
  partitions (which wrote nothing) is redone partition by partition, so that only the
  fenced-out ones are lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, cast

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError

from services.processor.delivery.across import Chunk, across_body, across_chunks
from services.processor.delivery.dead_letters import (
    DeadLetterRecord,
    DeadLetterSink,
    FailureCounter,
    RecordDeadLetter,
    describe,
    is_outage,
)
from services.processor.delivery.grouping import group_at, joined_body
from services.processor.delivery.store import (
    PermanentStoreError,
    StaleLeaseEpoch,
    StoreBatch,
    StoreResult,
)
from services.processor.delivery.traced import process_span
from services.processor.failpoints import Failpoint
from streammesh.api.common.v1 import event_pb2
from streammesh.entries import Entry, QueuedBody, entry_body
from streammesh.streams import StreamLayout

__all__ = ["CommitDeferred", "Deliverer", "DeliveryConfig", "DeliveryStats", "Fence", "Outcome"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class CommitDeferred(Exception):
    """Raised by a `Fence`'s ack when what the acknowledgement waits for (the engine's outputs
    or its checkpoint) could not be committed yet: the entries stay pending and the partition's
    round is retried after a pause (an outage, never counted against the entries)."""


class Fence(Protocol):
    """What delivery needs of the source (`source.partitions.PartitionSource` is one, the
    engine's `processing.committer.EngineCommitter`, which runs the engine first, another)."""

    def holds(self, partition: int) -> bool:
        """Whether work on the partition may start now (checked before each store)."""
        ...

    def epoch(self, partition: int) -> int:
        """Our lease epoch on the partition, sent with each store (0: none known, unfenced)."""
        ...

    def fenced_out(self, partition: int, stored_epoch: int, reason: str) -> None:
        """Storage refused a store of the partition for a stale epoch (its fence is
        `stored_epoch`): stop working on it at once."""
        ...

    async def ack(self, partition: int, entries: Sequence[Entry]) -> bool:
        """Acknowledge the entries while the partition is held; False once it is not."""
        ...

    async def ack_all(self, acks: Sequence[tuple[int, Sequence[Entry]]]) -> list[bool]:
        """`ack` for several partitions at once (one round trip), a result for each."""
        ...

    async def discard(self, partition: int, entries: Sequence[Entry]) -> bool:
        """Acknowledge entries whose events were not stored (dead letters), unprocessed."""
        ...


@dataclass(frozen=True)
class DeliveryConfig:
    """How entries are grouped into calls and when a failing one is set aside."""

    store_max_events: int = 2000
    """Consecutive entries of a partition go to storage in one call up to this many events..."""
    store_max_bytes: int = 4 * 1024 * 1024
    """...and this many bytes (an entry larger than either still goes alone)."""
    store_across_max_events: int = 500
    """The leading groups of several partitions share one call (across.py) up to this many
    events: enough to spread a call's and a commit's fixed cost, few enough that a busy round
    still makes several calls side by side (storage and Postgres then work on them at once);
    0 stores every partition on its own."""
    max_deliveries: int = 5
    """Failed stores (outages excluded) after which an entry is set aside as a dead letter."""
    dead_letter_maxlen: int = 10_000
    """The dead-letter stream is capped near this many entries (storage keeps the record)."""
    failpoint: str = ""
    """Test-only fault injection (see failpoints.py); empty in production."""


@dataclass
class DeliveryStats:
    """What delivery did, for status and tests."""

    batches_stored: int = 0
    events_stored: int = 0
    events_duplicate: int = 0
    store_failures: int = 0
    counted_failures: int = 0
    dead_lettered: int = 0
    last_error: str = field(default="")


class Outcome(enum.Enum):
    """How a partition's part of a round ended."""

    DONE = "done"
    """Everything stored (or set aside) and acknowledged."""
    RETRY = "retry"
    """A store failed: read the partition's pending entries again after a pause."""
    LOST = "lost"
    """The partition is no longer held: its new owner goes on from its pending entries."""


class Deliverer:
    """Stores and acknowledges the entries a round read (see the module doc)."""

    def __init__(
        self,
        client: aioredis.Redis,
        layout: StreamLayout,
        *,
        store: StoreBatch,
        fence: Fence,
        config: DeliveryConfig,
        stats: DeliveryStats,
        dead_letters: RecordDeadLetter | None = None,
    ) -> None:
        """`dead_letters` records a dead letter in storage before its entry is acknowledged;
        without it (tests, tools) the dead-letter stream entry is the only record."""
        if config.max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        self._layout = layout
        self._store = store
        self._fence = fence
        self._config = config
        self.stats = stats
        self._failpoint = Failpoint(config.failpoint)
        self._failures = FailureCounter(client, layout)
        self._sink = DeadLetterSink(
            client, layout, dead_letters, stream_maxlen=config.dead_letter_maxlen
        )

    @property
    def dead_letter_stream(self) -> str:
        return self._sink.stream

    async def drain(self, work: list[tuple[int, list[Entry]]]) -> dict[int, Outcome]:
        """Store and acknowledge what a round read. The leading groups of the partitions go to
        storage together (across.py), as few calls as the limits allow, each call followed by
        the rest of its partitions; a partition whose group shares no call is drained on its
        own. All of it concurrently, each partition in order."""
        limit = self._config.store_across_max_events
        chunks = [
            chunk
            for chunk in (
                across_chunks(
                    work,
                    lambda entries: self._group(entries, 0),
                    max_events=limit,
                    max_bytes=self._config.store_max_bytes,
                )
                if limit and len(work) > 1
                else []
            )
            if len(chunk) > 1
        ]
        joined = {partition for chunk in chunks for partition, _ in chunk}
        entries_of = dict(work)
        results = await _all_finished(
            *(self._drain_across(chunk, entries_of) for chunk in chunks),
            *(self._drain_alone(p, entries) for p, entries in work if p not in joined),
        )
        return {partition: outcome for result in results for partition, outcome in result.items()}

    async def _drain_alone(self, partition: int, entries: list[Entry]) -> dict[int, Outcome]:
        return {partition: await self._drain(partition, entries)}

    async def _drain_across(
        self, chunk: Chunk, entries_of: dict[int, list[Entry]]
    ) -> dict[int, Outcome]:
        """One call for the chunk's groups, then the rest of each of its partitions; when the
        call must be redone partition by partition, each partition from its first entry."""
        settled = await self._store_across(chunk)
        outcomes: dict[int, Outcome] = {}
        rest: list[tuple[int, list[Entry]]] = []
        for (partition, group), outcome in zip(chunk, settled, strict=True):
            if outcome is None:
                rest.append((partition, entries_of[partition]))
            elif outcome is not Outcome.DONE:
                outcomes[partition] = outcome
            elif len(entries_of[partition]) > len(group):
                rest.append((partition, entries_of[partition][len(group) :]))
        drained = await _all_finished(*(self._drain(p, entries) for p, entries in rest))
        outcomes.update(zip((p for p, _ in rest), drained, strict=True))
        return outcomes

    async def _store_across(self, chunk: Chunk) -> list[Outcome | None]:
        """One store for the groups of several partitions, then each partition's fenced
        acknowledgement (all in one round trip); an outcome per partition, None for those to store partition by
        partition (all of them after a failure other than an outage, or a partition no longer
        held before the call)."""
        if not all(self._fence.holds(partition) for partition, _ in chunk):
            return [None] * len(chunk)  # _drain finds out which are lost
        result = await self._store_several(
            lambda: self._fenced(across_body(chunk), [p for p, _ in chunk]),
            (group for _, group in chunk),
        )
        if not isinstance(result, StoreResult):
            # An outage waits; anything else (a fence refusal too) goes per partition.
            return [result if result is Outcome.RETRY else None] * len(chunk)
        self._count_stored(sum(len(group) for _, group in chunk), result)
        try:
            acked = await self._fence.ack_all(chunk)
        except CommitDeferred as error:
            self.stats.last_error = str(error)
            return [Outcome.RETRY] * len(chunk)
        return [Outcome.DONE if ok else Outcome.LOST for ok in acked]

    async def _drain(self, partition: int, entries: list[Entry]) -> Outcome:
        """Store and acknowledge entries in order while we hold the partition. Consecutive
        entries of one form go to storage in one call (their bodies concatenated, which protobuf
        reads as one message with the events in the same order); if that call fails for a
        reason other than an outage, they are stored one by one, so that only the entry at
        fault is counted against."""
        start = 0
        while start < len(entries):
            group = self._group(entries, start)
            outcome = await self._store_together(partition, group) if len(group) > 1 else None
            if outcome is None:
                for entry_id, fields in group:
                    outcome = await self._store_one(partition, entry_id, fields)
                    if outcome is not Outcome.DONE:
                        return outcome
            elif outcome is not Outcome.DONE:
                return outcome
            start += len(group)
        return Outcome.DONE

    def _group(self, entries: list[Entry], start: int) -> list[Entry]:
        return group_at(
            entries,
            start,
            max_events=self._config.store_max_events,
            max_bytes=self._config.store_max_bytes,
        )

    async def _store_together(self, partition: int, group: list[Entry]) -> Outcome | None:
        """One store and one acknowledgement for the group; None when it must be retried entry
        by entry (a failure other than an outage)."""
        if not self._fence.holds(partition):
            return Outcome.LOST
        result = await self._store_several(
            lambda: self._fenced(joined_body(group), [partition]), (group,)
        )
        if not isinstance(result, StoreResult):
            return result  # an outage waits, a fenced-out partition is lost; else per entry
        self._count_stored(len(group), result)
        return await self._ack(partition, group)

    async def _store_several(
        self, body: Callable[[], QueuedBody], groups: Iterable[list[Entry]]
    ) -> StoreResult | Outcome | None:
        """Store the entries of `body` (those of `groups`) in one call: its result, or after a
        failure RETRY (an outage), LOST (storage fenced out the one partition of the call) or
        None (anything else: the caller stores them a smaller group at a time)."""
        raw: QueuedBody | None = None
        try:
            raw = body()
            self._failpoint.reached("before-store")
            with process_span(groups):
                result = await self._store(raw)
            self._failpoint.reached("after-store")
        except StaleLeaseEpoch as error:
            fences = raw.fences if raw is not None else ()
            if len(fences) != 1:
                return None  # which partitions are stale: found out one by one
            self._fenced_out(fences[0][1], error)
            return Outcome.LOST
        except Exception as error:  # classified here, acted on by the caller
            self.stats.store_failures += 1
            self.stats.last_error = describe(error)
            return Outcome.RETRY if is_outage(error) else None
        return result

    async def _store_one(
        self, partition: int, entry_id: bytes, fields: dict[bytes, bytes] | None
    ) -> Outcome:
        """Store and acknowledge one entry, or count its failure (dead-lettering it past the
        limit)."""
        if not self._fence.holds(partition):
            return Outcome.LOST
        batch: event_pb2.QueuedBatch | None = None
        try:
            # The entry's bytes go to storage as they are: storage parses them anyway, and
            # decoding here too cost the processor more than all its Redis work.
            raw = self._fenced(entry_body(fields), [partition])
            self._failpoint.reached("before-store")
            with process_span(([(entry_id, fields)],)):
                result = await self._store(raw)
            self._failpoint.reached("after-store")
        except StaleLeaseEpoch as stale:
            self._fenced_out(partition, stale)
            return Outcome.LOST
        except Exception as failure:  # classified below: nothing is dropped unrecorded
            error: Exception = failure
            self.stats.store_failures += 1
            self.stats.last_error = describe(error)
            if is_outage(error):
                return Outcome.RETRY  # storage is down: wait, never count
            # Decode only now, for the dead letter's event ids; an entry that does not
            # decode is refused for good whatever storage said.
            batch, error = _decoded(fields, error)
            self.stats.counted_failures += 1
            now_ms = int(time.time() * 1000)
            attempts = await self._failures.fail(partition, entry_id, now_ms)
            permanent = isinstance(error, DecodeError | PermanentStoreError)
            if not permanent and attempts.count < self._config.max_deliveries:
                return Outcome.RETRY
            if not self._fence.holds(partition):
                return Outcome.LOST
            record = DeadLetterRecord.build(
                stream=self._layout.stream(partition),
                partition=partition,
                entry_id=entry_id,
                fields=fields,
                batch=batch,
                error=describe(error),
                attempts=attempts,
                now_ms=now_ms,
            )
            if not await self._dead_letter(record):
                return Outcome.RETRY
            if not await self._fence.discard(partition, [(entry_id, fields)]):
                return Outcome.LOST
            return Outcome.DONE
        self._count_stored(1, result)
        return await self._ack(partition, [(entry_id, fields)])

    def _fenced(self, body: QueuedBody, partitions: Iterable[int]) -> QueuedBody:
        """The body with our lease epoch of each of `partitions` (those we know one of)."""
        stream = self._layout.prefix
        fences = []
        for partition in partitions:
            epoch = self._fence.epoch(partition)
            if epoch:
                fences.append((stream, partition, epoch))
        return dataclasses.replace(body, fences=tuple(fences))

    def _fenced_out(self, partition: int, error: StaleLeaseEpoch) -> None:
        self.stats.store_failures += 1
        self.stats.last_error = describe(error)
        self._fence.fenced_out(partition, error.stored_epoch, describe(error))

    async def _ack(self, partition: int, entries: list[Entry]) -> Outcome:
        """The fence's acknowledgement of stored entries, as an outcome."""
        try:
            return Outcome.DONE if await self._fence.ack(partition, entries) else Outcome.LOST
        except CommitDeferred as error:
            self.stats.last_error = str(error)
            return Outcome.RETRY

    def _count_stored(self, entries: int, result: StoreResult) -> None:
        self.stats.batches_stored += entries
        self.stats.events_stored += result.inserted
        self.stats.events_duplicate += result.duplicates

    async def _dead_letter(self, record: DeadLetterRecord) -> bool:
        """Record the entry (storage, then the stream); False leaves it pending for a retry:
        an entry is never acknowledged without its record."""
        log.error(
            "dead-lettering entry %s of %s after %d failed attempt(s): %s",
            record.entry_id,
            record.stream,
            record.delivery_count,
            record.error,
        )
        try:
            await self._sink.send(record)
        except Exception as error:  # storage or Redis failed us: keep the entry, retry later
            self.stats.last_error = f"could not record dead letter: {describe(error)}"
            return False
        self.stats.dead_lettered += 1
        return True


async def _all_finished(*work: Awaitable[T]) -> list[T]:
    """Every awaitable's result, in order. All of them run to their end also when one fails
    (a Redis error): a drain left running would overlap the next round's work on its
    partition. The first failure is raised after all of them finished."""
    results = await asyncio.gather(*work, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)


def _decoded(
    fields: dict[bytes, bytes] | None, error: Exception
) -> tuple[event_pb2.QueuedBatch | None, Exception]:
    """The entry's events as a QueuedBatch after a failed store (either form), and the error to
    act on: a DecodeError when the entry does not decode, else the store's error."""
    try:
        return entry_body(fields).batch(), error
    except DecodeError as undecodable:
        return None, undecodable
