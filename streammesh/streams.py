"""The queue contract between ingest (producer) and processor (consumer): stream names,
partitioning, the consumer group, and the entry format.

The unit of the queue is a batch, not an event: one Redis Stream entry holds a serialized
`streammesh.common.v1.QueuedColumns` (field `cols`) with the events of one publish batch that
fall in one partition, in publish order, column-wise; entries written by earlier releases hold a
`QueuedBatch` (field `batch`) instead (`streammesh/entries.py` reads both). A processor of an
earlier release reads only `batch`: upgrade storage and the processor before ingest. Per-entry client CPU
(XADD ~27 us, XREADGROUP+XACK ~5-7 us on the reference machine) is then paid once per batch
instead of once per event.

Keys under the stream prefix `<prefix>` (default `streammesh:events`). Every key of partition n
carries the hash tag `{<prefix>:p<n>}` (`StreamLayout.tag`), so all of them live in one Redis
Cluster slot and every script or command on one partition touches one slot; the prefix leads
every key, so a scan for `<prefix>:*` finds them all:

- `<prefix>:stream:{<prefix>:p<n>}`: partition n's stream; ingest appends, the processor group
  consumes;
- `<prefix>:unacked:{<prefix>:p<n>}`: partition n's backlog counters (hash: `events`, `bytes` of
  the entries not yet acknowledged), kept by ingest's append and the processor's ack
  (`streammesh/backlog.py`);
- `<prefix>:idem:{<prefix>:p<n>}:now` and `...:before`: ingest's idempotency window
  (`services/ingest/idempotency.py`), written by the append script with the XADD;
- `<prefix>:lease:{<prefix>:p<n>}`: the processor that owns partition n (string, expires);
- `<prefix>:epoch:{<prefix>:p<n>}`: partition n's lease epoch (integer, no expiry);
- `<prefix>:attempts:{<prefix>:p<n>}`: counted failures of partition n's pending entries (hash,
  entry id -> "<failures>:<first failure ms>"; removed with the entry's XACK);
- `<prefix>:dead`: a capped notice stream of dead letters (the storage table is the record);
- `<prefix>:members`: live processors (sorted set, score = expiry in Redis milliseconds).
The last two belong to no partition; every command on them names only them.

Members, leases and epochs belong to the processor's ownership protocol
(`services/processor/source/ownership.py`), attempts to its dead-letter policy
(`services/processor/delivery/dead_letters.py`). tests/test_key_slots.py checks that each
script and command of a partition names keys of one slot, and runs them on a real Redis Cluster.

What spans partitions is never one command: ingest's appends and the processor's acks of
several partitions go in a non-transactional pipeline (redis-py's cluster client splits it by
node). One exception remains: the processor reads all its partitions with one XREADGROUP over
several streams, which a cluster refuses (CROSSSLOT) unless the streams share a slot; on a
cluster the read must be split per partition (or per node), the one change left to make.

Releases before the hash tags named the keys `<prefix>:p<n>` and `<prefix>:<kind>:p<n>`; ingest
and the processor move them at start (`streammesh/legacy_keys.py`).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

__all__ = [
    "BATCH_FIELD",
    "COLUMNS_FIELD",
    "COUNT_FIELD",
    "StreamLayout",
    "body_bytes",
    "jump_hash",
]

COLUMNS_FIELD = b"cols"
"""Entry field holding the serialized QueuedColumns (what ingest writes)."""
BATCH_FIELD = b"batch"
"""Entry field holding a serialized QueuedBatch (entries of earlier releases)."""
COUNT_FIELD = b"events"
"""Entry field holding the number of events, readable without decoding the batch."""


def body_bytes(fields: dict[bytes, bytes] | None) -> int:
    """The length of an entry's events field (columns or, from earlier releases, a batch): what
    back-pressure counts and trimming measures; 0 for an entry without either."""
    if not fields:
        return 0
    return len(fields.get(COLUMNS_FIELD) or fields.get(BATCH_FIELD) or b"")


def jump_hash(key: bytes, buckets: int) -> int:
    """Jump consistent hash (Lamping & Veach): growing N to N+1 moves only 1/(N+1) of the keys."""
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    state = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        state = (state * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        candidate = int((bucket + 1) * ((1 << 31) / ((state >> 33) + 1)))
    return bucket


@functools.lru_cache(maxsize=1 << 16)
def _partition(key: str, partitions: int) -> int:
    # Ingest hashes every event's key; keys repeat, and the hash is Python arithmetic (~1 us).
    return jump_hash(key.encode(), partitions)


_TAGGED_PARTITION = re.compile(r":p(\d+)\}$")


@dataclass(frozen=True)
class StreamLayout:
    """Where events live in Redis: `<prefix>:stream:{<prefix>:p<n>}` for n in
    0..partitions-1, and every other key of partition n with the same hash tag."""

    prefix: str = "streammesh:events"
    partitions: int = 8
    group: str = "processors"

    def __post_init__(self) -> None:
        if not 1 <= self.partitions <= 1024:
            raise ValueError("partitions must be between 1 and 1024")

    def tag(self, partition: int) -> str:
        """Partition n's hash tag, `{<prefix>:p<n>}`: every key of the partition carries it,
        so a Redis Cluster keeps them in one slot (the slot is the CRC16 of what the braces
        hold)."""
        return f"{{{self.prefix}:p{partition}}}"

    def partition_key(self, kind: str, partition: int) -> str:
        """The partition's key of a kind: `<prefix>:<kind>:{<prefix>:p<n>}`."""
        return f"{self.prefix}:{kind}:{self.tag(partition)}"

    def stream(self, partition: int) -> str:
        return self.partition_key("stream", partition)

    def streams(self) -> list[str]:
        return [self.stream(p) for p in range(self.partitions)]

    def unacked_key(self, partition: int) -> str:
        """Partition n's backlog counters (see streammesh.backlog)."""
        return self.partition_key("unacked", partition)

    @property
    def dead_letter_stream(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def members_key(self) -> str:
        return f"{self.prefix}:members"

    def lease_key(self, partition: int) -> str:
        return self.partition_key("lease", partition)

    def partition_of_stream(self, stream: str | bytes) -> int:
        name = stream.decode() if isinstance(stream, bytes) else stream
        found = _TAGGED_PARTITION.search(name)
        if found is None:
            raise ValueError(f"{name!r} is no partition stream of this layout")
        return int(found.group(1))

    def partition_for(self, key: str) -> int:
        """Events with the same key always land in the same partition, keeping their order."""
        return _partition(key, self.partitions)

    async def ensure_group(self, client: aioredis.Redis) -> None:
        """Create every stream and the consumer group from the first entry ("0"), so events
        appended before any processor started are still delivered. Idempotent."""
        for stream in self.streams():
            try:
                await client.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
