"""Repeated event ids, dropped before the windows: the queue can hold one (tenant, id) twice (a
publish retried after a lost ack beyond ingest's idempotency window, or an id a client reused),
while storage keeps it once, so a window that counted both would disagree with the stored events.

Memory is bounded by the windows' horizon, not by the stream: an event of time t can still change
a window of its tenant and type while t + horizon > watermark, where the horizon is the largest
`size + allowed_lateness` (tumbling, hopping: the latest window holding t ends by t + size) or
`gap + allowed_lateness` (session) of that tenant and type's definitions. Past it the event is
late for every window and goes to the late events whatever it is. So the ids of one tenant and
type are kept in buckets of event time (a quarter of the horizon wide), and a bucket is dropped
once its last instant is beyond the horizon; only the types some window reads are kept at all
(the rules keep their own recent ids: patterns/engine.py).

Decisions, all by event time and the watermark an event meets, so the same stream gives the same
drops however it was batched or restored:
- an id already in its bucket is a duplicate: dropped (counted), the windows and rules never see
  it, so it makes no late event either;
- an event whose bucket is beyond the horizon on arrival is passed on and not remembered: it is
  late for every window and becomes a late event (stored once by its identity, so a repeat of it
  is recorded once there); a repeat of an event counted on time that comes that late is recorded
  so too, as a late event, while the window result keeps counting it once.
A repeat is found by (tenant, type, id) within the bucket of its event time: a reused id with
another type or time is not a repeat here (storage's first copy wins there; see issue 10).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.processor.engine.window_defs import WindowDef

__all__ = ["DuplicateFilter", "horizons"]

_BUCKETS_PER_HORIZON = 4
"""Bucket width = horizon / this: ids stay at most a bucket longer than needed."""


def horizons(definitions: Sequence[WindowDef]) -> dict[str, dict[str, int]]:
    """tenant -> event type -> how long after an event's time it can still change a window."""
    out: dict[str, dict[str, int]] = {}
    for d in definitions:
        reach = (d.gap_nanos if d.kind == "session" else d.size_nanos) + d.allowed_lateness_nanos
        by_type = out.setdefault(d.tenant, {})
        by_type[d.event_type] = max(by_type.get(d.event_type, 0), reach)
    return out


class _Ids:
    """The remembered ids of one tenant and type: bucket index -> ids (a dict, so iteration
    is arrival order and a snapshot needs no sort)."""

    __slots__ = ("buckets", "horizon", "width")

    def __init__(self, horizon: int, width: int) -> None:
        self.horizon = horizon
        self.width = width
        self.buckets: dict[int, dict[str, None]] = {}

    def expired(self, bucket: int, watermark: int) -> bool:
        return (bucket + 1) * self.width - 1 + self.horizon <= watermark


class DuplicateFilter:
    """Drops repeated (tenant, type, id) events while a repeat could change a window. Pure."""

    def __init__(self, definitions: Sequence[WindowDef] = ()) -> None:
        self._state: dict[str, dict[str, _Ids]] = {}
        self.set_definitions(definitions)

    def set_definitions(self, definitions: Sequence[WindowDef]) -> None:
        """Follow these windows' horizons; ids of a type no window reads any more are dropped
        (a remembered type keeps its bucket width: any width is correct)."""
        state: dict[str, dict[str, _Ids]] = {}
        for tenant, by_type in horizons(definitions).items():
            kept = self._state.get(tenant, {})
            for event_type, horizon in by_type.items():
                ids = kept.get(event_type) or _Ids(horizon, max(1, horizon // _BUCKETS_PER_HORIZON))
                ids.horizon = horizon
                state.setdefault(tenant, {})[event_type] = ids
        self._state = state

    def seen(self, tenant: str, event_type: str, event_id: str, time: int, watermark: int) -> bool:
        """Whether this event repeats one taken before (then drop it); otherwise it is
        remembered when it can still change a window. `watermark` is the one it meets."""
        by_type = self._state.get(tenant)
        if by_type is None:
            return False
        ids = by_type.get(event_type)
        if ids is None:
            return False
        width = ids.width
        bucket = time // width
        # Inlined `ids.expired`: this runs once per event.
        expired = (bucket + 1) * width - 1 + ids.horizon <= watermark
        held = ids.buckets.get(bucket)
        if held is None:
            if not expired:
                ids.buckets[bucket] = {event_id: None}
            return False
        if expired:
            return False  # not yet swept: behave as if it were gone (batching must not matter)
        if event_id in held:
            return True
        held[event_id] = None
        return False

    def expire(self, watermark: int) -> None:
        """Drop the buckets beyond the horizon (after each batch, so a snapshot holds none)."""
        for by_type in self._state.values():
            for ids in by_type.values():
                gone = [b for b in ids.buckets if ids.expired(b, watermark)]
                for bucket in gone:
                    del ids.buckets[bucket]

    def held(self) -> int:
        """How many ids are remembered (for tests and a gauge)."""
        return sum(
            len(held)
            for by_type in self._state.values()
            for ids in by_type.values()
            for held in ids.buckets.values()
        )

    def snapshot(self) -> list[Any]:
        """The remembered ids as JSON-ready lists, in a deterministic (arrival) order; every
        followed type with its bucket width, so a restored filter buckets as this one does."""
        return [
            [tenant, event_type, ids.width, [[b, list(held)] for b, held in ids.buckets.items()]]
            for tenant, by_type in self._state.items()
            for event_type, ids in by_type.items()
        ]

    def restore(self, saved: list[Any]) -> None:
        """Take the ids `snapshot()` saved; those of types no window reads now are dropped."""
        for tenant, event_type, width, buckets in saved:
            current = self._state.get(tenant, {}).get(event_type)
            if current is None:
                continue
            if not (isinstance(width, int) and width > 0):
                raise ValueError(f"bucket width {width!r}")
            current.width = width
            current.buckets = {int(b): dict.fromkeys(held) for b, held in buckets}
