"""The queue contract between ingest (producer) and processor (consumer): stream names,
partitioning, the consumer group, and the entry format.

The unit of the queue is a batch, not an event: one Redis Stream entry holds a serialized
`streammesh.common.v1.QueuedColumns` (field `cols`) with the events of one publish batch that
fall in one partition, in publish order, column-wise; entries written by earlier releases hold a
`QueuedBatch` (field `batch`) instead (`streammesh/entries.py` reads both). A processor of an
earlier release reads only `batch`: upgrade storage and the processor before ingest. Per-entry client CPU
(XADD ~27 us, XREADGROUP+XACK ~5-7 us on the reference machine) is then paid once per batch
instead of once per event.

Keys under the stream prefix `<prefix>` (default `streammesh:events`):

- `<prefix>:p<n>`: partition n's stream; ingest appends, the processor group consumes;
- `<prefix>:unacked:p<n>`: partition n's backlog counters (hash: `events`, `bytes` of the entries
  not yet acknowledged), kept by ingest's append and the processor's ack
  (`streammesh/backlog.py`);
- `<prefix>:dead`: a capped notice stream of dead letters (the storage table is the record);
- `<prefix>:members`: live processors (sorted set, score = expiry in Redis milliseconds);
- `<prefix>:lease:p<n>`: the processor that owns partition n (string, expires);
- `<prefix>:attempts:p<n>`: counted failures of partition n's pending entries (hash, entry id ->
  "<failures>:<first failure ms>"; removed with the entry's XACK).

Members and leases belong to the processor's ownership protocol
(`services/processor/source/ownership.py`), attempts to its dead-letter policy
(`services/processor/delivery/dead_letters.py`).
"""

from __future__ import annotations

import functools
import hashlib
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


@dataclass(frozen=True)
class StreamLayout:
    """Where events live in Redis: `<prefix>:p<n>` for n in 0..partitions-1."""

    prefix: str = "streammesh:events"
    partitions: int = 8
    group: str = "processors"

    def __post_init__(self) -> None:
        if not 1 <= self.partitions <= 1024:
            raise ValueError("partitions must be between 1 and 1024")

    def stream(self, partition: int) -> str:
        return f"{self.prefix}:p{partition}"

    def streams(self) -> list[str]:
        return [self.stream(p) for p in range(self.partitions)]

    def unacked_key(self, partition: int) -> str:
        """Partition n's backlog counters (see streammesh.backlog)."""
        return f"{self.prefix}:unacked:p{partition}"

    @property
    def dead_letter_stream(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def members_key(self) -> str:
        return f"{self.prefix}:members"

    def lease_key(self, partition: int) -> str:
        return f"{self.prefix}:lease:p{partition}"

    def partition_of_stream(self, stream: str | bytes) -> int:
        name = stream.decode() if isinstance(stream, bytes) else stream
        return int(name.rsplit(":p", 1)[1])

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
