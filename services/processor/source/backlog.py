"""Correcting the backlog counters (streammesh/backlog.py) when they drifted.

The counters move atomically with the streams, so they drift only through what goes around
the scripts: an XACK, XADD, XDEL or XTRIM MAXLEN by hand or by an older version, XGROUP SETID, a
deleted stream, an evicted key. A counter that reads too high would hold ingest back for good
(a phantom backlog); one that reads too low lets more in than the limit says. Two corrections,
both run by the partition's owner between its rounds (nothing of the partition in flight):

- `reconcile`, when a processor takes a partition over: exact. One script takes a snapshot (the
  counters, the stream's last id L, the group's last-delivered id D); the owner then sums the
  weight of every entry up to L that is pending or after D, reading from the oldest pending
  entry on in pages, and adds the difference to the counters. Entries appended meanwhile are
  above L and count themselves; nothing of the partition is acknowledged meanwhile (only the
  owner acknowledges, fenced by its lease). Cost: reading the partition's stream from its oldest
  unacknowledged entry, which back-pressure and trimming keep to a few MiB; once per takeover,
  and never more than MAX_RECONCILE_BYTES (past it, the drained check is left to correct).
- `reset_if_drained`, at every trim: O(1). When the group has nothing pending and everything
  delivered (by `lag`, or, where Redis cannot compute lag, as after some AOF reloads, by
  comparing the last-delivered id with the stream's last id), the true backlog is zero, and the
  counters are set to zero in the same script. This alone clears a phantom backlog, because a
  refused producer lets the partition drain.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import redis.asyncio as aioredis

from services.processor.source.trimming import EntryId, format_id, parse_id
from streammesh.backlog import BYTES, EVENTS, Backlog, entry_weight
from streammesh.streams import StreamLayout, body_bytes

__all__ = ["MAX_RECONCILE_BYTES", "BacklogKeeper"]

log = logging.getLogger(__name__)

_PAGE = 64
"""Entries per XRANGE page while reconciling (entries are up to ~1 MiB each)."""
_PENDING_PAGE = 1000
MAX_RECONCILE_BYTES = 256 * 1024 * 1024
"""A takeover reads at most this much of a partition's stream to reconcile it; a longer backlog
(limits turned off) is left to the drained check, so that a takeover never stalls on it."""

# The group's fields from a RESP2 XINFO GROUPS reply (a flat name/value list per group).
_GROUP = """
local function group_of(stream, name)
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if type(groups) ~= 'table' or groups.err then
    return nil
  end
  for _, fields in ipairs(groups) do
    local group = {}
    for i = 1, #fields, 2 do
      group[fields[i]] = fields[i + 1]
    end
    if group['name'] == name then
      return group
    end
  end
  return nil
end
local function last_id(stream)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #last == 0 then
    return false
  end
  return last[1][1]
end
"""

_SNAPSHOT = (
    _GROUP
    + f"""
local group = group_of(KEYS[1], ARGV[1])
local counted = redis.call('HMGET', KEYS[2], '{EVENTS.decode()}', '{BYTES.decode()}')
local delivered = false
if group then
  delivered = group['last-delivered-id']
end
return {{last_id(KEYS[1]), delivered, counted[1] or '0', counted[2] or '0'}}
"""
)
"""KEYS: stream, counters; ARGV: group. Returns {last id or nil, last-delivered id or nil,
counted events, counted bytes}."""

_ADJUST = f"""
if redis.call('GET', KEYS[2]) ~= ARGV[3] then
  return 0
end
for i, field in ipairs({{'{EVENTS.decode()}', '{BYTES.decode()}'}}) do
  if ARGV[i] ~= '0' and redis.call('HINCRBY', KEYS[1], field, ARGV[i]) < 0 then
    redis.call('HSET', KEYS[1], field, 0)
  end
end
return 1
"""
"""KEYS: counters, the partition's lease; ARGV: events and bytes to add (integers as text, maybe
negative), the consumer that must hold the lease. 0 when it does not (nothing changed)."""

_RESET_IF_DRAINED = (
    _GROUP
    + f"""
local group = group_of(KEYS[1], ARGV[1])
if not group or tonumber(group['pending']) ~= 0 then
  return false
end
local lag = group['lag']
if lag then
  if tonumber(lag) ~= 0 then
    return false
  end
else
  local last = last_id(KEYS[1])
  if last then
    local function parts(id)
      local sep = string.find(id, '-', 1, true)
      return tonumber(string.sub(id, 1, sep - 1)), tonumber(string.sub(id, sep + 1))
    end
    local lm, ls = parts(last)
    local dm, ds = parts(group['last-delivered-id'])
    if lm > dm or (lm == dm and ls > ds) then
      return false
    end
  end
end
local counted = redis.call('HMGET', KEYS[2], '{EVENTS.decode()}', '{BYTES.decode()}')
if (counted[1] or '0') == '0' and (counted[2] or '0') == '0' then
  return {{'0', '0'}}
end
redis.call('HSET', KEYS[2], '{EVENTS.decode()}', 0, '{BYTES.decode()}', 0)
return {{counted[1] or '0', counted[2] or '0'}}
"""
)
"""KEYS: stream, counters; ARGV: group. nil when not drained, else the counters as they were
before being set to zero."""


class BacklogKeeper:
    """The owner's corrections of its partitions' backlog counters (see the module doc)."""

    def __init__(self, client: aioredis.Redis, layout: StreamLayout, consumer: str) -> None:
        self._client = client
        self._layout = layout
        self._consumer = consumer
        self._snapshot = client.register_script(_SNAPSHOT)
        self._adjust = client.register_script(_ADJUST)
        self._reset = client.register_script(_RESET_IF_DRAINED)

    async def reconcile(self, partition: int) -> Backlog:
        """Make the partition's counters exact; returns the drift corrected (true minus
        counted). Call only as its owner with nothing of it in flight; the correction is fenced
        by the lease."""
        layout = self._layout
        stream, counters = layout.stream(partition), layout.unacked_key(partition)
        reply = cast(
            list[Any],
            await self._snapshot(keys=[stream, counters], args=[layout.group]),
        )
        last, delivered = reply[0], reply[1]
        counted = Backlog(events=int(reply[2]), bytes=int(reply[3]))
        weighed: tuple[int, int] | None = (0, 0)
        if last is not None:
            weighed = await self._weigh(
                stream, parse_id(last), None if delivered is None else parse_id(delivered)
            )
        if weighed is None:
            log.info(
                "partition %d: backlog longer than %d bytes, counters left to the drained check",
                partition,
                MAX_RECONCILE_BYTES,
            )
            return Backlog()
        events, size = weighed
        drift = Backlog(events=events - counted.events, bytes=size - counted.bytes)
        if drift.events or drift.bytes:
            fenced = await self._adjust(
                keys=[counters, layout.lease_key(partition)],
                args=[drift.events, drift.bytes, self._consumer],
            )
            if not fenced:
                log.info("partition %d changed hands while reconciling its counters", partition)
                return Backlog()
            log.warning(
                "partition %d: backlog counters were off by %+d events and %+d bytes "
                "(counted %d and %d); corrected",
                partition,
                drift.events,
                drift.bytes,
                counted.events,
                counted.bytes,
            )
        return drift

    async def _weigh(
        self, stream: str, last: EntryId, delivered: EntryId | None
    ) -> tuple[int, int] | None:
        """Events and bytes of the entries up to `last` that are pending or not delivered;
        None past MAX_RECONCILE_BYTES read."""
        pending = set() if delivered is None else await self._pending_ids(stream, last)
        if pending:
            start = format_id(min(pending))
        elif delivered is not None:
            start = "(" + format_id(delivered)
        else:
            start = "-"
        events = size = read = 0
        while True:
            page = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await self._client.xrange(stream, min=start, max=format_id(last), count=_PAGE),
            )
            for raw_id, fields in page:
                entry_id = parse_id(raw_id)
                if entry_id in pending or delivered is None or entry_id > delivered:
                    entry_events, entry_bytes = entry_weight(fields)
                    events += entry_events
                    size += entry_bytes
                read += body_bytes(fields)
            if read > MAX_RECONCILE_BYTES:
                return None
            if len(page) < _PAGE:
                return events, size
            start = "(" + page[-1][0].decode()

    async def _pending_ids(self, stream: str, last: EntryId) -> set[EntryId]:
        ids: set[EntryId] = set()
        start = "-"
        while True:
            page = cast(
                list[dict[str, Any]],
                await self._client.xpending_range(
                    stream,
                    self._layout.group,
                    min=start,
                    max=format_id(last),
                    count=_PENDING_PAGE,
                ),
            )
            ids.update(parse_id(row["message_id"]) for row in page)
            if len(page) < _PENDING_PAGE:
                return ids
            start = "(" + page[-1]["message_id"].decode()

    async def reset_if_drained(self, partition: int) -> Backlog | None:
        """Zero the partition's counters if it is drained; returns what they held then (the
        drift, when not zero), or None when it is not drained."""
        reply = await self._reset(
            keys=[self._layout.stream(partition), self._layout.unacked_key(partition)],
            args=[self._layout.group],
        )
        if reply is None:
            return None
        held = Backlog(events=int(reply[0]), bytes=int(reply[1]))
        if held.events or held.bytes:
            log.warning(
                "partition %d is drained but its backlog counters held %d events and %d "
                "bytes; set to zero",
                partition,
                held.events,
                held.bytes,
            )
        return held
