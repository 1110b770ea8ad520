"""Checking the payloads of one batch against the tenant's registered schemas: each JSON event
(content_type empty, "application/json" or "<anything>+json", parameters ignored) against the
latest version of its type or the version it names. Events with other content types are not
checked (a JSON Schema says nothing about them). The result is the list of refused events; the
batch's other events are accepted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from services.ingest.schema_cache import Outcome, Resolution, SchemaCache
from streammesh.api.common.v1 import event_pb2

__all__ = ["DEFAULT_TENANT", "is_json", "refused_events"]

DEFAULT_TENANT = "default"
"""The tenant of a request that names none (a gateway from before tenants)."""
_VIOLATION = "SCHEMA_VIOLATION"


def is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media in ("", "application/json") or media.endswith("+json")


def _message(resolution: Resolution, event: event_pb2.Event) -> str:
    if resolution.outcome is Outcome.REFUSE_UNKNOWN_VERSION:
        detail = f"; {resolution.detail}" if resolution.detail else ""
        return f"type {event.type!r} has no schema version {resolution.version}{detail}"
    return resolution.detail


async def refused_events(
    events: Sequence[event_pb2.Event], tenant: str, cache: SchemaCache
) -> list[event_pb2.EventRefusal]:
    """The events of the batch to refuse, in batch order (ids must be assigned already)."""
    tenant = tenant or DEFAULT_TENANT
    # This runs for every event ingest accepts, so one pass with few calls: a batch has few
    # distinct content types, and schema_version 0 (unset) means the latest, as versions
    # count from 1.
    json_by_content_type: dict[str, bool] = {}
    keys: list[tuple[str, int] | None] = []
    for event in events:
        content_type = event.content_type
        json = json_by_content_type.get(content_type)
        if json is None:
            json = json_by_content_type[content_type] = is_json(content_type)
        keys.append((event.type, event.schema_version) if json else None)
    wanted = set(keys)
    wanted.discard(None)
    if not wanted:
        return []
    # One lookup per distinct (type, version), concurrently: a cached one costs a dict lookup.
    order = sorted(key for key in wanted if key is not None)
    found = await asyncio.gather(*(cache.resolve(tenant, t, v) for t, v in order))
    resolutions = dict(zip(order, found, strict=True))
    if all(r.outcome is Outcome.ACCEPT_UNCHECKED for r in found):
        return []
    refused: list[event_pb2.EventRefusal] = []
    for index, (event, key) in enumerate(zip(events, keys, strict=True)):
        if key is None:
            continue
        resolution = resolutions[key]
        if resolution.outcome is Outcome.ACCEPT_UNCHECKED:
            continue
        if resolution.outcome is Outcome.VALIDATE:
            assert resolution.validator is not None
            errors = resolution.validator.errors(event.payload)
            if not errors:
                continue
            problems = "; ".join(f"{e.instance_path or '/'}: {e.message}" for e in errors)
            refused.append(
                event_pb2.EventRefusal(
                    index=index,
                    event_id=event.id,
                    reason=_VIOLATION,
                    message=f"the payload does not match schema version "
                    f"{resolution.version} of {event.type!r}: {problems}",
                )
            )
            continue
        refused.append(
            event_pb2.EventRefusal(
                index=index,
                event_id=event.id,
                reason=resolution.outcome.value,
                message=_message(resolution, event),
            )
        )
    return refused
