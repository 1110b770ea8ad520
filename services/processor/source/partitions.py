"""The partitions a processor works on, round by round: which it holds, which must work through
their own pending entries before new ones, what a round reads from them, and their upkeep.

A partition is *active* once taken over: its counters reconciled (`backlog.py`) and every entry
pending under another consumer claimed. An active partition in the *backlog* reads its own
pending entries ("0") until a read finds none, and only then new ones (">"): after a takeover,
a claim, a failed round or a queue error, so that its entries are stored in ID order
(`ownership.py`, Handover). Between rounds, with nothing in flight, `prepare` rebalances, and
reclaims and trims what is due; `ack` is the fenced acknowledgement, counting the bytes toward
the next trim.

With the engine on (`Processing`, the committer), entries it processed stay pending until a
checkpoint covers them. The backlog read and the idle reclaim then start after the last entry
the engine's side has seen (`Processing.position`) instead of from the start: those entries are
in hand, not stale, and must not be stored or processed again. A takeover tells it to forget
the partition's state, and a release waits for its final checkpoint.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import redis.asyncio as aioredis

from services.processor.source.backlog import BacklogKeeper
from services.processor.source.ownership import PartitionOwnership, epoch_key
from services.processor.source.trimming import trim_partition
from streammesh.api.processor.v1 import processor_pb2
from streammesh.entries import Entry
from streammesh.legacy_keys import move_legacy_keys
from streammesh.streams import StreamLayout, body_bytes

__all__ = [
    "PartitionSource",
    "Processing",
    "SourceConfig",
    "SourceStats",
    "Work",
    "after",
    "partition_status",
]

log = logging.getLogger(__name__)

Work = list[tuple[int, list[Entry]]]
"""What a round read: each partition with entries, and its entries in ID order."""

_CLAIM_PAGE = 500
_MAX_CLAIM_PAGES = 10_000
"""Bounds one sweep over a pending list (5 million entries); the next sweep continues."""


class Processing(Protocol):
    """What the source asks of the engine's side (`processing.committer.EngineCommitter`):
    entries it processed stay pending until a checkpoint covers them, so re-reads and reclaims
    start after them, and a lease is released only after its state is saved."""

    def position(self, partition: int) -> str:
        """The last entry id the partition's engine holds ("0" for none)."""
        ...

    def forget(self, partition: int) -> None:
        """The partition was lost, or is taken over anew."""
        ...

    async def release(self, partitions: Sequence[int]) -> None:
        """Save the partitions' state before their leases are given back."""
        ...


def after(entry_id: str) -> str:
    """The least entry id after `entry_id` (XAUTOCLAIM's start is inclusive)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


@dataclass(frozen=True)
class SourceConfig:
    """How the source reads, owns, reclaims and trims its partitions."""

    read_count: int = 32
    """Entries per partition per read."""
    block_ms: int = 1000
    """How long a read of new entries waits when there are none."""
    claim_idle_ms: int = 30_000
    """Entries of an owned partition idle this long are reclaimed (XAUTOCLAIM)."""
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


@dataclass
class SourceStats:
    """What the source did, for status and tests."""

    takeovers: int = 0
    entries_claimed: int = 0
    entries_trimmed: int = 0
    backlog_corrections: int = 0


class PartitionSource:
    """Reads, reclaims, acknowledges (fenced) and trims the partitions this consumer holds."""

    def __init__(
        self,
        client: aioredis.Redis,
        layout: StreamLayout,
        consumer: str,
        *,
        config: SourceConfig,
        stats: SourceStats,
        forget: Callable[[int], str] | None = None,
        top_up: bool = False,
        processing: Processing | None = None,
    ) -> None:
        """`forget` goes to the fenced ack (`PartitionOwnership`). With `top_up`, a blocked
        read that returned entries of some partitions reads the others once more without
        blocking (their entries can then share this round's call across partitions)."""
        self._client = client
        self._layout = layout
        self._consumer = consumer
        self._consumer_bytes = consumer.encode()
        self._config = config
        # The processor's own partition keys, moved from their old names with the others.
        self._own_keys: dict[str, Callable[[int], str]] = {
            "epoch": functools.partial(epoch_key, layout)
        }
        if forget is not None:
            self._own_keys["attempts"] = forget
        self._keys_moved = False
        self._top_up = top_up
        self._processing = processing
        self.stats = stats
        self.ownership = PartitionOwnership(
            client,
            layout,
            consumer,
            lease_ttl_ms=config.lease_ttl_ms,
            heartbeat_ms=config.heartbeat_ms,
            forget=forget,
        )
        self._backlog_keeper = BacklogKeeper(client, layout, consumer)
        # Bytes acknowledged per partition since its last trim (trim_after_bytes).
        self._acked_bytes: dict[int, int] = {}
        # Partitions taken over (pending entries of others claimed) and still held.
        self._active: set[int] = set()
        # Active partitions whose own pending entries must be worked before new ones.
        self._backlog: set[int] = set()
        self.tick = config.heartbeat_ms / 4000
        """How long a round with nothing owned waits, and the least gap between acquires."""
        self._next_acquire = 0.0
        self._group_ready = False
        self._next_claim = self._next_trim = 0.0

    def holds(self, partition: int) -> bool:
        """Whether work on `partition` may start now (checked before each store)."""
        return self.ownership.holds(partition)

    def epoch(self, partition: int) -> int:
        """The lease epoch we last held the partition under, sent with each store."""
        return self.ownership.last_epoch(partition)

    def fenced_out(self, partition: int, stored_epoch: int, reason: str) -> None:
        """Storage's fence is above our epoch: drop the partition (ownership.fenced_out)."""
        self.ownership.fenced_out(partition, stored_epoch, reason)

    async def move_legacy_keys(self) -> int:
        """Move the partitions' keys of the layout before the hash tags, ours included
        (streammesh/legacy_keys.py); how many moved. Once per life."""
        moved = await move_legacy_keys(self._client, self._layout, self._own_keys)
        if moved:
            log.warning("moved %d partition keys to the hash-tagged layout", moved)
        self._keys_moved = True
        return moved

    def set_processing(self, processing: Processing) -> None:
        """Follow the engine's positions and save its state before releases (see Processing)."""
        self._processing = processing

    def _position(self, partition: int) -> str:
        return "0" if self._processing is None else self._processing.position(partition)

    def active(self) -> frozenset[int]:
        """Partitions taken over and still held."""
        return frozenset(self._active)

    async def prepare(self) -> None:
        """Between rounds: the consumer group (again after Redis lost it), the rebalance, and
        the reclaim and trims that are due."""
        if not self._group_ready:
            if not self._keys_moved:
                # Moved at start already, unless Redis was unreachable then; a conflict
                # (LegacyKeysConflict) here ends the worker, and with it the process.
                await self.move_legacy_keys()
            await self._layout.ensure_group(self._client)
            self._group_ready = True
        await self._rebalance()
        now = time.monotonic()
        if now >= self._next_claim:
            await self._claim_stale()
            self._next_claim = now + self._config.claim_idle_ms / 2000
        interval = self._config.trim_interval_seconds
        if interval > 0 and now >= self._next_trim:
            await self._trim(sorted(self._active), check_drained=True)
            self._next_trim = now + interval
        elif interval > 0 and self._config.trim_after_bytes:
            await self._trim(self._trim_due())

    def queue_failed(self, error: Exception) -> None:
        """After a Redis error in a round: every active partition reads its pending entries
        first, and a consumer group Redis lost is created again."""
        self._backlog |= self._active
        if "NOGROUP" in str(error):
            # Redis came back without its data (no AOF, an empty replica): ingest's XADD
            # recreated the streams, so recreate the group and carry on.
            self._group_ready = False

    def read_pending_first(self, partitions: Iterable[int]) -> None:
        """These partitions work through their pending entries before new ones (a failed
        round: the retry starts from the oldest unacknowledged entry)."""
        self._backlog.update(partitions)

    async def poll(self) -> Work | None:
        """One round's read over the owned partitions; None when none is owned."""
        owned = [p for p in sorted(self._active) if self.ownership.holds(p)]
        if not owned:
            return None
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
        return [(p, entries) for p, entries in reply.items() if entries]

    async def ack(self, partition: int, entries: Sequence[Entry]) -> bool:
        """The fenced ack (ownership.py), counting the bytes toward the next trim."""
        if not await self.ownership.ack(partition, *entries):
            return False
        self._count_acked(partition, entries)
        return True

    async def discard(self, partition: int, entries: Sequence[Entry]) -> bool:
        """`ack` of entries that were not stored (dead letters)."""
        return await self.ack(partition, entries)

    async def ack_all(self, acks: Sequence[tuple[int, Sequence[Entry]]]) -> list[bool]:
        """`ack` for several partitions in one round trip (`PartitionOwnership.ack_many`)."""
        results = await self.ownership.ack_many(acks)
        for (partition, entries), acked in zip(acks, results, strict=True):
            if acked:
                self._count_acked(partition, entries)
        return results

    def _count_acked(self, partition: int, entries: Sequence[Entry]) -> None:
        self._acked_bytes[partition] = self._acked_bytes.get(partition, 0) + sum(
            body_bytes(fields) for _, fields in entries
        )

    async def _rebalance(self) -> None:
        """Forget lost partitions, release those the assignment moved away, acquire free ones
        it gives us, and take over what we acquired."""
        ownership = self.ownership
        held = ownership.held()
        for partition in self._active - held:
            if self._processing is not None:
                self._processing.forget(partition)
        self._active &= held
        self._backlog &= held
        surplus = held - ownership.desired
        if surplus:
            if self._processing is not None:
                await self._processing.release(sorted(surplus & self._active))
            await ownership.release(surplus)
            self._active -= surplus
            self._backlog -= surplus
        wanted = ownership.desired - ownership.held()
        if wanted and time.monotonic() >= self._next_acquire:
            self._next_acquire = time.monotonic() + self.tick
            await ownership.acquire(wanted)
        for partition in sorted(ownership.held() - self._active):
            drift = await self._backlog_keeper.reconcile(partition)
            self.stats.backlog_corrections += bool(drift.events or drift.bytes)
            self._acked_bytes[partition] = 0
            claimed = await self._claim_foreign(partition)
            if self._processing is not None:
                self._processing.forget(partition)
            self.stats.takeovers += 1
            log.info("took over partition %d (%d pending entries claimed)", partition, claimed)
            self._active.add(partition)
            self._backlog.add(partition)

    async def _read(self, partitions: list[int]) -> dict[int, list[Entry]]:
        """Our pending entries ("0") of backlog partitions, new ones (">") of the others; blocks
        only when no partition has a backlog."""
        backlog = not self._backlog.isdisjoint(partitions)
        # A backlog partition reads its pending entries after those its engine holds (they stay
        # pending until a checkpoint covers them, and must not be stored or processed again).
        positions = {
            self._layout.stream(p): self._position(p) if p in self._backlog else ">"
            for p in partitions
        }
        entries = {p: cast(list[Entry], []) for p in partitions}
        await self._read_into(entries, positions, block=not backlog)
        idle = {self._layout.stream(p): ">" for p, found in entries.items() if not found}
        if self._top_up and not backlog and 0 < len(idle) < len(entries):
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
            # Entries the engine holds are pending, unacknowledged until the next checkpoint,
            # and idle by design: they are not stale while we hold the lease.
            position = self._position(partition)
            start: Any = "0-0" if position == "0" else after(position)
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


async def partition_status(
    client: aioredis.Redis, layout: StreamLayout
) -> list[processor_pb2.PartitionStatus]:
    """Length and pending count of every partition (one round trip)."""
    streams = layout.streams()
    async with client.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xpending(stream, layout.group)
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
