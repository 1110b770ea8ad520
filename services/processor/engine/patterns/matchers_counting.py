"""Threshold and rate rules: count qualifying events per key within a sliding event-time span.

Both fire once `count` qualifying events of a key lie within `within` (last minus first event
time, inclusive) and then start over: the events of a match are not reused for the next one
(Flink CEP's "skip past last event"), so one burst gives one alert, not one per extra event.
"""

from __future__ import annotations

import operator
from collections import deque
from typing import Any

from services.processor.engine.events import EngineEvent, compile_field_path
from services.processor.engine.patterns.alerts import Alert
from services.processor.engine.patterns.matcher_base import NEVER, Matcher, compile_pattern
from streammesh.definitions.rules import EventPattern, RateSpec, Rule, ThresholdSpec

__all__ = ["RateMatcher", "ThresholdMatcher"]

_COMPARE = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}


class _Level:
    """A key's threshold state: is its last value beyond, and the qualifying events so far."""

    __slots__ = ("beyond", "hits")

    def __init__(self, beyond: bool) -> None:
        self.beyond = beyond
        self.hits: list[tuple[int, str, float]] = []


class ThresholdMatcher(Matcher):
    """A numeric field beyond a value.

    mode `crossing`: an event qualifies when its value is beyond and the key's previous value
    (among events matching the rule with a numeric field) was not; a key's first value counts as
    coming from "not beyond", so a sensor that starts hot alerts. mode `level`: every event with
    a value beyond qualifies. Events without a number in the field are ignored (they neither
    qualify nor reset a crossing).

    State: a key is kept while its last value is beyond (crossing mode) or it has qualifying
    events; a key below the threshold is forgotten, which is the same as never seen.
    """

    kind = "threshold"

    def __init__(self, rule: Rule) -> None:
        super().__init__(rule)
        spec = rule.spec
        assert isinstance(spec, ThresholdSpec)
        self.spec = spec
        self._match = compile_pattern(spec.match, type_checked=True)
        self._always = spec.match.where is None
        self._value = compile_field_path(spec.field)
        self._compare = _COMPARE[spec.op]
        self._crossing = spec.mode == "crossing"
        self._within = spec.within_nanos

    def patterns(self) -> list[EventPattern]:
        return [self.spec.match]

    def on_event(self, event: EngineEvent, out: list[Alert]) -> None:
        if not self._always and not self._match(event):
            return
        value = self._value(event)
        kind = value.__class__
        if kind is not float and kind is not int:
            return
        key = self.key_of(event)
        if key is None:
            return
        t = event.event_time_nanos
        states = self.states
        state: _Level | None = states.get(key)
        within = self._within
        if t >= self.start_until:
            # A superseded version only finishes what it started before the new version's
            # activation: once those qualifying events have expired, the key is done.
            hits = state.hits if state is not None else []
            if within is not None:
                while hits and t - hits[0][0] > within:
                    del hits[0]
            if not hits or hits[0][0] >= self.start_until:
                if state is not None:
                    del states[key]
                return
        beyond = self._compare(value, self.spec.value)
        if self._crossing:
            was = state is not None and state.beyond
            if state is not None:
                state.beyond = beyond
            if not beyond:
                if state is not None and not state.hits:
                    del states[key]
                return
            if was:
                return
        elif not beyond:
            return
        if state is None:
            state = states[key] = _Level(beyond)
        hits = state.hits
        if within is not None:
            while hits and t - hits[0][0] > within:
                del hits[0]
        hits.append((t, event.id, value))
        if len(hits) >= self.spec.count:
            out.append(
                self.alert(
                    key,
                    tuple(hit[1] for hit in hits),
                    hits[0][0],
                    t,
                    {
                        "field": self.spec.field,
                        "op": self.spec.op,
                        "value": self.spec.value,
                        "mode": self.spec.mode,
                        "values": [hit[2] for hit in hits],
                    },
                )
            )
            state.hits = []
            if not self._crossing:
                del states[key]

    def sweep(self, watermark: int) -> None:
        within = self._within
        retired = watermark >= self.start_until
        for key in list(self.states):
            state: _Level = self.states[key]
            if within is not None:
                state.hits = [hit for hit in state.hits if watermark - hit[0] < within]
            if not state.hits and (retired or not state.beyond):
                del self.states[key]

    def sweep_every(self) -> int:
        return self._within if self._within is not None else NEVER

    def snapshot_state(self) -> Any:
        return [
            [key, state.beyond, [list(hit) for hit in state.hits]]
            for key, state in self.states.items()
        ]

    def restore_state(self, data: Any) -> None:
        for key, beyond, hits in data:
            state = _Level(beyond)
            state.hits = [(t, event_id, value) for t, event_id, value in hits]
            self.states[key] = state


class RateMatcher(Matcher):
    """At least `count` matching events of a key within `within` (sliding by event time)."""

    kind = "rate"

    def __init__(self, rule: Rule) -> None:
        super().__init__(rule)
        spec = rule.spec
        assert isinstance(spec, RateSpec)
        self.spec = spec
        self._match = compile_pattern(spec.match, type_checked=True)
        self._always = spec.match.where is None
        self._within = spec.within_nanos
        self._count = spec.count

    def patterns(self) -> list[EventPattern]:
        return [self.spec.match]

    def on_event(self, event: EngineEvent, out: list[Alert]) -> None:
        if not self._always and not self._match(event):
            return
        key = self.key_of(event)
        if key is None:
            return
        t = event.event_time_nanos
        window: deque[tuple[int, str]] | None = self.states.get(key)
        if window is None:
            if t >= self.start_until:
                return
            window = self.states[key] = deque()
        else:
            within = self._within
            while window and t - window[0][0] > within:
                window.popleft()
            # A superseded version only finishes windows that began before the new version's
            # activation (else a steady stream would keep it alive for ever).
            if t >= self.start_until and (not window or window[0][0] >= self.start_until):
                del self.states[key]
                return
        window.append((t, event.id))
        if len(window) >= self._count:
            out.append(
                self.alert(
                    key,
                    tuple(item[1] for item in window),
                    window[0][0],
                    t,
                    {"count": len(window), "within_nanos": self._within},
                )
            )
            del self.states[key]

    def sweep(self, watermark: int) -> None:
        within = self._within
        for key in list(self.states):
            window: deque[tuple[int, str]] = self.states[key]
            while window and watermark - window[0][0] >= within:
                window.popleft()
            if not window:
                del self.states[key]

    def sweep_every(self) -> int:
        return self._within

    def snapshot_state(self) -> Any:
        return [[key, [list(item) for item in window]] for key, window in self.states.items()]

    def restore_state(self, data: Any) -> None:
        for key, items in data:
            self.states[key] = deque((t, event_id) for t, event_id in items)
