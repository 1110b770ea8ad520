"""The audit log: one row per security event, in Postgres, read newest first.

An event says who acted (actor), on which account (subject), what happened (action), how it ended
(outcome), why it failed (reason), from where (source), a few details, and which tenant it belongs
to (the account's, else the actor's; empty for platform events): a tenant admin reads only its
tenant's events. It never holds a
password, code, token, challenge, recovery code or secret: the flows build events from names and
ids only, and events reported by the edge are checked for token-shaped values.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from services.auth.tables import audit_events
from streammesh.mesh.tenancy import TENANT_RULE, canonical_tenant

__all__ = [
    "ACTOR_PATTERN",
    "AUTH_ACTIONS",
    "OUTCOMES",
    "AuditEvent",
    "AuditLog",
    "AuditQuery",
    "Outcome",
    "edge_event_problems",
]

log = logging.getLogger(__name__)


class Outcome:
    """The three outcomes an event can have."""

    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"


OUTCOMES = frozenset({Outcome.SUCCESS, Outcome.FAILURE, Outcome.DENIED})

# Actions auth records itself; the edge cannot report them (RecordAuditEvent refuses them), so
# a row with one of these always comes from auth.
AUTH_ACTIONS = frozenset(
    {
        "register",
        "totp_enroll_begin",
        "totp_enroll_confirm",
        "login_password",
        "login",
        "lockout",
        "unlock",
        "refresh",
        "logout",
        "user_created",
        "role_change",
        "user_disabled",
        "user_enabled",
        "mfa_reset",
        "sessions_revoked",
        "key_rotation",
        "key_retired",
        "list_users",
        "list_signing_keys",
        "list_audit_events",
        "tenant_created",
        "tenant_disabled",
        "tenant_enabled",
        "list_tenants",
        "get_tenant",
    }
)

ACTOR_PATTERN = re.compile(
    r"anonymous|user:[a-z0-9._-]{3,64}|service:[a-z0-9-]{1,63}|operator:[A-Za-z0-9._-]{1,63}"
)
_ACTION = re.compile(r"[a-z][a-z0-9_]{0,63}")
_REASON = re.compile(r"[a-z0-9_]{0,64}")
_SUBJECT = re.compile(r"[a-z0-9._-]{0,64}")
_DETAIL_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_MAX_SOURCE = 128
_MAX_DETAILS = 16
_MAX_DETAIL_VALUE = 256
# Values that look like credentials: a JWT (base64url JSON header "eyJ...") or our opaque tokens.
_CREDENTIAL_SHAPED = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.|sm[rc]_[A-Za-z0-9_-]{16,}")


@dataclass(frozen=True)
class AuditEvent:
    """One security event; `event_id` and `time` are assigned on recording when unset."""

    actor: str
    action: str
    outcome: str
    subject: str = ""
    reason: str = ""
    source: str = ""
    details: Mapping[str, str] = field(default_factory=dict)
    event_id: uuid.UUID | None = None
    time: dt.datetime | None = None
    tenant: str = ""


@dataclass(frozen=True)
class AuditQuery:
    """Exact-match filters (empty = any) and a time range [start, end)."""

    tenant: str = ""
    actor: str = ""
    subject: str = ""
    action: str = ""
    outcome: str = ""
    start: dt.datetime | None = None
    end: dt.datetime | None = None


def edge_event_problems(event: AuditEvent) -> list[tuple[str, str]]:
    """Why an event reported through RecordAuditEvent cannot be stored (field, problem)."""
    problems: list[tuple[str, str]] = []

    def check(name: str, value: str, pattern: re.Pattern[str], rule: str) -> None:
        if not pattern.fullmatch(value):
            problems.append((f"event.{name}", rule))

    check(
        "actor",
        event.actor,
        ACTOR_PATTERN,
        "anonymous, user:<name>, service:<name> or operator:<name>",
    )
    check("action", event.action, _ACTION, "1 to 64 of a-z, 0-9, '_', starting with a letter")
    if event.action in AUTH_ACTIONS:
        problems.append(("event.action", "is recorded by auth itself"))
    if event.outcome not in OUTCOMES:
        problems.append(("event.outcome", "success, failure or denied"))
    check("reason", event.reason, _REASON, "at most 64 of a-z, 0-9, '_'")
    check("subject", event.subject, _SUBJECT, "empty or a username")
    if event.tenant and canonical_tenant(event.tenant) != event.tenant:
        problems.append(("event.tenant", f"empty or {TENANT_RULE}"))
    if len(event.source) > _MAX_SOURCE or not _PRINTABLE.fullmatch(event.source):
        problems.append(("event.source", f"at most {_MAX_SOURCE} printable ASCII characters"))
    if len(event.details) > _MAX_DETAILS:
        problems.append(("event.details", f"at most {_MAX_DETAILS} entries"))
    for key, value in event.details.items():
        if not _DETAIL_KEY.fullmatch(key):
            problems.append(("event.details", "keys are 1 to 64 of a-z, 0-9, '_'"))
        elif len(value) > _MAX_DETAIL_VALUE or not _PRINTABLE.fullmatch(value):
            problems.append(
                (f"event.details[{key}]", f"at most {_MAX_DETAIL_VALUE} printable ASCII characters")
            )
    texts = [event.subject, event.source, event.reason, *event.details.values()]
    if any(_CREDENTIAL_SHAPED.search(text) for text in texts):
        problems.append(("event", "must not contain a token"))
    return problems


def _event(row: Row[Any]) -> tuple[AuditEvent, int]:
    event = AuditEvent(
        actor=row.actor,
        action=row.action,
        outcome=row.outcome,
        subject=row.subject,
        reason=row.reason,
        source=row.source,
        details=dict(row.details),
        event_id=row.event_id,
        time=row.occurred_at,
        tenant=row.tenant,
    )
    return event, int(row.id)


class AuditLog:
    """Writes and reads the audit_events table."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def record(self, event: AuditEvent) -> None:
        """Store one event. Recording the same `event_id` twice stores it once (edge retries)."""
        values: dict[str, Any] = {
            "event_id": event.event_id or uuid.uuid4(),
            "actor": event.actor,
            "subject": event.subject,
            "action": event.action,
            "outcome": event.outcome,
            "reason": event.reason,
            "source": event.source,
            "details": dict(event.details),
            "tenant": event.tenant,
        }
        if event.time is not None:
            values["occurred_at"] = event.time
        statement = insert(audit_events).values(**values).on_conflict_do_nothing()
        async with self._engine.begin() as conn:
            await conn.execute(statement)
        log.info(
            "audit %s %s%s subject=%s actor=%s tenant=%s",
            event.action,
            event.outcome,
            f" ({event.reason})" if event.reason else "",
            event.subject or "-",
            event.actor,
            event.tenant or "-",
        )

    async def query(
        self, query: AuditQuery, *, limit: int, before: tuple[dt.datetime, int] | None
    ) -> list[tuple[AuditEvent, int]]:
        """Up to `limit` matching events, newest first, strictly older than the `before`
        position (time, row id); each with its row id for the next page's position."""
        table = audit_events
        statement = select(table).order_by(table.c.occurred_at.desc(), table.c.id.desc())
        for column, value in (
            (table.c.tenant, query.tenant),
            (table.c.actor, query.actor),
            (table.c.subject, query.subject),
            (table.c.action, query.action),
            (table.c.outcome, query.outcome),
        ):
            if value:
                statement = statement.where(column == value)
        if query.start is not None:
            statement = statement.where(table.c.occurred_at >= query.start)
        if query.end is not None:
            statement = statement.where(table.c.occurred_at < query.end)
        if before is not None:
            statement = statement.where(tuple_(table.c.occurred_at, table.c.id) < tuple(before))
        async with self._engine.connect() as conn:
            return [_event(row) for row in await conn.execute(statement.limit(limit))]
