"""Trimming a partition stream without dropping work.

Rule: XTRIM MINID to the safe point, the oldest entry some consumer group still needs. For each
group that is min(oldest pending entry, last-delivered-id + 1): everything below it was delivered
to the group and acknowledged. The minimum over all groups on the stream is taken. Never MAXLEN,
which counts entries and would cut pending or undelivered ones under load. With a retention of T
seconds the point is lowered to now - T (entry ids are Redis milliseconds), so acknowledged
entries stay readable (XRANGE) for T seconds for replay or debugging.

The trim is exact (no `~`). An approximate trim only frees whole radix-tree nodes (about 100
entries each), so a quiet stream would keep up to a node of acknowledged entries for good. An
exact trim costs O(entries removed).

Only the partition's owner trims: every trim interval, and as soon as it acknowledged
`trim_after_bytes` of the partition since its last trim (so acknowledged entries cost Redis a
bounded amount whatever the rate; ingest's back-pressure counts only unacknowledged ones). The read and the trim are two commands.
This is safe because nothing can make an entry below the point needed again: acknowledgements
are final, new entries get higher ids, and XCLAIM moves pending entries without creating any.
Only an operator's XGROUP CREATE/SETID to an old id between the two commands could be affected.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

__all__ = ["EntryId", "format_id", "parse_id", "safe_trim_point", "trim_partition"]

log = logging.getLogger(__name__)

EntryId = tuple[int, int]
"""A stream entry id as (milliseconds, sequence)."""

_MAX_SEQUENCE = 2**64 - 1


def parse_id(raw: bytes | str) -> EntryId:
    text = raw.decode() if isinstance(raw, bytes) else raw
    millis, _, sequence = text.partition("-")
    return int(millis), int(sequence or 0)


def format_id(entry_id: EntryId) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


def _successor(entry_id: EntryId) -> EntryId:
    millis, sequence = entry_id
    return (millis + 1, 0) if sequence == _MAX_SEQUENCE else (millis, sequence + 1)


async def safe_trim_point(client: aioredis.Redis, stream: str) -> EntryId | None:
    """The lowest entry id any group on `stream` still needs, or None when nothing may be trimmed
    (no stream, or no group: then nobody has acknowledged anything)."""
    try:
        groups = await client.xinfo_groups(stream)
    except ResponseError as error:
        if "no such key" in str(error).lower():
            return None
        raise
    if not groups:
        return None
    point: EntryId | None = None
    for group in groups:
        needed = _successor(parse_id(group["last-delivered-id"]))
        if int(group["pending"]) > 0:
            summary = await client.xpending(stream, group["name"])
            if summary["min"] is not None:
                needed = min(needed, parse_id(summary["min"]))
        point = needed if point is None else min(point, needed)
    return point


async def trim_partition(
    client: aioredis.Redis, stream: str, *, retention_seconds: float = 0.0
) -> int:
    """Trim `stream` to its safe point (lowered by the retention); returns entries removed."""
    point = await safe_trim_point(client, stream)
    if point is None:
        return 0
    if retention_seconds > 0:
        seconds, micros = await client.time()
        cutoff = (int(seconds) * 1000 + int(micros) // 1000 - int(retention_seconds * 1000), 0)
        point = min(point, cutoff)
    removed = int(await client.xtrim(stream, minid=format_id(point), approximate=False))
    if removed:
        log.debug("trimmed %d acknowledged entries of %s", removed, stream)
    return removed
