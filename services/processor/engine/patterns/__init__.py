"""Pattern rules (complex event processing) over one partition's events: threshold, rate,
sequence and absence rules given as data, matched in event-time order, with alerts whose ids are
deterministic and a state that snapshots to bytes. See engine.py for how the worker drives it,
ruleset.py for what a new rule version does, and rules.py for the rule document."""

from services.processor.engine.patterns.alerts import Alert, LateEvent, PatternOutput, alert_id
from services.processor.engine.patterns.engine import (
    SNAPSHOT_FORMAT,
    PatternEngine,
    PatternEngineConfig,
    SnapshotError,
)
from streammesh.definitions.rule_errors import RuleError, RuleSetError
from streammesh.definitions.rules import (
    KINDS,
    Rule,
    parse_duration,
    parse_rule,
    parse_rules,
)

__all__ = [
    "KINDS",
    "SNAPSHOT_FORMAT",
    "Alert",
    "LateEvent",
    "PatternEngine",
    "PatternEngineConfig",
    "PatternOutput",
    "Rule",
    "RuleError",
    "RuleSetError",
    "SnapshotError",
    "alert_id",
    "parse_duration",
    "parse_rule",
    "parse_rules",
]
