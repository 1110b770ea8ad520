"""Moving a running deployment's partition keys to the hash-tagged layout (see streams.py).

Until this release a partition's keys had no hash tag: `<prefix>:p<n>` (the stream),
`<prefix>:unacked:p<n>`, `<prefix>:lease:p<n>`, `<prefix>:epoch:p<n>` and
`<prefix>:attempts:p<n>`. They are now `<prefix>:<kind>:{<prefix>:p<n>}`, so the stream's data
must move. Both ingest and the processor run `move_legacy_keys` at start, before they create the
consumer group; per partition, in one script (atomic, so replicas starting together agree):

- an old key whose new key is absent is RENAMEd to it. RENAME keeps everything a key holds: a
  stream's entries, its consumer group with the pending list and delivery counts, and a lease's
  expiry, so nothing acknowledged is lost, nothing pending is forgotten, and the owner keeps its
  partition;
- an old key beside an existing new one: an epoch keeps the higher of the two (a lease epoch
  never goes back, or storage's fences would refuse the new owner); a lease, backlog counters
  or attempt counts of the old key are dropped (the lease expires anyway, the processor
  recounts the backlog when it takes the partition over, and an entry's count starts again);
  of two streams, one without entries is deleted (an empty old one an earlier release's
  ingest created, or an empty new one this release's created while an earlier release still
  wrote the old one), and the other is kept or moved;
- an old stream *with* entries beside a new one means both releases wrote: refused
  (`LegacyKeysConflict`, a StartupError naming both keys and what to do) and nothing moved,
  rather than strand either stream's entries.

Why move at start rather than refuse: the move is a rename (O(1), no copy) that loses nothing,
and refusing would leave the operator the same renames to do by hand. The one thing it cannot
settle is a rolling upgrade in which an earlier release keeps writing the old names after the
move: stop every ingest and processor of the earlier release first (the README's upgrade
note). Should one write anyway, the next start of this release finds both streams and refuses.

A cluster never holds old keys (the old layout's scripts span slots there), and the script,
which names keys of several slots, runs only when an old key exists: the check is one EXISTS
per key, pipelined (cluster-safe).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streammesh.mesh.startup import StartupError
from streammesh.streams import StreamLayout

__all__ = ["LegacyKeysConflict", "legacy_key", "move_legacy_keys"]

_CONFLICT = "LEGACYCONFLICT"

_MOVE = f"""
local function exists(key) return redis.call('EXISTS', key) == 1 end
if exists(KEYS[1]) and exists(KEYS[2]) then
  local old, new = redis.call('XLEN', KEYS[1]), redis.call('XLEN', KEYS[2])
  if old > 0 and new > 0 then
    return redis.error_reply('{_CONFLICT} ' .. old .. ' ' .. new)
  end
  -- The empty one goes (the old one, or a new one a start of this release created).
  redis.call('DEL', old > 0 and KEYS[2] or KEYS[1])
end
local moved = 0
for i = 1, #KEYS, 2 do
  local old, new = KEYS[i], KEYS[i + 1]
  if exists(old) then
    if not exists(new) then
      redis.call('RENAME', old, new)
      moved = moved + 1
    else
      if ARGV[(i + 1) / 2] == 'epoch' then
        local kept = math.max(tonumber(redis.call('GET', old)), tonumber(redis.call('GET', new)))
        redis.call('SET', new, kept)
      end
      redis.call('DEL', old)
    end
  end
end
return moved
"""
"""KEYS: old, new pairs, the stream's first; ARGV: each pair's kind. The number of keys moved;
an error reply LEGACYCONFLICT <old entries> <new entries> when both streams hold entries."""


class LegacyKeysConflict(StartupError):
    """A partition has entries under both its old stream name and its new one."""


def legacy_key(layout: StreamLayout, kind: str, partition: int) -> str:
    """A partition's key as releases before the hash tags named it: `<prefix>:p<n>` for the
    stream, `<prefix>:<kind>:p<n>` for the others."""
    if kind == "stream":
        return f"{layout.prefix}:p{partition}"
    return f"{layout.prefix}:{kind}:p{partition}"


async def move_legacy_keys(
    client: aioredis.Redis,
    layout: StreamLayout,
    kinds: Mapping[str, Callable[[int], str]] | None = None,
) -> int:
    """Move every partition's old keys to their new names (see the module doc); the number of
    keys moved. `kinds` maps each kind to its new key (a service adds its own keys, such as the
    processor's epoch and attempts); the stream, backlog counters and lease are always moved.
    LegacyKeysConflict when a partition has entries under both stream names."""
    named: dict[str, Callable[[int], str]] = {
        "stream": layout.stream,
        "unacked": layout.unacked_key,
        "lease": layout.lease_key,
        **(kinds or {}),
    }
    pairs = {
        partition: [
            (kind, legacy_key(layout, kind, partition), new(partition))
            for kind, new in named.items()
        ]
        for partition in range(layout.partitions)
    }
    async with client.pipeline(transaction=False) as pipe:
        for partition_pairs in pairs.values():
            for _, old, _ in partition_pairs:
                pipe.exists(old)
        found: list[Any] = await pipe.execute()
    present = iter(found)
    moved = 0
    for partition, partition_pairs in pairs.items():
        if not any([next(present) for _ in partition_pairs]):
            continue
        keys = [key for _, old, new in partition_pairs for key in (old, new)]
        try:
            moved += int(
                await client.eval(
                    _MOVE, len(keys), *keys, *[kind for kind, _, _ in partition_pairs]
                )
            )
        except ResponseError as error:
            if not str(error).startswith(_CONFLICT):
                raise
            _, old_entries, new_entries = str(error).split()
            old, new = keys[0], keys[1]
            raise LegacyKeysConflict(
                f"partition {partition}: both {old} ({old_entries} entries, written by a"
                f" release before the hash-tagged key layout) and {new} ({new_entries} entries)"
                f" hold events, so an earlier release still wrote after the upgrade; stop every"
                f" ingest and processor of the earlier release, then append {old}'s entries to"
                f" {new} (or delete {old} if they are stored already) and start again"
            ) from None
    return moved
