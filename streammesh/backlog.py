"""The backlog counters: per partition, the events and bytes appended and not yet acknowledged.

Part of the queue contract (`streams.py`): ingest and the processor both keep them, ingest reads
them for back-pressure. Key `<prefix>:unacked:{<prefix>:p<n>}` (StreamLayout.unacked_key, the partition's hash tag) is a hash with
two integer fields:

- `events`: the sum of the `events` field of the partition's unacknowledged entries;
- `bytes`: the sum of the length of their `batch` field (the serialized QueuedBatch), which is
  what a queued entry costs Redis, give or take its overhead (see `services/ingest/pressure.py`).

"Unacknowledged" means appended and not yet XACKed by the processors' group: undelivered plus
pending. The counters move in the same atomic step as the stream:

- ingest appends with APPEND_SCRIPT: XADD, then HINCRBY by the entry's events and batch length;
  if the XADD fails (out of memory, wrong type) the script stops before counting;
- the processor's fenced ack (services/processor/source/ownership.py) XACKs one id at a time and
  subtracts the weight of exactly those ids XACK removed from the pending list (its reply is
  1). An entry acknowledged twice, reclaimed, or dead-lettered and then acknowledged is
  therefore subtracted once. The weight comes from the entry's own fields (`entry_weight`), the
  same figures ingest counted. Amounts are integers (HINCRBY), and a counter that would go
  below zero is set to 0.

Why counters and not a scan: the request path must stay O(1). Reading the weight of every
unacknowledged entry means reading the entries (a stream has no field projection), O(backlog)
bytes per sample; a counter read is one HMGET per partition per sample.

Drift. A lost AOF suffix (appendfsync everysec, power loss) cannot make them disagree with the
streams: a script's writes reach the AOF and replicas as one MULTI/EXEC, and Redis drops an
incomplete one at load. What can: entries appended or acknowledged around the scripts (XADD or
XACK by hand or by an older version, XDEL, XTRIM MAXLEN, XGROUP SETID, a deleted stream), or an
evicted counter key. The processor corrects them (services/processor/source/backlog.py): exactly,
when it takes a partition over, and to zero whenever it sees a partition drained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from streammesh.streams import COUNT_FIELD, StreamLayout, body_bytes

__all__ = [
    "APPEND_SCRIPT",
    "BYTES",
    "DIGEST_BYTES",
    "EVENTS",
    "IDEMPOTENT_APPEND_SCRIPT",
    "ID_FIELD_BYTES",
    "START_FIELD",
    "TRACE_FIELD",
    "WINDOW_BYTES_PER_ID",
    "Backlog",
    "entry_weight",
    "parse_backlog",
    "queue_backlog_reads",
    "read_backlog",
]

EVENTS = b"events"
"""Counter field: unacknowledged events."""
BYTES = b"bytes"
"""Counter field: bytes of their batch fields."""

APPEND_SCRIPT = f"""
local id = redis.call(
  'XADD', KEYS[1], '*', ARGV[3], ARGV[1], '{COUNT_FIELD.decode()}', ARGV[2], unpack(ARGV, 4))
redis.call('HINCRBY', KEYS[2], '{EVENTS.decode()}', ARGV[2])
redis.call('HINCRBY', KEYS[2], '{BYTES.decode()}', string.len(ARGV[1]))
return id
"""
"""KEYS: the stream, its counters; ARGV: the serialized events, their count, and the entry field
that holds them (COLUMNS_FIELD as ingest writes; BATCH_FIELD for the form of earlier releases),
then any more fields of the entry as name, value pairs (TRACE_FIELD). Returns the entry id."""

TRACE_FIELD = b"tc"
"""Entry field with the trace context of the span that appended it (a W3C traceparent:
streammesh.mesh.tracing.context_field); written only while tracing records that span."""

DIGEST_BYTES = 8
"""Length of one content digest in IDEMPOTENT_APPEND_SCRIPT's digests."""
ID_FIELD_BYTES = 12
"""Length of one id field in IDEMPOTENT_APPEND_SCRIPT's fields: a hash of (tenant, event id).
12 bytes cost Redis what 8 do (both fit jemalloc's 16-byte class with the string's header)."""
WINDOW_BYTES_PER_ID = 80
"""Redis memory per id an idempotency window hash holds, at most (measured and explained in
services/ingest/idempotency.py, BYTES_PER_ID)."""
START_FIELD = b"t"
"""The field of a window hash that holds when it began (Unix seconds, Redis's clock); never an
id field, which is ID_FIELD_BYTES long."""
_CHUNK = 2000  # values per HMGET/HSET call: Lua's unpack takes at most about 8,000

IDEMPOTENT_APPEND_SCRIPT = f"""
local size, fsize = {DIGEST_BYTES}, {ID_FIELD_BYTES}
local fields, digests = ARGV[4], ARGV[5]
local n = #fields / fsize
local ids = {{}}
for i = 1, n do ids[i] = string.sub(fields, (i - 1) * fsize + 1, i * fsize) end
local seen, none = {{}}, {{}}
local has_now = redis.call('EXISTS', KEYS[3]) == 1
local has_before = redis.call('EXISTS', KEYS[4]) == 1
for first = 1, n, {_CHUNK} do
  local last = math.min(first + {_CHUNK} - 1, n)
  local now = has_now and redis.call('HMGET', KEYS[3], unpack(ids, first, last)) or none
  local before = has_before and redis.call('HMGET', KEYS[4], unpack(ids, first, last)) or none
  for i = first, last do
    local held = now[i - first + 1] or before[i - first + 1]
    if held then
      seen[#seen + 1] = i - 1
      seen[#seen + 1] = (held == string.sub(digests, (i - 1) * size + 1, i * size)) and 1 or 2
    end
  end
end
if #seen > 0 then return seen end
-- Redis's clock, not the callers': every ingest replica rotates by the same one.
local clock = tonumber(redis.call('TIME')[1])
local window, half = tonumber(ARGV[2]), tonumber(ARGV[3])
if has_now then
  local began = tonumber(redis.call('HGET', KEYS[3], '{START_FIELD.decode()}') or 0)
  if clock - began >= window or redis.call('HLEN', KEYS[3]) - 1 + n > half then
    -- UNLINK frees a large hash in the background; RENAME onto a key would free it here.
    if has_before then redis.call('UNLINK', KEYS[4]) end
    redis.call('RENAME', KEYS[3], KEYS[4])
    has_now = false
  end
end
local appended = 0
local traced = ARGV[6] ~= '' and {{'{TRACE_FIELD.decode()}', ARGV[6]}} or {{}}
for at = 7, #ARGV, 2 do
  redis.call(
    'XADD', KEYS[1], '*', ARGV[1], ARGV[at], '{COUNT_FIELD.decode()}', ARGV[at + 1],
    unpack(traced))
  redis.call('HINCRBY', KEYS[2], '{EVENTS.decode()}', ARGV[at + 1])
  redis.call('HINCRBY', KEYS[2], '{BYTES.decode()}', string.len(ARGV[at]))
  appended = appended + 1
end
if not has_now then
  redis.call('HSET', KEYS[3], '{START_FIELD.decode()}', clock)
  redis.call('EXPIRE', KEYS[3], 2 * window)
end
for first = 1, n, {_CHUNK} do
  local last = math.min(first + {_CHUNK} - 1, n)
  local kv = {{}}
  for i = first, last do
    kv[#kv + 1] = ids[i]
    kv[#kv + 1] = string.sub(digests, (i - 1) * size + 1, i * size)
  end
  redis.call('HSET', KEYS[3], unpack(kv))
end
return appended
"""
"""APPEND_SCRIPT for all the entries of one partition of one publish batch, guarded by the
partition's idempotency window (services/ingest/idempotency.py), in one atomic step.

KEYS: the stream, its counters, the window's current and previous hashes (field: the
ID_FIELD_BYTES hash of (tenant, event id), value: its DIGEST_BYTES content digest; plus
START_FIELD in the current one). ARGV: the entry field (COLUMNS_FIELD), the window in seconds,
the ids one hash holds at most, the events' id fields concatenated, their digests
concatenated, the trace context for TRACE_FIELD ('': none), then each entry's serialized events
and count, in append order.

If any id is in either hash, nothing is written and the reply is a flat list of (index of the
event among the ids, 1 if its digest is the same (a duplicate), 2 if not (a conflict)); the
caller drops those events and calls again with the rest. Else the current hash is rotated
first when it began a window ago or these ids would take it past its share (it becomes the
previous one, the previous one is dropped), every entry is appended and counted as
APPEND_SCRIPT does, every digest is recorded in the current hash, and the reply is the number
of entries appended. A new current hash expires 2 windows after it began."""


def entry_weight(fields: dict[bytes, bytes] | None) -> tuple[int, int]:
    """(events, bytes) an entry was counted with, read from its fields; (0, 0) for what an
    APPEND_SCRIPT never wrote (no fields: deleted while pending; no batch or a garbled count)."""
    if not fields:
        return 0, 0
    count = fields.get(COUNT_FIELD, b"")
    return (int(count) if count.isdigit() else 0), body_bytes(fields)


@dataclass(frozen=True)
class Backlog:
    """One partition's counters as read."""

    events: int = 0
    bytes: int = 0


def queue_backlog_reads(pipe: Pipeline, layout: StreamLayout) -> None:
    """Queue the reads of every partition's counters on `pipe` (see parse_backlog)."""
    for partition in range(layout.partitions):
        pipe.hmget(layout.unacked_key(partition), [EVENTS, BYTES])


def parse_backlog(replies: Sequence[Any]) -> list[Backlog]:
    """The counters from the replies of queue_backlog_reads, in partition order."""
    backlog = []
    for reply in replies:
        events, size = (int(value) if value is not None else 0 for value in reply)
        backlog.append(Backlog(events=events, bytes=size))
    return backlog


async def read_backlog(client: aioredis.Redis, layout: StreamLayout) -> list[Backlog]:
    """Every partition's counters, in partition order (one pipelined round trip)."""
    async with client.pipeline(transaction=False) as pipe:
        queue_backlog_reads(pipe, layout)
        replies: list[Any] = await pipe.execute()
    return parse_backlog(replies)
