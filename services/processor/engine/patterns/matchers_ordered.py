"""Sequence and absence rules: patterns over the order of a key's events.

Sequence: A then B [then C ...] of one key with last minus first event time <= `within`.
- relaxed contiguity ("skip till next match"): events between the steps are allowed; each
  partial match takes the first later event that fits its next step.
- strict contiguity: the next event of the key that is in the rule's `scope` must fit the next
  step, or that partial match ends. `scope` (a pattern, default: every event of the key in the
  rule's tenant) says what "another event" is, so a rule can ignore heartbeats, say.
Every event that fits step 1 starts a partial match (also one that advanced another); when one
completes, the alert is raised and every partial match of the key is dropped (Flink CEP's "skip
past last event"), so overlapping starts give one alert, not one per start.

Absence: an event fitting `first` with no event fitting `absent` of the same key within
`within` after it (inclusive; an `absent` event at exactly first + within still counts). Each
`first` event waits on its own. It fires when the watermark reaches first + within, never by the
wall clock, so a replay gives the same alerts. An event fitting both patterns first ends the
earlier waits, then starts its own.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any

from services.processor.engine.events import EngineEvent
from services.processor.engine.patterns.alerts import Alert
from services.processor.engine.patterns.matcher_base import Matcher, compile_pattern
from streammesh.definitions.rules import AbsenceSpec, EventPattern, Rule, SequenceSpec

__all__ = ["AbsenceMatcher", "SequenceMatcher"]


class _Run:
    """A partial sequence match: when it started, the next step, the events taken so far."""

    __slots__ = ("ids", "start", "step")

    def __init__(self, start: int, step: int, ids: list[str]) -> None:
        self.start = start
        self.step = step
        self.ids = ids


class SequenceMatcher(Matcher):
    kind = "sequence"

    def __init__(self, rule: Rule) -> None:
        super().__init__(rule)
        spec = rule.spec
        assert isinstance(spec, SequenceSpec)
        self.spec = spec
        self._steps = [compile_pattern(step) for step in spec.steps]
        self._first = self._steps[0]
        # Step 1's type, tested inline: most events of a key with nothing under way are not
        # of it (the strict rule sees every event in its scope).
        self._first_types = spec.steps[0].types
        self._last_step = len(self._steps)
        self._strict = spec.contiguity == "strict"
        scope = spec.scope
        # Strict: the index sends only events of the scope's types, so only `where` is left.
        self._scope = (
            None
            if scope.where is None and (scope.types is None or self._strict)
            else compile_pattern(scope, type_checked=self._strict)
        )
        self._within = spec.within_nanos

    def patterns(self) -> list[EventPattern]:
        if self._strict:
            # Every event in scope matters: it may break a partial match.
            return [self.spec.scope]
        return list(self.spec.steps)

    def on_event(self, event: EngineEvent, out: list[Alert]) -> None:
        if self._scope is not None and not self._scope(event):
            return
        key = self.key_of(event)
        if key is None:
            return
        t = event.event_time_nanos
        runs: list[_Run] | None = self.states.get(key)
        if runs is None:
            # The common case: nothing under way for this key.
            first_types = self._first_types
            if (
                t < self.start_until
                and (first_types is None or event.type in first_types)
                and self._first(event)
            ):
                self.states[key] = [_Run(t, 1, [event.id])]
            return
        if runs:
            within = self._within
            # Runs are in start order: the expired ones are a prefix.
            expired = 0
            while expired < len(runs) and t - runs[expired].start > within:
                expired += 1
            if expired:
                del runs[:expired]
            steps = self._steps
            survivors: list[_Run] = []
            for run in runs:
                if steps[run.step](event):
                    run.ids.append(event.id)
                    run.step += 1
                    if run.step == self._last_step:
                        del self.states[key]
                        out.append(
                            self.alert(
                                key,
                                tuple(run.ids),
                                run.start,
                                t,
                                {
                                    "steps": self._last_step,
                                    "contiguity": self.spec.contiguity,
                                    "within_nanos": within,
                                },
                            )
                        )
                        return
                    survivors.append(run)
                elif not self._strict:
                    survivors.append(run)
            runs[:] = survivors
        if t < self.start_until and self._first(event):
            runs.append(_Run(t, 1, [event.id]))
        elif not runs:
            del self.states[key]

    def sweep(self, watermark: int) -> None:
        within = self._within
        for key in list(self.states):
            runs: list[_Run] = self.states[key]
            runs[:] = [run for run in runs if watermark - run.start < within]
            if not runs:
                del self.states[key]

    def sweep_every(self) -> int:
        return self._within

    def snapshot_state(self) -> Any:
        return [
            [key, [[run.start, run.step, run.ids] for run in runs]]
            for key, runs in self.states.items()
        ]

    def restore_state(self, data: Any) -> None:
        for key, runs in data:
            self.states[key] = [_Run(start, step, list(ids)) for start, step, ids in runs]


class AbsenceMatcher(Matcher):
    kind = "absence"

    def __init__(self, rule: Rule) -> None:
        super().__init__(rule)
        spec = rule.spec
        assert isinstance(spec, AbsenceSpec)
        self.spec = spec
        self._first = compile_pattern(spec.first)
        self._absent = compile_pattern(spec.absent)
        self._within = spec.within_nanos
        # (deadline, key, first event id): a wait that was ended by an `absent` event stays in
        # the heap and is skipped when it comes up (its key's queue no longer starts with it).
        self._timers: list[tuple[int, str, str]] = []

    def patterns(self) -> list[EventPattern]:
        return [self.spec.first, self.spec.absent]

    def has_state(self) -> bool:
        return bool(self.states) or bool(self._timers)

    def on_event(self, event: EngineEvent, out: list[Alert]) -> None:
        key = self.key_of(event)
        if key is None:
            return
        t = event.event_time_nanos
        waiting: deque[tuple[int, str]] | None = self.states.get(key)
        if waiting is not None and self._absent(event):
            within = self._within
            # Waits that ran out before this event are absences even though their timer has
            # not come up yet (it would fire at the end of this batch).
            while waiting and waiting[0][0] + within < t:
                self._fire(key, waiting.popleft(), out)
            del self.states[key]
            waiting = None
        if t < self.start_until and self._first(event):
            if waiting is None:
                waiting = self.states[key] = deque()
            waiting.append((t, event.id))
            heapq.heappush(self._timers, (t + self._within, key, event.id))

    def on_watermark(self, watermark: int, out: list[Alert]) -> None:
        timers = self._timers
        while timers and timers[0][0] <= watermark:
            _, key, event_id = heapq.heappop(timers)
            waiting = self.states.get(key)
            if waiting and waiting[0][1] == event_id:
                self._fire(key, waiting.popleft(), out)
                if not waiting:
                    del self.states[key]

    def _fire(self, key: str, first: tuple[int, str], out: list[Alert]) -> None:
        t, event_id = first
        out.append(
            self.alert(
                key,
                (event_id,),
                t,
                t,
                {"deadline_nanos": t + self._within, "within_nanos": self._within},
            )
        )

    def snapshot_state(self) -> Any:
        return {
            "waiting": [
                [key, [list(item) for item in items]] for key, items in self.states.items()
            ],
            "timers": [list(timer) for timer in self._timers],
        }

    def restore_state(self, data: Any) -> None:
        for key, items in data["waiting"]:
            self.states[key] = deque((t, event_id) for t, event_id in items)
        # The list was a heap when it was saved; its order is kept, so it still is one.
        self._timers = [(deadline, key, event_id) for deadline, key, event_id in data["timers"]]
