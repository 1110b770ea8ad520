"""The consumer loop: store the batches of the partitions this processor owns, then XACK.

Guarantees:
- An entry is acknowledged only after storage confirmed the batch (committed, or already there).
  A crash at any point therefore leads to re-delivery, and the idempotent store turns re-delivery
  into effectively-once.
- Per-key order: a partition is worked on by its lease holder only (`ownership.py`). Its entries
  are stored one after another in ID order. A failure stops the partition's round, and the retry
  starts again from its oldest pending entry, so a later batch never overtakes an earlier one,
  within one processor or across a handover.
- Poison: a failed store that is not an outage counts toward the entry's limit
  (`max_deliveries`); at the limit the entry is recorded as a dead letter in storage and then
  acknowledged, so the entries behind it flow. Outages never count (`dead_letters.py`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError

from services.processor.delivery.across import Chunk, across_body, across_chunks, entry_event_count
from services.processor.delivery.dead_letters import (
    DeadLetterRecord,
    DeadLetterSink,
    FailureCounter,
    RecordDeadLetter,
    describe,
    is_outage,
)
from services.processor.failpoints import Failpoint
from services.processor.source.backlog import BacklogKeeper
from services.processor.source.ownership import Entry, PartitionOwnership
from services.processor.source.trimming import trim_partition
from streammesh.api.common.v1 import event_pb2
from streammesh.api.processor.v1 import processor_pb2
from streammesh.entries import QueuedBody, entry_body
from streammesh.mesh.tasks import raise_if_cancelled, stop_task, wait_event
from streammesh.streams import StreamLayout, body_bytes

__all__ = [
    "PermanentStoreError",
    "StoreBatch",
    "StoreResult",
    "StreamWorker",
    "WorkerConfig",
    "WorkerStats",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_CLAIM_PAGE = 500
_MAX_CLAIM_PAGES = 10_000
"""Bounds one sweep over a pending list (5 million entries); the next sweep continues."""


@dataclass(frozen=True)
class StoreResult:
    inserted: int
    duplicates: int


class PermanentStoreError(Exception):
    """Storage refused the batch for a reason a retry cannot fix (the batch goes to dead letters)."""


StoreBatch = Callable[[QueuedBody], Awaitable[StoreResult]]
"""Stores an entry's events (its serialized QueuedColumns or QueuedBatch, passed on undecoded,
or those of consecutive entries of one form concatenated); raises
PermanentStoreError to dead-letter it at once, an outage (`dead_letters.is_outage`) to wait,
anything else to retry it up to `max_deliveries` times."""


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker reads, owns, reclaims and trims its partitions."""

    read_count: int = 32
    """Entries per partition per read."""
    store_max_events: int = 2000
    """Consecutive entries of a partition go to storage in one call up to this many events..."""
    store_max_bytes: int = 4 * 1024 * 1024
    """...and this many bytes (an entry larger than either still goes alone)."""
    store_across_max_events: int = 500
    """The leading groups of several partitions share one call (across.py) up to this many
    events: enough to spread a call's and a commit's fixed cost, few enough that a busy round
    still makes several calls side by side (storage and Postgres then work on them at once);
    0 stores every partition on its own."""
    block_ms: int = 1000
    """How long a read of new entries waits when there are none."""
    claim_idle_ms: int = 30_000
    """Entries of an owned partition idle this long are reclaimed (XAUTOCLAIM)."""
    retry_backoff_seconds: float = 0.5
    """Pause after a failed store or an unavailable queue."""
    lease_ttl_ms: int = 10_000
    """Lease and membership lifetime: how long a crashed processor's partitions wait."""
    heartbeat_ms: int = 2_000
    """Membership heartbeat and lease renewal interval; at most half of lease_ttl_ms."""
    trim_interval_seconds: float = 5.0
    """How often owned partitions are trimmed to their safe point; 0 turns trimming off."""
    trim_retention_seconds: float = 0.0
    """Acknowledged entries stay in the stream at least this long (replay, debugging)."""
    trim_after_bytes: int = 2 * 1024 * 1024
    """A partition is also trimmed as soon as this many bytes of it were acknowledged since
    its last trim, so acknowledged entries cost Redis at most about this much per partition
    whatever the rate (ingest's back-pressure counts only unacknowledged ones); 0 = by the
    interval only."""
    max_deliveries: int = 5
    """Failed stores (outages excluded) after which an entry is set aside as a dead letter."""
    dead_letter_maxlen: int = 10_000
    """The dead-letter stream is capped near this many entries (storage keeps the record)."""
    failpoint: str = ""
    """Test-only fault injection (see failpoints.py); empty in production."""


@dataclass
class WorkerStats:
    batches_stored: int = 0
    events_stored: int = 0
    events_duplicate: int = 0
    store_failures: int = 0
    counted_failures: int = 0
    dead_lettered: int = 0
    takeovers: int = 0
    entries_claimed: int = 0
    entries_trimmed: int = 0
    backlog_corrections: int = 0
    last_error: str = field(default="")


class _Outcome(enum.Enum):
    DONE = "done"
    RETRY = "retry"
    LOST = "lost"


class StreamWorker:
    def __init__(
        self,
        client: aioredis.Redis,
        layout: StreamLayout,
        *,
        consumer: str,
        store: StoreBatch,
        config: WorkerConfig | None = None,
        dead_letters: RecordDeadLetter | None = None,
    ) -> None:
        """`dead_letters` records a dead letter in storage before its entry is acknowledged;
        without it (tests, tools) the dead-letter stream entry is the only record."""
        self._client = client
        self._layout = layout
        self._consumer = consumer
        self._consumer_bytes = consumer.encode()
        self._store = store
        self._config = config = config or WorkerConfig()
        if config.max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        self._failpoint = Failpoint(config.failpoint)
        self._failures = FailureCounter(client, layout)
        self._sink = DeadLetterSink(
            client, layout, dead_letters, stream_maxlen=config.dead_letter_maxlen
        )
        self.ownership = PartitionOwnership(
            client,
            layout,
            consumer,
            lease_ttl_ms=config.lease_ttl_ms,
            heartbeat_ms=config.heartbeat_ms,
        )
        self._backlog_keeper = BacklogKeeper(client, layout, consumer)
        # Bytes acknowledged per partition since its last trim (trim_after_bytes).
        self._acked_bytes: dict[int, int] = {}
        # Partitions taken over (pending entries of others claimed) and still held.
        self._active: set[int] = set()
        # Active partitions whose own pending entries must be worked before new ones.
        self._backlog: set[int] = set()
        self._tick = config.heartbeat_ms / 4000
        self._next_acquire = 0.0
        self._stopping = asyncio.Event()
        self._leaving = asyncio.Event()
        self.stats = WorkerStats()

    @property
    def consumer(self) -> str:
        return self._consumer

    @property
    def dead_letter_stream(self) -> str:
        return self._sink.stream

    def stop(self) -> None:
        """Finish the entries in hand, then release every lease and leave (graceful stop)."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume until stop(). A cancelled run() behaves like a crash: leases and membership
        are left to expire, and pending entries stay for the next owners."""
        heartbeats = asyncio.create_task(
            self.ownership.run(self._leaving), name=f"heartbeat-{self._consumer}"
        )
        try:
            await self.ownership.wait_first_heartbeat(self._config.heartbeat_ms / 1000)
            await self._consume()
        finally:
            self._leaving.set()
            await stop_task(heartbeats)
        try:
            await self.ownership.leave()
        except (RedisError, OSError) as error:
            log.warning("could not release leases (they expire on their own): %s", error)

    async def _consume(self) -> None:
        group_ready = False
        next_claim = next_trim = time.monotonic()
        while not self._stopping.is_set():
            raise_if_cancelled()
            try:
                if not group_ready:
                    await self._layout.ensure_group(self._client)
                    group_ready = True
                await self._rebalance()
                now = time.monotonic()
                if now >= next_claim:
                    await self._claim_stale()
                    next_claim = now + self._config.claim_idle_ms / 2000
                if self._config.trim_interval_seconds > 0 and now >= next_trim:
                    await self._trim(sorted(self._active), check_drained=True)
                    next_trim = now + self._config.trim_interval_seconds
                elif self._config.trim_interval_seconds > 0 and self._config.trim_after_bytes:
                    await self._trim(self._trim_due())
                await self._round()
            except (RedisError, OSError) as error:
                self._backlog |= self._active
                if "NOGROUP" in str(error):
                    # Redis came back without its data (no AOF, an empty replica): ingest's
                    # XADD recreated the streams, so recreate the group and carry on.
                    group_ready = False
                await self._pause(f"the queue is unavailable: {error}")

    async def _rebalance(self) -> None:
        """Between rounds (nothing in flight): forget lost partitions, release those the
        assignment moved away, acquire free ones it gives us, and take over what we acquired."""
        ownership = self.ownership
        held = ownership.held()
        self._active &= held
        self._backlog &= held
        surplus = held - ownership.desired
        if surplus:
            await ownership.release(surplus)
            self._active -= surplus
            self._backlog -= surplus
        wanted = ownership.desired - ownership.held()
        if wanted and time.monotonic() >= self._next_acquire:
            self._next_acquire = time.monotonic() + self._tick
            await ownership.acquire(wanted)
        for partition in sorted(ownership.held() - self._active):
            drift = await self._backlog_keeper.reconcile(partition)
            self.stats.backlog_corrections += bool(drift.events or drift.bytes)
            self._acked_bytes[partition] = 0
            claimed = await self._claim_foreign(partition)
            self.stats.takeovers += 1
            log.info("took over partition %d (%d pending entries claimed)", partition, claimed)
            self._active.add(partition)
            self._backlog.add(partition)

    async def _round(self) -> None:
        """One read-store-ack round over the owned partitions."""
        owned = [p for p in sorted(self._active) if self.ownership.holds(p)]
        if not owned:
            await wait_event(self._stopping, self._tick)
            return
        from_backlog = self._backlog.intersection(owned)
        reply = await self._read(owned)
        for partition in from_backlog:
            if not reply[partition]:
                self._backlog.discard(partition)  # caught up: read new entries next
        fresh = [p for p, entries in reply.items() if entries and p not in from_backlog]
        for partition in await self._with_foreign_pending(fresh):
            # Someone else still holds older entries of ours (a late read of the previous
            # owner): claim them; what we just read is in our pending list and comes back in
            # ID order with them.
            self.stats.entries_claimed += await self._claim_foreign(partition)
            self._backlog.add(partition)
            reply[partition] = []
        work = [(p, entries) for p, entries in reply.items() if entries]
        outcomes = await self._drain_partitions(work)
        retry = [p for p, outcome in outcomes.items() if outcome is _Outcome.RETRY]
        if retry:
            self._backlog.update(retry)
            await self._pause(self.stats.last_error)

    async def _read(self, partitions: list[int]) -> dict[int, list[Entry]]:
        """Our pending entries ("0") of backlog partitions, new ones (">") of the others; blocks
        only when no partition has a backlog."""
        backlog = not self._backlog.isdisjoint(partitions)
        positions = {self._layout.stream(p): "0" if p in self._backlog else ">" for p in partitions}
        entries = {p: cast(list[Entry], []) for p in partitions}
        await self._read_into(entries, positions, block=not backlog)
        idle = {self._layout.stream(p): ">" for p, found in entries.items() if not found}
        if self._config.store_across_max_events and not backlog and 0 < len(idle) < len(entries):
            # A blocked read returns as soon as one stream gets an entry: Redis serves it after
            # the first XADD of ingest's pipeline, whose other partitions' entries are there
            # a moment later. Read them now (without blocking), so that they go to storage in
            # this round's call across partitions instead of a call of their own next round.
            await self._read_into(entries, idle, block=False)
        return entries

    async def _read_into(
        self, entries: dict[int, list[Entry]], positions: dict[str, str], *, block: bool
    ) -> None:
        reply = await self._client.xreadgroup(
            self._layout.group,
            self._consumer,
            positions,  # type: ignore[arg-type]
            count=self._config.read_count,
            block=self._config.block_ms if block else None,
        )
        for stream, batch in cast(list[tuple[bytes, list[Entry]]], reply or []):
            entries[self._layout.partition_of_stream(stream)] = batch

    async def _pause(self, reason: str) -> None:
        log.warning("pausing %.1fs: %s", self._config.retry_backoff_seconds, reason)
        await wait_event(self._stopping, self._config.retry_backoff_seconds)

    async def _drain_partitions(self, work: list[tuple[int, list[Entry]]]) -> dict[int, _Outcome]:
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

    async def _drain_alone(self, partition: int, entries: list[Entry]) -> dict[int, _Outcome]:
        return {partition: await self._drain(partition, entries)}

    async def _drain_across(
        self, chunk: Chunk, entries_of: dict[int, list[Entry]]
    ) -> dict[int, _Outcome]:
        """One call for the chunk's groups, then the rest of each of its partitions; when the
        call must be redone partition by partition, each partition from its first entry."""
        settled = await self._store_across(chunk)
        outcomes: dict[int, _Outcome] = {}
        rest: list[tuple[int, list[Entry]]] = []
        for (partition, group), outcome in zip(chunk, settled, strict=True):
            if outcome is None:
                rest.append((partition, entries_of[partition]))
            elif outcome is not _Outcome.DONE:
                outcomes[partition] = outcome
            elif len(entries_of[partition]) > len(group):
                rest.append((partition, entries_of[partition][len(group) :]))
        drained = await _all_finished(*(self._drain(p, entries) for p, entries in rest))
        outcomes.update(zip((p for p, _ in rest), drained, strict=True))
        return outcomes

    async def _store_across(self, chunk: Chunk) -> list[_Outcome | None]:
        """One store for the groups of several partitions, then each partition's fenced
        acknowledgement; an outcome per partition, None for those to store partition by
        partition (all of them after a failure other than an outage, or a partition no longer
        held before the call)."""
        if not all(self.ownership.holds(partition) for partition, _ in chunk):
            return [None] * len(chunk)  # _drain finds out which are lost
        result = await self._store_several(lambda: across_body(chunk))
        if not isinstance(result, StoreResult):
            return [result] * len(chunk)  # an outage waits; anything else goes per partition
        self._count_stored(sum(len(group) for _, group in chunk), result)
        acked = await _all_finished(*(self._ack(partition, group) for partition, group in chunk))
        return [_Outcome.DONE if ok else _Outcome.LOST for ok in acked]

    async def _drain(self, partition: int, entries: list[Entry]) -> _Outcome:
        """Store and acknowledge entries in order while we hold the partition. Consecutive
        entries of one form go to storage in one call (their bodies concatenated, which protobuf
        reads as one message with the events in the same order); if that call fails for a reason other than an outage,
        they are stored one by one, so that only the entry at fault is counted against."""
        start = 0
        while start < len(entries):
            group = self._group(entries, start)
            outcome = await self._store_together(partition, group) if len(group) > 1 else None
            if outcome is None:
                for entry_id, fields in group:
                    outcome = await self._store_one(partition, entry_id, fields)
                    if outcome is not _Outcome.DONE:
                        return outcome
            elif outcome is not _Outcome.DONE:
                return outcome
            start += len(group)
        return _Outcome.DONE

    def _group(self, entries: list[Entry], start: int) -> list[Entry]:
        """Entries from `start` on that fit one StoreEvents call (at least one), all of one
        form (an entry without a body goes alone: its store fails by itself)."""
        events = size = 0
        end = start
        form = _body_field(entries[start][1])
        while end < len(entries):
            fields = entries[end][1] or {}
            events += entry_event_count(fields)
            size += sum(map(len, fields.values()))
            if end > start and (
                events > self._config.store_max_events
                or size > self._config.store_max_bytes
                or form is None
                or _body_field(fields) != form
            ):
                break
            end += 1
        return entries[start:end]

    async def _store_together(self, partition: int, group: list[Entry]) -> _Outcome | None:
        """One store and one acknowledgement for the group; None when it must be retried entry
        by entry (a failure other than an outage)."""
        if not self.ownership.holds(partition):
            return _Outcome.LOST
        result = await self._store_several(lambda: _joined_body(group))
        if not isinstance(result, StoreResult):
            return result  # an outage waits; anything else is sorted out per entry
        self._count_stored(len(group), result)
        if not await self._ack(partition, group):
            return _Outcome.LOST
        return _Outcome.DONE

    async def _store_several(self, body: Callable[[], QueuedBody]) -> StoreResult | _Outcome | None:
        """Store the entries of `body` in one call: its result, or after a failure RETRY (an
        outage) or None (anything else: the caller stores them a smaller group at a time)."""
        try:
            raw = body()
            self._failpoint.reached("before-store")
            result = await self._store(raw)
            self._failpoint.reached("after-store")
        except Exception as error:  # classified here, acted on by the caller
            self.stats.store_failures += 1
            self.stats.last_error = describe(error)
            return _Outcome.RETRY if is_outage(error) else None
        return result

    async def _store_one(
        self, partition: int, entry_id: bytes, fields: dict[bytes, bytes] | None
    ) -> _Outcome:
        """Store and acknowledge one entry, or count its failure (dead-lettering it past the
        limit)."""
        if not self.ownership.holds(partition):
            return _Outcome.LOST
        batch: event_pb2.QueuedBatch | None = None
        try:
            # The entry's bytes go to storage as they are: storage parses them anyway, and
            # decoding here too cost the processor more than all its Redis work.
            raw = entry_body(fields)
            self._failpoint.reached("before-store")
            result = await self._store(raw)
            self._failpoint.reached("after-store")
        except Exception as failure:  # classified below: nothing is dropped unrecorded
            error: Exception = failure
            self.stats.store_failures += 1
            self.stats.last_error = describe(error)
            if is_outage(error):
                return _Outcome.RETRY  # storage is down: wait, never count
            # Decode only now, for the dead letter's event ids; an entry that does not
            # decode is refused for good whatever storage said.
            batch, error = _decoded(fields, error)
            self.stats.counted_failures += 1
            now_ms = int(time.time() * 1000)
            attempts = await self._failures.fail(partition, entry_id, now_ms)
            permanent = isinstance(error, DecodeError | PermanentStoreError)
            if not permanent and attempts.count < self._config.max_deliveries:
                return _Outcome.RETRY
            if not self.ownership.holds(partition):
                return _Outcome.LOST
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
                return _Outcome.RETRY
        else:
            self._count_stored(1, result)
        if not await self._ack(partition, [(entry_id, fields)]):
            return _Outcome.LOST
        return _Outcome.DONE

    async def _ack(self, partition: int, entries: list[Entry]) -> bool:
        """The fenced ack (ownership.py), counting the bytes toward the next trim."""
        if not await self.ownership.ack(partition, *entries):
            return False
        self._acked_bytes[partition] = self._acked_bytes.get(partition, 0) + sum(
            body_bytes(fields) for _, fields in entries
        )
        return True

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

    async def _claim_foreign(self, partition: int) -> int:
        """Claim every entry of the partition pending under another consumer; returns how many."""
        stream = self._layout.stream(partition)
        start, claimed = "-", 0
        for _ in range(_MAX_CLAIM_PAGES):
            page = cast(
                list[dict[str, Any]],
                await self._client.xpending_range(
                    stream, self._layout.group, min=start, max="+", count=_CLAIM_PAGE
                ),
            )
            foreign = [row["message_id"] for row in page if row["consumer"] != self._consumer_bytes]
            if foreign:
                await self._client.xclaim(
                    stream, self._layout.group, self._consumer, 0, foreign, justid=True
                )
                claimed += len(foreign)
            if len(page) < _CLAIM_PAGE:
                break
            start = "(" + page[-1]["message_id"].decode()
        return claimed

    async def _with_foreign_pending(self, partitions: Iterable[int]) -> list[int]:
        """Those of `partitions` where another consumer has pending entries (one round trip)."""
        checked = list(partitions)
        if not checked:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for partition in checked:
                pipe.xpending(self._layout.stream(partition), self._layout.group)
            summaries: list[Any] = await pipe.execute()
        return [
            partition
            for partition, summary in zip(checked, summaries, strict=True)
            if any(c["name"] != self._consumer_bytes for c in summary["consumers"])
        ]

    async def _claim_stale(self) -> None:
        """Take over entries of owned partitions left unacknowledged for claim_idle_ms; their
        partition then reads its pending list first."""
        for partition in sorted(self._active):
            if not self.ownership.holds(partition):
                continue
            stream = self._layout.stream(partition)
            start: Any = "0-0"
            for _ in range(_MAX_CLAIM_PAGES):
                # Not JUSTID: redis-py drops the cursor from JUSTID replies.
                start, claimed, _ = await self._client.xautoclaim(
                    stream,
                    self._layout.group,
                    self._consumer,
                    min_idle_time=self._config.claim_idle_ms,
                    start_id=start,
                    count=self._config.read_count,
                )
                if claimed:
                    log.info("reclaimed %d stale entries of %s", len(claimed), stream)
                    self.stats.entries_claimed += len(claimed)
                    self._backlog.add(partition)
                if start in (b"0-0", "0-0"):
                    break

    def _trim_due(self) -> list[int]:
        """Active partitions with trim_after_bytes acknowledged since their last trim."""
        threshold = self._config.trim_after_bytes
        return [p for p in sorted(self._active) if self._acked_bytes.get(p, 0) >= threshold]

    async def _trim(self, partitions: list[int], *, check_drained: bool = False) -> None:
        """Trim the partitions we hold; with `check_drained`, also zero the backlog counters
        of those that are drained (backlog.py: clears a drift, O(1))."""
        for partition in partitions:
            if not self.ownership.holds(partition):
                continue
            self._acked_bytes[partition] = 0
            self.stats.entries_trimmed += await trim_partition(
                self._client,
                self._layout.stream(partition),
                retention_seconds=self._config.trim_retention_seconds,
            )
            if check_drained:
                held = await self._backlog_keeper.reset_if_drained(partition)
                self.stats.backlog_corrections += bool(held and (held.events or held.bytes))

    async def partition_status(self) -> list[processor_pb2.PartitionStatus]:
        """Length and pending count of every partition (one round trip)."""
        streams = self._layout.streams()
        async with self._client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
                pipe.xpending(stream, self._layout.group)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        statuses = []
        for partition, stream in enumerate(streams):
            length, pending = replies[2 * partition], replies[2 * partition + 1]
            statuses.append(
                processor_pb2.PartitionStatus(
                    partition=partition,
                    stream=stream,
                    length=length if isinstance(length, int) else 0,
                    pending=int(pending["pending"]) if isinstance(pending, dict) else 0,
                )
            )
        return statuses


async def _all_finished(*work: Awaitable[T]) -> list[T]:
    """Every awaitable's result, in order. All of them run to their end also when one fails
    (a Redis error): a drain left running would overlap the next round's work on its
    partition. The first failure is raised after all of them finished."""
    results = await asyncio.gather(*work, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)


def _joined_body(group: list[Entry]) -> QueuedBody:
    """Consecutive entries of one form as one body (protobuf reads concatenated messages as one,
    repeated fields appended in order); DecodeError for an entry without one."""
    bodies = [entry_body(fields) for _, fields in group]
    return QueuedBody(bodies[0].field, b"".join(body.data for body in bodies))


def _body_field(fields: dict[bytes, bytes] | None) -> bytes | None:
    try:
        return entry_body(fields).field
    except DecodeError:
        return None


def _decoded(
    fields: dict[bytes, bytes] | None, error: Exception
) -> tuple[event_pb2.QueuedBatch | None, Exception]:
    """The entry's events as a QueuedBatch after a failed store (either form), and the error to
    act on: a DecodeError when the entry does not decode, else the store's error."""
    try:
        return entry_body(fields).batch(), error
    except DecodeError as undecodable:
        return None, undecodable
