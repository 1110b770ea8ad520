"""The idempotency window: per (tenant, event id), the digest of the content ingest accepted,
kept in Redis for a while, so that publishing an id again is told apart at once:

- the same content: a duplicate (a retry). It is acknowledged as accepted and listed in the
  acknowledgement's `duplicates`, and not queued again;
- other content: a conflict. It is refused per event (EventRefusal, reason ID_CONFLICT), and
  the event accepted first stays the one stored.

The digests are written by the same script as the XADD of the events
(streammesh.backlog.IDEMPOTENT_APPEND_SCRIPT), so a digest exists exactly when its event was
queued: a crash cannot leave an acknowledged event without one, nor a digest without its
event (which would turn the retry of a lost event into a "duplicate" that is never stored).

Keys. Per partition stream, two hashes: `<prefix>:idem:{<prefix>:p<n>}:now` and `...:before`.
Field: ID_FIELD_BYTES of blake2b over (tenant, event id), so one hash serves every tenant and
its size does not grow with the number of tenants; value: DIGEST_BYTES of content digest. The
hash tag is the partition's (`StreamLayout.tag`), which every key of the partition carries, so
both hashes live in the Redis Cluster slot of their stream, and the keys start with the prefix
like every other key of the stack (a scan for `<prefix>:*` finds them).

How long an id is remembered. A lookup reads both hashes; new ids go into `now`. `now` is
rotated (it becomes `before`, and the old `before` is dropped) when it began `seconds` ago, or
when the batch's ids would take it past `max_ids` / 2, so each hash holds at most max_ids / 2
ids (or one batch's slice of a partition, if that is larger). Hence an id is remembered
- at least min(`seconds`, the time its partition takes to accept about max_ids / 2 more ids),
  and at most 2 x `seconds` (`now` expires 2 x `seconds` after it began; time is Redis's own
  clock, read by the script, so ingest replicas with skewed clocks agree);
- so up to max_ids / 2 / `seconds` accepted events/s per partition the window is the whole
  `seconds`; above that it shrinks to at least max_ids / 2 / rate seconds (with the defaults,
  100,000 and 60 s: the full minute up to 833 events/s per partition, 6,700/s over 8
  partitions; at 4,000/s per partition, 12.5 s).
A retry that comes later than that is not seen here; storage still catches it (below).
The clock is read inside the script (TIME), which Redis 7 allows because it replicates a
script's effects, not the script.

Upgrading from the per-tenant, per-bucket keys of the previous release
(`...:<tenant>:<bucket>`): they are no longer read and expire on their own within two windows;
an id accepted before the upgrade and retried after it is queued again, and storage keeps the
first event, as beyond the window. Replicas of both releases side by side likewise do not see
each other's ids.

A dead-lettered event was accepted, so remembered: a plain retry of it within the window is
a duplicate (it is in the dead letters, not lost); a dead-letter replay (the gateway's, which
sets PublishBatchRequest.replay) is queued whatever the window holds, and not recorded in it.

What the window does not see: an id published again with another key lands in another
partition, so another hash; and anything beyond the window. Storage catches both when it skips
the row (same tenant and id already stored): if the content differs it records the conflict
(table event_conflicts) and keeps the first event.

Content is what storage keeps of an event: key, type, content type ("" read as
application/json), payload, attributes (in key order) and the event time the producer set
(none is not the ingest time: a retry gets a new one). The digest is blake2b, 8 bytes: a
collision (2^-64 per pair of contents of one id) would report a conflict as a duplicate, and
only to the tenant that published both. Two (tenant, id) pairs whose 96-bit fields collide
(about held ids / 2^96 per new id: 10^-24 with the defaults) are taken for one id, and then
almost surely reported as a conflict (their digests differ), not dropped as a duplicate.

Memory: at most BYTES_PER_ID bytes per id held, so at most
    partitions x max(max_ids, 2 x the largest slice of a batch) x BYTES_PER_ID
whatever the rate or the number of tenants (see services/ingest/pressure.py for the whole
bound). With the defaults, 8 x 100,000 x 80 = 61 MiB.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass

from streammesh.api.common.v1 import event_pb2
from streammesh.backlog import DIGEST_BYTES, ID_FIELD_BYTES, WINDOW_BYTES_PER_ID
from streammesh.envelope import EnvelopeColumns
from streammesh.streams import StreamLayout

__all__ = [
    "BYTES_PER_ID",
    "CONFLICT",
    "CONFLICT_REASON",
    "DEFAULT_MAX_IDS",
    "DUPLICATE",
    "IdempotencyWindow",
    "content_digests",
    "id_fields",
    "repeats_in_batch",
]

DUPLICATE = 1
"""Verdict: the id was accepted before with the same content."""
CONFLICT = 2
"""Verdict: the id was accepted before with other content."""
CONFLICT_REASON = "ID_CONFLICT"
"""EventRefusal.reason of a conflict."""
BYTES_PER_ID = WINDOW_BYTES_PER_ID
"""Redis memory per id held, at most, whatever the id's length: a dict entry (24), the 12-byte
field and the 8-byte value (16 each, with their string headers, in jemalloc's classes) and the
hash table's share of its bucket arrays (8 to 16 bytes: the table doubles at powers of two;
up to 24 while it rehashes into the doubled one). Measured on Redis 7.0 with MEMORY USAGE:
66.5 at 50,000 and 100,000 ids, 75.7 at 10,000 (scripts/bench_idempotency.py); with the event
id itself as the field it was 98.5 for a UUID."""
DEFAULT_MAX_IDS = 100_000
"""Ids held per partition at most, by default (see IdempotencyWindow.max_ids)."""
_DEFAULT_CONTENT_TYPE = "application/json"
_sorted_json = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


@dataclass(frozen=True)
class IdempotencyWindow:
    """How long, and how many, accepted (tenant, id)s ingest remembers with their content
    digest, per partition."""

    seconds: int
    """An id is remembered this long (up to twice), unless its partition's rate is higher
    than max_ids / 2 per `seconds`: then at least max_ids / 2 / rate seconds."""
    max_ids: int = DEFAULT_MAX_IDS
    """Ids held per partition at most (each of its two hashes holds half), so that Redis
    memory does not grow with the rate; a batch's slice of a partition larger than half goes
    into a hash of its own."""

    def __post_init__(self) -> None:
        if self.seconds < 1:
            raise ValueError("the idempotency window is at least 1 second")
        if self.max_ids < 2:
            raise ValueError("the idempotency window holds at least 2 ids per partition")

    @property
    def hash_ids(self) -> int:
        """Ids one hash holds at most (its share of max_ids)."""
        return self.max_ids // 2

    def keys(self, layout: StreamLayout, partition: int) -> tuple[str, str]:
        """The current and previous digest hashes of the partition's stream."""
        base = f"{layout.prefix}:idem:{layout.tag(partition)}:"
        return f"{base}now", f"{base}before"


def content_digests(events: Sequence[event_pb2.Event], envelope: EnvelopeColumns) -> list[bytes]:
    """Each event's content digest (DIGEST_BYTES), in batch order. The common event (no
    attributes, no event time) is hashed from the envelope's columns, with C-level joins; only
    the events that carry more are read again."""
    content_types = [c or _DEFAULT_CONTENT_TYPE for c in envelope.content_types]
    # key, type and content type of every event in one text and one encode: they hold no NUL.
    texts = zip(envelope.keys, envelope.types, content_types, strict=True)
    parts = "\x00".join(itertools.chain.from_iterable(texts)).encode().split(b"\x00")
    heads = list(map(b"\x00".join, zip(parts[0::3], parts[1::3], parts[2::3], strict=True)))
    blobs = map(b"\x00".join, zip(heads, envelope.payloads, strict=True))
    blake2b = hashlib.blake2b
    digests = [blake2b(blob, digest_size=DIGEST_BYTES).digest() for blob in blobs]
    for index in envelope.carriers:
        event = events[index]
        extra = b""
        if event.attributes:
            extra += _sorted_json(dict(event.attributes)).encode()
        if event.HasField("event_time"):
            extra += b"\x00%d.%d" % (event.event_time.seconds, event.event_time.nanos)
        # Its own personalization and the extra fields' length first: no event without them
        # and no other split of the same bytes hashes alike.
        blob = b"\x00".join((heads[index], b"%d" % len(extra), extra, envelope.payloads[index]))
        digests[index] = blake2b(blob, digest_size=DIGEST_BYTES, person=b"carrier").digest()
    return digests


def id_fields(tenant: str, ids: Sequence[str]) -> list[bytes]:
    """Each id's field in the window's hashes (ID_FIELD_BYTES of blake2b over tenant, NUL,
    id), in batch order: fixed-size and shorter than a UUID, and per tenant, as idempotency
    is. Tenants and ids hold no NUL, so no two pairs hash the same bytes."""
    if not ids:
        return []
    head = tenant.encode() + b"\x00"
    blake2b = hashlib.blake2b
    # All ids in one join and one encode (they hold no NUL), then one hash each.
    encoded = "\x00".join(ids).encode().split(b"\x00")
    return [blake2b(head + raw, digest_size=ID_FIELD_BYTES).digest() for raw in encoded]


def repeats_in_batch(ids: Sequence[str], digests: Sequence[bytes]) -> dict[int, int]:
    """The events whose id an earlier event of the same batch has: index -> DUPLICATE (same
    digest) or CONFLICT. Empty for the common batch, in one set() of the ids."""
    if len(set(ids)) == len(ids):
        return {}
    first: dict[str, bytes] = {}
    verdicts: dict[int, int] = {}
    for index, (event_id, digest) in enumerate(zip(ids, digests, strict=True)):
        held = first.get(event_id)
        if held is None:
            first[event_id] = digest
        else:
            verdicts[index] = DUPLICATE if held == digest else CONFLICT
    return verdicts
