"""The shape every rule kind's logic has, after bytewax's StatefulBatchLogic: an event hook, a
watermark (timer) hook, a snapshot of the state, and an explicit "has state" answer the engine
uses to drop what is finished.

A matcher sees events one at a time in event-time order (the engine sorts them and only hands
over events at or before the watermark), each already known to be of the rule's tenant and of
an event type the rule can use, and with `activation <= event time < stop_at`.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any

from services.processor.engine.events import EngineEvent, compile_field_path
from services.processor.engine.patterns.alerts import Alert, alert_id
from streammesh.definitions.conditions import EventPredicate, compile_condition
from streammesh.definitions.rules import EventPattern, Rule

__all__ = ["NEVER", "KeyOf", "Matcher", "compile_key", "compile_pattern"]

NEVER = 2**63
"""An event time no event reaches: 'no boundary'."""

KeyOf = Callable[[EngineEvent], str | None]


def compile_key(path: str) -> KeyOf:
    """What a rule groups by. The event key is the common case and costs one C attribute read;
    a payload field is turned into text (an event lacking it, or with an object there, is
    outside the rule)."""
    if path == "key":
        return attrgetter("key")
    get = compile_field_path(path)

    def key_of(event: EngineEvent) -> str | None:
        value = get(event)
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        return None

    return key_of


def compile_pattern(pattern: EventPattern, *, type_checked: bool = False) -> EventPredicate:
    """A predicate for a pattern. `type_checked`: the engine's type index already guarantees
    the event's type, so the type test is left out."""
    where = None if pattern.where is None else compile_condition(pattern.where)
    types = None if type_checked else pattern.types
    if types is None:
        return where if where is not None else (lambda event: True)
    if where is None:
        return lambda event: event.type in types
    return lambda event: event.type in types and where(event)


def _union(patterns: list[EventPattern]) -> frozenset[str] | None:
    types: set[str] = set()
    for pattern in patterns:
        if pattern.types is None:
            return None
        types |= pattern.types
    return frozenset(types)


class Matcher:
    """The logic of one rule version. `activation`, `start_until` and `stop_at` are set by the
    engine: the version matches events from `activation`; it may start new partial matches only
    before `start_until` (the next version's activation) and keeps completing the ones it has
    after that; at `stop_at` (a later disabled version's activation) it stops and its state is
    dropped."""

    kind = ""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.activation = rule.activation_nanos
        self.start_until = NEVER
        self.stop_at = NEVER
        self.key_of = compile_key(rule.key_field)
        self.states: dict[str, Any] = {}
        self._next_sweep = -NEVER

    def event_types(self) -> frozenset[str] | None:
        """The event types this matcher needs to see (None: all of them)."""
        return _union(self.patterns())

    def patterns(self) -> list[EventPattern]:
        raise NotImplementedError

    def on_event(self, event: EngineEvent, out: list[Alert]) -> None:
        raise NotImplementedError

    def on_watermark(self, watermark: int, out: list[Alert]) -> None:
        """Every event at or before `watermark` has been seen. Fires timers; now and then drops
        partial matches that no future event can complete (that changes no output, only size)."""
        if watermark >= self._next_sweep:
            self.sweep(watermark)
            self._next_sweep = watermark + self.sweep_every()

    def compact(self, watermark: int) -> None:
        """Sweep now and schedule the next sweep from here, as `on_watermark` would: called
        before a snapshot, so that the saved state does not depend on when sweeps last ran."""
        self.sweep(watermark)
        self.schedule_sweep(watermark)

    def schedule_sweep(self, watermark: int) -> None:
        """The next sweep as if one ran at `watermark` (a restored matcher's state was swept
        there by `compact`)."""
        self._next_sweep = watermark + self.sweep_every()

    def sweep(self, watermark: int) -> None:
        """Drop state that has expired for every event after `watermark`."""

    def sweep_every(self) -> int:
        return NEVER

    def has_state(self) -> bool:
        return bool(self.states)

    def snapshot_state(self) -> Any:
        raise NotImplementedError

    def restore_state(self, data: Any) -> None:
        raise NotImplementedError

    def alert(
        self,
        key: str,
        event_ids: tuple[str, ...],
        first: int,
        last: int,
        detail: dict[str, Any],
    ) -> Alert:
        rule = self.rule
        return Alert(
            alert_id=alert_id(rule.tenant, rule.id, rule.version, key, event_ids),
            rule_id=rule.id,
            rule_version=rule.version,
            tenant=rule.tenant,
            kind=rule.kind,
            key=key,
            first_event_time_nanos=first,
            last_event_time_nanos=last,
            event_ids=event_ids,
            detail=detail,
        )
