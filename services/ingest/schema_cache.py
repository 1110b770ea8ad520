"""Ingest's cache of compiled payload validators, by (tenant, type, version), kept fresh by
following storage's change log.

Freshness: a background task asks storage for changes after the last change id it saw every
`poll_interval` (0.5 s by default), and reloads (or drops) what it cached for each (tenant,
type) named; a new version is in use within one interval plus a call, well inside the 2 s the
registry promises. Polling was chosen over a watch stream or Redis notifications: storage has
no Redis, a stream needs reconnection and resume logic on both sides that a cursor gives for
free, and the cost is bounded and small: one indexed `max(change_id)` query per replica per
interval (20 ingest replicas at 0.5 s are 40 tiny queries a second), and changes are rare.

Outages: the cache keeps everything it holds while storage is unreachable, so types already
seen keep being validated; the cursor stays where it was and resumes when storage is back, so
no change is missed. A type not cached while storage is unreachable is resolved as `Outcome`
says (see `SchemaCache.resolve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from services.ingest.payload_schema import PayloadValidator, SchemaNotCompiled
from services.ingest.registry_client import Change, RegistryUnavailable, StoredSchema
from streammesh.mesh.logs import LogThrottle

__all__ = ["Outcome", "Resolution", "SchemaCache", "SchemaSource"]

log = logging.getLogger(__name__)

_CHANGES_PER_CALL = 500


class SchemaSource(Protocol):
    async def schema(self, tenant: str, event_type: str, version: int) -> StoredSchema | None: ...

    async def refuses_unknown_types(self, tenant: str) -> bool: ...

    async def changes(self, after: int, *, limit: int) -> tuple[list[Change], int, bool]: ...


class Outcome(Enum):
    """What to do with the JSON events of one (type, version) in a batch."""

    VALIDATE = "validate"
    ACCEPT_UNCHECKED = "accept"
    """No schema for the type and the tenant accepts such types (or the registry is down and
    the tenant's policy, or the fallback setting, says accept)."""
    REFUSE_MISSING = "SCHEMA_MISSING"
    REFUSE_UNKNOWN_VERSION = "SCHEMA_VERSION_UNKNOWN"
    REFUSE_UNAVAILABLE = "SCHEMA_UNAVAILABLE"


@dataclass(frozen=True)
class Resolution:
    outcome: Outcome
    validator: PayloadValidator | None = None
    version: int = 0
    detail: str = ""


@dataclass
class _Subject:
    """What the cache knows of one (tenant, type): latest 0 means "no schema"."""

    latest: int
    validators: dict[int, PayloadValidator] = field(default_factory=dict)
    missing: set[int] = field(default_factory=set)
    """Versions asked for that do not exist (so a producer naming one costs one call)."""


class SchemaCache:
    def __init__(
        self,
        source: SchemaSource,
        *,
        poll_interval: float = 0.5,
        max_subjects: int = 10_000,
        refuse_unknown_when_unreachable: bool = False,
    ) -> None:
        self._source = source
        self._poll_interval = poll_interval
        self._max_subjects = max_subjects
        self._fallback_refuses = refuse_unknown_when_unreachable
        self._subjects: OrderedDict[tuple[str, str], _Subject] = OrderedDict()
        self._policies: dict[str, bool] = {}
        self._cursor: int | None = None
        self._stale: set[tuple[str, str]] = set()
        """Cached entries a change was seen for but whose reload failed (storage down)."""
        self._epoch = 0
        """Bumped at every invalidation: a load that began before one is not cached."""
        self._task: asyncio.Task[None] | None = None
        self._throttle = LogThrottle(log, interval=10.0)
        self.last_change_seen_at: float | None = None
        """monotonic time of the last poll that applied a change (for tests and metrics)."""

    # -- the hot path ---------------------------------------------------------------------

    async def resolve(self, tenant: str, event_type: str, version: int) -> Resolution:
        """How to treat JSON events of `event_type` naming `version` (0: the latest).

        Registry unreachable and nothing cached for the type: the tenant's policy decides
        (cached, else the `refuse_unknown_when_unreachable` fallback): ACCEPT accepts the
        events unchecked, REFUSE refuses them with SCHEMA_UNAVAILABLE (resend later); an event
        naming a version ingest has not cached is refused with SCHEMA_UNAVAILABLE either way.
        """
        key = (tenant, event_type)
        subject = self._subjects.get(key)
        if subject is not None:
            self._subjects.move_to_end(key)  # least recently used leaves first when full
        else:
            try:
                subject = await self._load(tenant, event_type)
            except RegistryUnavailable as error:
                self._throttle.warning("schema registry unreachable: %s", error)
                return await self._while_unreachable(tenant, version)
        if subject.latest == 0:
            if version:
                return Resolution(
                    Outcome.REFUSE_UNKNOWN_VERSION,
                    version=version,
                    detail=f"type {event_type!r} has no registered schema",
                )
            return await self._unknown_type(tenant, event_type)
        wanted = version or subject.latest
        validator = subject.validators.get(wanted)
        if validator is None:
            if wanted in subject.missing or wanted > subject.latest:
                return Resolution(
                    Outcome.REFUSE_UNKNOWN_VERSION,
                    version=wanted,
                    detail=f"type {event_type!r} has versions 1 to {subject.latest}",
                )
            try:
                validator = await self._load_version(tenant, event_type, subject, wanted)
            except RegistryUnavailable:
                return Resolution(
                    Outcome.REFUSE_UNAVAILABLE,
                    version=wanted,
                    detail="the schema registry is unreachable; resend later",
                )
            if validator is None:
                return Resolution(Outcome.REFUSE_UNKNOWN_VERSION, version=wanted)
        return Resolution(Outcome.VALIDATE, validator=validator, version=wanted)

    async def _unknown_type(self, tenant: str, event_type: str) -> Resolution:
        try:
            refuses = await self._refuses(tenant)
        except RegistryUnavailable:
            refuses = self._fallback_refuses
        if refuses:
            return Resolution(
                Outcome.REFUSE_MISSING,
                detail=f"type {event_type!r} has no registered schema and this tenant refuses "
                "types without one",
            )
        return Resolution(Outcome.ACCEPT_UNCHECKED)

    async def _while_unreachable(self, tenant: str, version: int) -> Resolution:
        unavailable = Resolution(
            Outcome.REFUSE_UNAVAILABLE,
            version=version,
            detail="the schema registry is unreachable and this type's schema is not cached; "
            "resend later",
        )
        if version:
            return unavailable
        refuses = self._policies.get(tenant, self._fallback_refuses)
        return unavailable if refuses else Resolution(Outcome.ACCEPT_UNCHECKED)

    async def _refuses(self, tenant: str) -> bool:
        cached = self._policies.get(tenant)
        if cached is not None:
            return cached
        epoch = self._epoch
        refuses = await self._source.refuses_unknown_types(tenant)
        if epoch == self._epoch:
            self._policies[tenant] = refuses
        return refuses

    async def _load(self, tenant: str, event_type: str) -> _Subject:
        epoch = self._epoch
        stored = await self._source.schema(tenant, event_type, 0)
        subject = _Subject(latest=0 if stored is None else stored.latest_version)
        if stored is not None:
            subject.validators[stored.version] = _compile(stored)
        if epoch == self._epoch:
            self._keep((tenant, event_type), subject)
        return subject

    async def _load_version(
        self, tenant: str, event_type: str, subject: _Subject, version: int
    ) -> PayloadValidator | None:
        stored = await self._source.schema(tenant, event_type, version)
        if stored is None:
            subject.missing.add(version)
            return None
        validator = _compile(stored)
        subject.validators[version] = validator
        return validator

    def _keep(self, key: tuple[str, str], subject: _Subject) -> None:
        self._subjects[key] = subject
        self._subjects.move_to_end(key)
        while len(self._subjects) > self._max_subjects:
            self._subjects.popitem(last=False)

    # -- freshness ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="schema-cache-follow")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def poll_once(self) -> int:
        """Apply the changes storage has after the cursor; returns how many were applied.
        Raises RegistryUnavailable when storage cannot answer (the cursor stays)."""
        applied = 0
        await self._retry_stale()
        while True:
            fresh = self._cursor is None
            changes, head, more = await self._source.changes(
                self._cursor or 0, limit=1 if fresh else _CHANGES_PER_CALL
            )
            if self._cursor is None or head < self._cursor:
                # First contact (or storage's log was reset): anything cached may predate it.
                self._drop_all()
                self._cursor = head
                return applied
            for change in changes:
                await self._apply(change)
                self._cursor = change.change_id
                applied += 1
            if not changes:
                self._cursor = max(self._cursor, head)
            if not more:
                if applied:
                    self.last_change_seen_at = time.monotonic()
                return applied

    async def _apply(self, change: Change) -> None:
        self._epoch += 1
        if not change.event_type:
            if change.tenant in self._policies:
                # As for schemas: the old policy stays in use if storage cannot answer now.
                with contextlib.suppress(RegistryUnavailable):
                    self._policies[change.tenant] = await self._source.refuses_unknown_types(
                        change.tenant
                    )
            return
        key = (change.tenant, change.event_type)
        if key in self._subjects:
            await self._reload(key)

    async def _reload(self, key: tuple[str, str]) -> None:
        """Replace what is cached for `key` now, so the next batch does not wait for storage.
        When storage cannot answer, the old entry stays in use (a cached validator keeps
        working through an outage) and the reload is retried at the next poll."""
        try:
            await self._load(*key)
        except RegistryUnavailable:
            self._stale.add(key)
        else:
            self._stale.discard(key)

    async def _retry_stale(self) -> None:
        for key in list(self._stale):
            if key in self._subjects:
                await self._reload(key)
            else:
                self._stale.discard(key)

    def _drop_all(self) -> None:
        self._epoch += 1
        self._subjects.clear()
        self._policies.clear()
        self._stale.clear()

    async def _follow(self) -> None:
        while True:
            try:
                await self.poll_once()
            except RegistryUnavailable as error:
                self._throttle.warning("cannot follow schema changes (cache kept): %s", error)
            await asyncio.sleep(self._poll_interval)


def _compile(stored: StoredSchema) -> PayloadValidator:
    try:
        return PayloadValidator(stored.schema)
    except SchemaNotCompiled as error:
        # The registry refuses schemas the validator cannot compile: a stored one that does not
        # compile is storage's fault, never the producer's; treated as the registry being down.
        raise RegistryUnavailable(
            f"stored schema version {stored.version} does not compile: {error}"
        ) from error
