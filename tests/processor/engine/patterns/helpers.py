"""Small builders for the pattern engine's unit tests."""

from __future__ import annotations

from typing import Any

from services.processor.engine.events import EngineEvent
from services.processor.engine.patterns import Alert, PatternEngine, parse_rule

__all__ = ["engine_with", "event", "ids_of", "rule"]


def event(
    event_id: str,
    t: int,
    event_type: str = "a",
    key: str = "k",
    tenant: str = "default",
    **payload: Any,
) -> EngineEvent:
    return EngineEvent(
        id=event_id, key=key, type=event_type, event_time_nanos=t, tenant=tenant, payload=payload
    )


def rule(kind: str, rule_id: str = "r", version: int = 1, **fields: Any) -> dict[str, Any]:
    return {"id": rule_id, "version": version, "kind": kind, **fields}


def engine_with(*documents: dict[str, Any]) -> PatternEngine:
    engine = PatternEngine()
    engine.apply_rules([parse_rule(document) for document in documents])
    return engine


def ids_of(alerts: list[Alert]) -> list[tuple[str, ...]]:
    return [alert.event_ids for alert in alerts]
