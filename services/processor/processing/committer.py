"""The engine between delivery's store and the fenced XACK: per owned partition a
`PartitionEngine`, its outputs stored fenced by the lease epoch, its checkpoints, and the XACK of
only what a saved checkpoint covers. The commit order and the failure cases are in
docs/processor-checkpoints.md; in short, per partition:

1. delivery stores a group of entries (StoreEvents), then calls `ack` here;
2. on the first call after a takeover: LoadEngineCheckpoint with the lease epoch (raises the
   fence), restore; entries at or before the checkpoint are acknowledged as they are;
3. the entries after the engine's position are decoded and processed; the outputs go to
   StoreEngineOutputs under the fence (no call when there are none);
4. every `checkpoint_batches` calls, `checkpoint_seconds`, and before a lease is released, the
   snapshot goes with the outputs (one transaction); then the fenced XACK of every entry it
   covers. Nothing else is acknowledged, so a crash replays from the last checkpoint.

With no definition to run for the entries' tenants (and nothing held back), entries are
acknowledged at once, undecoded: processing off costs a set lookup per call.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from services.processor.delivery.dead_letters import StoreUnavailable, describe
from services.processor.delivery.deliverer import CommitDeferred
from services.processor.delivery.engine_outputs import MAX_ITEMS, outputs_request
from services.processor.delivery.engine_storage import Fenced
from services.processor.engine.clock import ClockConfig
from services.processor.engine.partition import (
    PartitionEngine,
    PartitionOutputs,
    SnapshotError,
    entry_id_key,
)
from services.processor.engine.patterns import RuleSetError
from services.processor.engine.window_defs import WindowDef
from services.processor.processing.decode import engine_events, entry_tenants
from services.processor.source.partitions import PartitionSource
from streammesh.api.storage.v1 import definitions_pb2 as pb
from streammesh.definitions.rules import Rule
from streammesh.entries import Entry

__all__ = ["Definitions", "EngineCommitter", "EngineConfig", "EngineStore"]

log = logging.getLogger(__name__)


class Definitions(Protocol):
    """What the engines read their definitions from (`DefinitionFollower` is one)."""

    version: int
    """Grows with every change (an engine takes the definitions anew when it moved)."""

    def windows_and_rules(self) -> tuple[list[WindowDef], list[Rule]]:
        """The enabled windows, and every rule version."""
        ...

    def active_tenants(self) -> frozenset[str]:
        """Tenants with something enabled to run."""
        ...

    def is_ready(self) -> bool:
        """Whether the definitions were read once (nothing is processed before)."""
        ...


class EngineStore(Protocol):
    """Storage's engine calls (`delivery.engine_storage.EngineStorage` is one)."""

    async def load(
        self, stream: str, partition: int, lease_epoch: int
    ) -> pb.EngineCheckpoint | None:
        """The checkpoint after raising the fence to `lease_epoch`; Fenced, StoreUnavailable."""
        ...

    async def store(self, request: pb.StoreEngineOutputsRequest) -> pb.StoreEngineOutputsResponse:
        """Outputs (and a checkpoint) in one transaction; Fenced, StoreUnavailable."""
        ...


@dataclass(frozen=True)
class EngineConfig:
    """When state is saved, and the engines' clocks."""

    clock: ClockConfig
    checkpoint_batches: int = 200
    """A checkpoint after this many processed groups of a partition..."""
    checkpoint_seconds: float = 2.0
    """...or this long after the last one, whichever comes first (and before a release)."""
    idle_poll_seconds: float = 0.25
    """How often a partition without new entries lets its engine see processing time (idle
    watermarks) and checks whether a checkpoint is due."""


@dataclass
class _Partition:
    """One owned partition's engine and what of it is not yet committed."""

    epoch: int
    engine: PartitionEngine
    definitions: int
    """The definitions version the engine runs."""
    checkpoint_entry: tuple[int, int]
    """The last entry a saved checkpoint covers."""
    scanned: str = ""
    """Every pending entry up to this one has been seen by this owner: acknowledged, or held
    in `uncovered`. Re-reads start after it (after a restore, entries up to the checkpoint
    may still be pending, unseen: they are read and acknowledged first)."""
    uncovered: dict[bytes, Entry] = field(default_factory=dict)
    """Entries processed (in the state) but in no saved checkpoint: acknowledged after the next."""
    outputs: PartitionOutputs = field(default_factory=PartitionOutputs)
    """Outputs not yet stored (an outage): stored before anything else of the partition."""
    batches: int = 0
    checkpointed_at: float = field(default_factory=time.monotonic)
    last_batch_at: float = field(default_factory=time.monotonic)


class _Lost(Exception):
    """Storage fenced the partition out (it has a newer owner); already dropped."""


_STORED_EPOCH = re.compile(r"stored epoch (\d+)")


class EngineCommitter:
    """The delivery `Fence` that runs the engine before acknowledging (see the module doc)."""

    def __init__(
        self,
        source: PartitionSource,
        *,
        stream: str,
        store: EngineStore,
        definitions: Definitions,
        config: EngineConfig,
    ) -> None:
        self._source = source
        self._ownership = source.ownership
        self._stream = stream
        self._store = store
        self._definitions = definitions
        self._config = config
        self._partitions: dict[int, _Partition] = {}
        self._next_idle_poll = 0.0
        self.checkpoints = 0
        """Checkpoints saved (for status and tests)."""
        self.events_processed = 0
        # Outputs stored, by kind (read by the metrics at scrape time).
        self.window_results_stored = self.late_events_stored = self.alerts_stored = 0
        self.duplicates_dropped: dict[int, int] = {}
        """Per partition: events its engine dropped as a repeat of a (tenant, type, id) it had
        taken (PartitionOutputs.duplicates), read by the metrics at scrape time."""

    # --- the Fence delivery calls -------------------------------------------------------------

    def holds(self, partition: int) -> bool:
        """Whether work on the partition may start now (the source's lease)."""
        return self._source.holds(partition)

    def epoch(self, partition: int) -> int:
        """Our lease epoch on the partition (the source's), sent with each store."""
        return self._source.epoch(partition)

    def fenced_out(self, partition: int, stored_epoch: int, reason: str) -> None:
        """Storage fenced a store of the partition out: the source drops it, and the next
        rebalance forgets its engine."""
        self._source.fenced_out(partition, stored_epoch, reason)

    async def ack(self, partition: int, entries: Sequence[Entry]) -> bool:
        """Process what was just stored and acknowledge what a checkpoint covers; False once
        the partition is not ours. CommitDeferred when storage could not take the outputs."""
        return (await self.ack_all([(partition, entries)]))[0]

    async def ack_all(self, acks: Sequence[tuple[int, Sequence[Entry]]]) -> list[bool]:
        """`ack` for several partitions; the acknowledgements go in one round trip."""
        ready: list[tuple[int, Sequence[Entry]]] = []
        lost: set[int] = set()
        deferred: CommitDeferred | None = None
        for partition, entries in acks:
            try:
                ackable = await self._process(partition, entries)
            except CommitDeferred as error:
                deferred = deferred or error
                continue
            if ackable is None:
                lost.add(partition)
            else:
                ready.append((partition, ackable))
        results = dict.fromkeys(lost, False)
        if ready:
            acked = await self._source.ack_all(ready)
            for (partition, _), ok in zip(ready, acked, strict=True):
                results[partition] = ok
                if not ok:
                    self.forget(partition)
        if deferred is not None:
            raise deferred
        return [results.get(partition, True) for partition, _ in acks]

    async def discard(self, partition: int, entries: Sequence[Entry]) -> bool:
        """Acknowledge entries whose events were not stored (dead letters): the engine never
        sees them, nor does a replay (they are no longer pending)."""
        return await self._source.ack(partition, entries)

    # --- the source's hooks -------------------------------------------------------------------

    def position(self, partition: int) -> str:
        """Where a re-read of the partition's pending entries starts: after what its engine
        already holds (those wait, pending, for the next checkpoint), or from the start."""
        state = self._partitions.get(partition)
        return "0" if state is None or not state.scanned else state.scanned

    def forget(self, partition: int) -> None:
        """The partition was lost or taken over anew: its state in memory is no longer ours."""
        self._partitions.pop(partition, None)

    async def release(self, partitions: Sequence[int]) -> None:
        """Before leases are given back: save each partition's state and acknowledge what it
        covers, so the next owner replays nothing. A failure only means more replay."""
        for partition in partitions:
            state = self._partitions.get(partition)
            if state is not None and self._source.holds(partition):
                try:
                    ackable = await self._commit(partition, state, checkpoint=True)
                    await self._source.ack(partition, ackable)
                except (CommitDeferred, _Lost) as error:
                    log.warning(
                        "partition %d released without a final checkpoint: %s", partition, error
                    )
            self.forget(partition)

    async def tick(self, busy: Sequence[int]) -> None:
        """Between rounds: partitions that had no entries let their engines see processing
        time (an idle partition's watermark advances, closing its windows), and checkpoints
        that are due by time are saved."""
        now = time.monotonic()
        if now < self._next_idle_poll:
            return
        self._next_idle_poll = now + self._config.idle_poll_seconds
        if self._definitions.is_ready() and self._definitions.active_tenants():
            # A partition taken over without new entries still has open windows and patterns
            # to close by idleness: load its state too.
            for partition in sorted(self._source.active() - self._partitions.keys()):
                epoch = self._ownership.epoch(partition)
                if epoch:
                    try:
                        await self._load(partition, epoch)
                    except CommitDeferred as error:
                        log.warning("partition %d: %s (retried)", partition, error)
        quiet = [p for p in sorted(self._partitions) if p not in busy]
        acks: list[tuple[int, Sequence[Entry]]] = []
        for partition in quiet:
            state = self._partitions[partition]
            if self._ownership.epoch(partition) != state.epoch:
                self.forget(partition)
                continue
            self._refresh(state)
            self._merge(state, state.engine.process([], time.time_ns()))
            due = bool(state.uncovered) and self._due(state, now)
            if not (due or state.outputs):
                continue
            try:
                acks.append((partition, await self._commit(partition, state, checkpoint=due)))
            except CommitDeferred as error:
                log.warning("partition %d: %s (retried)", partition, error)
            except _Lost:
                continue
        acks = [(p, entries) for p, entries in acks if entries]
        if acks:
            for (partition, _), ok in zip(acks, await self._source.ack_all(acks), strict=True):
                if not ok:
                    self.forget(partition)

    # --- the engine ---------------------------------------------------------------------------

    async def _process(self, partition: int, entries: Sequence[Entry]) -> list[Entry] | None:
        """The entries that may be acknowledged now (None: the partition is lost)."""
        if not self._definitions.is_ready():
            raise CommitDeferred("the definitions are not loaded yet")
        state = self._partitions.get(partition)
        epoch = self._ownership.epoch(partition)
        if epoch == 0:
            self.forget(partition)
            return None
        if state is not None and state.epoch != epoch:
            self.forget(partition)
            state = None
        if state is None and not self._needs_engine(entries):
            return list(entries)  # nothing to run and nothing held back
        if state is None:
            state = await self._load(partition, epoch)
            if state is None:
                return None
        self._refresh(state)
        position = entry_id_key(state.engine.last_entry_id)
        ackable: list[Entry] = []
        fresh: list[Entry] = []
        for entry in entries:
            key = entry_id_key(entry[0].decode())
            if key <= state.checkpoint_entry:
                ackable.append(entry)  # in a saved checkpoint: acknowledged, not processed
            elif key <= position:
                state.uncovered.setdefault(entry[0], entry)  # in the state already
            else:
                fresh.append(entry)
        if fresh:
            # Only the entries of tenants with definitions are decoded (none, when no tenant
            # has any): the others' events never reach the engine, here or in a replay.
            active = self._definitions.active_tenants()
            events = engine_events(
                [e for e in fresh if not active.isdisjoint(entry_tenants(e[1]))], partition
            )
            self.events_processed += len(events)
            out = state.engine.process(events, time.time_ns(), last_entry_id=fresh[-1][0].decode())
            if out.duplicates:
                dropped = self.duplicates_dropped
                dropped[partition] = dropped.get(partition, 0) + out.duplicates
            self._merge(state, out)
            for entry in fresh:
                state.uncovered[entry[0]] = entry
            state.batches += 1
            state.last_batch_at = time.monotonic()
        due = bool(state.uncovered) and self._due(state, time.monotonic())
        if due or state.outputs:
            try:
                ackable.extend(await self._commit(partition, state, checkpoint=due))
            except _Lost:
                return None
        # Only now (a failure above re-reads these entries, which is harmless: they are
        # acknowledged or held again as they are, not processed twice).
        last = entries[-1][0].decode()
        if entry_id_key(last) > entry_id_key(state.scanned):
            state.scanned = last
        return ackable

    def _needs_engine(self, entries: Sequence[Entry]) -> bool:
        active = self._definitions.active_tenants()
        return bool(active) and any(not active.isdisjoint(entry_tenants(f)) for _, f in entries)

    def _refresh(self, state: _Partition) -> None:
        """Take up the definitions as they are now, at this batch boundary."""
        version = self._definitions.version
        if state.definitions == version:
            return
        windows, rules = self._definitions.windows_and_rules()
        try:
            state.engine.set_definitions(windows, rules)
        except RuleSetError as error:
            log.error("partition %d keeps its definitions: %s", state.engine.partition, error)
        state.definitions = version

    def _due(self, state: _Partition, now: float) -> bool:
        return (
            state.batches >= self._config.checkpoint_batches
            or now - state.checkpointed_at >= self._config.checkpoint_seconds
        )

    @staticmethod
    def _merge(state: _Partition, out: PartitionOutputs) -> None:
        held = state.outputs
        held.window_results.extend(out.window_results)
        held.window_late.extend(out.window_late)
        held.alerts.extend(out.alerts)
        held.rule_late.extend(out.rule_late)

    async def _load(self, partition: int, epoch: int) -> _Partition | None:
        """Take the partition's state over: raise the fence to our epoch, restore."""
        try:
            saved = await self._store.load(self._stream, partition, epoch)
        except Fenced as error:
            saved, epoch = await self._fenced_on_load(partition, epoch, error)
            if not epoch:
                return None
        except (StoreUnavailable, grpc.aio.AioRpcError) as error:
            raise CommitDeferred(f"engine checkpoint load: {describe(error)}") from error
        windows, rules = self._definitions.windows_and_rules()
        clock = self._config.clock
        try:
            engine = (
                PartitionEngine.restore(saved.snapshot, clock, windows, rules, partition=partition)
                if saved is not None
                else PartitionEngine(partition, clock, windows, rules)
            )
        except SnapshotError as error:
            # Starting empty would compute other outputs than those committed: the partition
            # waits (pending) for an operator, and the other partitions go on.
            log.critical("partition %d: its checkpoint does not restore: %s", partition, error)
            raise CommitDeferred(f"partition {partition}: checkpoint does not restore") from error
        except RuleSetError as error:
            log.error("partition %d: definitions refused: %s", partition, error)
            engine = (
                PartitionEngine.restore(saved.snapshot, clock, windows, (), partition=partition)
                if saved
                else PartitionEngine(partition, clock, windows)
            )
        covered = entry_id_key(saved.last_entry_id) if saved is not None else (-1, -1)
        log.info(
            "partition %d: engine at entry %s (lease epoch %d)",
            partition,
            engine.last_entry_id or "-",
            epoch,
        )
        state = _Partition(epoch, engine, self._definitions.version, covered)
        self._partitions[partition] = state
        return state

    async def _fenced_on_load(
        self, partition: int, epoch: int, error: Fenced
    ) -> tuple[pb.EngineCheckpoint | None, int]:
        """Storage's fence is above our epoch. If the Redis lease still names us, Redis lost its
        epoch counter (a restart without its data): move it past storage's and load again.
        Otherwise the partition has a newer owner: (None, 0)."""
        found = _STORED_EPOCH.search(str(error))
        if found is None:
            self._ownership.drop(partition, f"fenced by storage: {error}")
            return None, 0
        raised = await self._ownership.raise_epoch(partition, int(found.group(1)) + 1)
        if not raised:
            self._ownership.drop(partition, f"fenced by storage: {error}")
            return None, 0
        log.warning(
            "partition %d: lease epoch moved from %d to %d (storage's fence)",
            partition,
            epoch,
            raised,
        )
        try:
            return await self._store.load(self._stream, partition, raised), raised
        except Fenced as again:
            self._ownership.drop(partition, f"fenced by storage: {again}")
            return None, 0

    async def _commit(self, partition: int, state: _Partition, *, checkpoint: bool) -> list[Entry]:
        """Store the held outputs (fenced), with the state when `checkpoint`; the entries the
        saved state covers (to acknowledge), [] without a checkpoint. CommitDeferred on an
        outage (everything stays held, to send again); Fenced drops the partition."""
        out = state.outputs
        parts = _split(out)
        saved: pb.EngineCheckpoint | None = None
        if checkpoint:
            saved = pb.EngineCheckpoint(
                stream=self._stream,
                partition=partition,
                lease_epoch=state.epoch,
                last_entry_id=state.engine.last_entry_id,
                snapshot=state.engine.snapshot(),
            )
        fence = pb.PartitionFence(stream=self._stream, partition=partition, lease_epoch=state.epoch)
        try:
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                if not part and not (last and saved is not None):
                    continue
                await self._store.store(
                    outputs_request(
                        part,
                        checkpoint=saved if last else None,
                        fence=None if last and saved is not None else fence,
                    )
                )
        except Fenced as error:
            self._ownership.drop(partition, f"fenced by storage: {error}")
            self.forget(partition)
            raise _Lost from error
        except (StoreUnavailable, grpc.aio.AioRpcError) as error:
            # An outage, or a refusal that is a bug of ours (logged): nothing is acknowledged,
            # and the same outputs go again with the next call.
            if not isinstance(error, StoreUnavailable):
                log.error(
                    "partition %d: storage refused the engine outputs: %s",
                    partition,
                    describe(error),
                )
            raise CommitDeferred(f"engine outputs: {describe(error)}") from error
        self.window_results_stored += len(out.window_results)
        self.late_events_stored += len(out.window_late) + len(out.rule_late)
        self.alerts_stored += len(out.alerts)
        state.outputs = PartitionOutputs()
        if saved is None:
            return []
        self.checkpoints += 1
        state.checkpoint_entry = entry_id_key(saved.last_entry_id)
        state.batches = 0
        state.checkpointed_at = time.monotonic()
        covered = list(state.uncovered.values())
        state.uncovered.clear()
        return covered


def _split(out: PartitionOutputs) -> list[PartitionOutputs]:
    """The outputs in parts of at most MAX_ITEMS items (at least one part, maybe empty)."""
    items = [
        *(("window_results", x) for x in out.window_results),
        *(("window_late", x) for x in out.window_late),
        *(("alerts", x) for x in out.alerts),
        *(("rule_late", x) for x in out.rule_late),
    ]
    if len(items) <= MAX_ITEMS:
        return [out]
    parts = []
    for start in range(0, len(items), MAX_ITEMS):
        part = PartitionOutputs()
        for name, item in items[start : start + MAX_ITEMS]:
            getattr(part, name).append(item)
        parts.append(part)
    return parts
