"""The versions of the rules an engine runs, and how a new rule set replaces the old one.

Version change (all by event time, so a replay does the same):
- A version matches the events with `activation <= event time`. Its activation is the rule's,
  or the partition's watermark + 1 ns when that is later: events the engine has already matched
  are never matched again, and the version change is not retroactive.
- The previous version stops *starting* matches at the new version's activation, but the partial
  matches it began before it (a half-seen sequence, an absence being waited for, a rate window
  or a threshold's qualifying events that began before the activation) run on until they
  complete or expire by `within`, then the old version is gone. Chosen over dropping them because a rule edit (a new version) must not
  lose an attack already half-seen; it is bounded, since every partial match expires (a
  threshold with `count` > 1 and no `within` is the exception: it drains only when it fires).
  An event after the activation can therefore complete an old version's match and also count
  for the new version: the alerts differ by `rule_version`.
- A disabled version stops the older versions at its activation: they drop their partial
  state once the watermark passes it (absences due before it still fire).
- A rule missing from the applied set is dropped at once, with its state: that is processing
  time, so to retire a rule replayably, apply a disabled version instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.processor.engine.patterns.matcher_base import NEVER, Matcher
from services.processor.engine.patterns.matchers_counting import RateMatcher, ThresholdMatcher
from services.processor.engine.patterns.matchers_ordered import AbsenceMatcher, SequenceMatcher
from streammesh.definitions.rule_errors import RuleSetError
from streammesh.definitions.rules import Rule

__all__ = ["KnownVersion", "RuleSet", "build_matcher"]

_MATCHERS: dict[str, type[Matcher]] = {
    "threshold": ThresholdMatcher,
    "rate": RateMatcher,
    "sequence": SequenceMatcher,
    "absence": AbsenceMatcher,
}

RuleRef = tuple[str, str, int]
Slot = tuple[str, str]


def build_matcher(rule: Rule) -> Matcher:
    return _MATCHERS[rule.kind](rule)


@dataclass(slots=True)
class KnownVersion:
    """A version the engine has been given: its effective activation, and its matcher while it
    still runs (None for a disabled version and for one that has finished)."""

    rule: Rule
    activation: int
    matcher: Matcher | None


class RuleSet:
    """Every known version, by (tenant, rule id); the index the engine dispatches events with."""

    def __init__(self) -> None:
        self.versions: dict[Slot, dict[int, KnownVersion]] = {}
        self.index: dict[str, tuple[dict[str, tuple[Matcher, ...]], tuple[Matcher, ...]]] = {}
        self.matchers: tuple[Matcher, ...] = ()

    def apply(self, rules: Iterable[Rule], watermark: int) -> None:
        given: dict[Slot, dict[int, Rule]] = {}
        for rule in rules:
            slot = (rule.tenant, rule.id)
            same = given.setdefault(slot, {}).get(rule.version)
            if same is not None and same != rule:
                raise RuleSetError(
                    f"rule {rule.id} version {rule.version}: given twice, differently"
                )
            given[slot][rule.version] = rule
        updated: dict[Slot, dict[int, KnownVersion]] = {}
        for slot, rules_by_version in given.items():
            known = self.versions.get(slot, {})
            newest_given = max(rules_by_version)
            # Older versions not given again are kept while they drain their partial matches.
            kept = {v: k for v, k in known.items() if v < newest_given}
            newest_known = max(known) if known else 0
            for version, rule in rules_by_version.items():
                existing = known.get(version)
                if existing is not None:
                    if existing.rule != rule:
                        raise RuleSetError(
                            f"rule {rule.id} version {version}: changed; a change is a new version"
                        )
                    kept[version] = existing
                elif version > newest_known:
                    matcher = build_matcher(rule) if rule.enabled else None
                    activation = max(rule.activation_nanos, watermark + 1)
                    kept[version] = KnownVersion(rule, activation, matcher)
                # An unknown version older than a known one has been superseded: skipped.
            _check_order(slot, kept)
            updated[slot] = kept
        self.versions = updated
        self.refresh()

    def restore_version(self, rule: Rule, activation: int, running: bool) -> KnownVersion:
        matcher = build_matcher(rule) if running and rule.enabled else None
        known = KnownVersion(rule, activation, matcher)
        self.versions.setdefault((rule.tenant, rule.id), {})[rule.version] = known
        return known

    def finish(self, watermark: int) -> bool:
        """Drop versions that are done: stopped by a disabled version, or superseded with no
        partial match left. True when the index changed."""
        changed = False
        for known_versions in self.versions.values():
            for known in known_versions.values():
                matcher = known.matcher
                if matcher is None:
                    continue
                if matcher.stop_at <= watermark or (
                    matcher.start_until <= watermark and not matcher.has_state()
                ):
                    known.matcher = None
                    changed = True
        if changed:
            self.refresh()
        return changed

    def refresh(self) -> None:
        """Recompute every running version's boundaries and the event index."""
        for known_versions in self.versions.values():
            ordered = [known_versions[v] for v in sorted(known_versions)]
            for i, known in enumerate(ordered):
                if known.matcher is None:
                    continue
                later = ordered[i + 1 :]
                known.matcher.activation = known.activation
                known.matcher.start_until = later[0].activation if later else NEVER
                known.matcher.stop_at = next(
                    (k.activation for k in later if not k.rule.enabled), NEVER
                )
        self._build_index()

    def _build_index(self) -> None:
        matchers = [
            known.matcher
            for known_versions in self.versions.values()
            for _, known in sorted(known_versions.items())
            if known.matcher is not None
        ]
        self.matchers = tuple(matchers)
        by_tenant: dict[str, tuple[dict[str, list[Matcher]], list[Matcher]]] = {}
        for matcher in matchers:
            typed, anything = by_tenant.setdefault(matcher.rule.tenant, ({}, []))
            types = matcher.event_types()
            if types is None:
                anything.append(matcher)
            else:
                for event_type in types:
                    typed.setdefault(event_type, []).append(matcher)
        index: dict[str, tuple[dict[str, tuple[Matcher, ...]], tuple[Matcher, ...]]] = {}
        for tenant, (typed, anything) in by_tenant.items():
            # Each type's tuple also holds the any-type matchers: one lookup per event.
            index[tenant] = (
                {t: tuple(ms) + tuple(anything) for t, ms in typed.items()},
                tuple(anything),
            )
        self.index = index


def _check_order(slot: Slot, versions: dict[int, KnownVersion]) -> None:
    previous: KnownVersion | None = None
    for version in sorted(versions):
        known = versions[version]
        if previous is not None and known.rule.activation_nanos < previous.rule.activation_nanos:
            raise RuleSetError(
                f"rule {slot[1]} version {version}: activates before version "
                f"{previous.rule.version}; a newer version must not activate earlier"
            )
        previous = known
