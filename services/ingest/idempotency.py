"""The idempotency window: per (tenant, event id), the digest of the content ingest accepted,
kept in Redis for `seconds`, so that publishing an id again is told apart at once:

- the same content: a duplicate (a retry). It is acknowledged as accepted and listed in the
  acknowledgement's `duplicates`, and not queued again;
- other content: a conflict. It is refused per event (EventRefusal, reason ID_CONFLICT), and
  the event accepted first stays the one stored.

The digests are written by the same script as the XADD of the events
(streammesh.backlog.IDEMPOTENT_APPEND_SCRIPT), so a digest exists exactly when its event was
queued: a crash cannot leave an acknowledged event without one, nor a digest without its
event (which would turn the retry of a lost event into a "duplicate" that is never stored).

Keys. Per partition stream and tenant, one hash per time bucket of `seconds`:
`<prefix>:idem:{<prefix>:p<n>}:<tenant>:<bucket>`, field = event id, value = DIGEST_BYTES of
content digest. The hash tag is the stream's own name, so each hash lives in the Redis Cluster
slot of its stream (the stream key, which has no braces, hashes by its whole name), and the
key starts with the prefix like every other key of the stack (a scan for `<prefix>:*` finds
it). A lookup reads the
current and the previous bucket; the current one expires 2 x `seconds` after its bucket began,
so an id is remembered at least `seconds` (minus the clock skew between ingest replicas, which
pick the bucket) and at most 2 x `seconds`.

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
only to the tenant that published both.

Memory: about BYTES_PER_ID bytes per remembered id (measured with MEMORY USAGE for UUID ids;
longer ids cost their extra length), so at R accepted events/s at most R x 2 x `seconds` x
BYTES_PER_ID (see services/ingest/pressure.py for the whole bound).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass

from streammesh.api.common.v1 import event_pb2
from streammesh.backlog import DIGEST_BYTES
from streammesh.envelope import EnvelopeColumns
from streammesh.streams import StreamLayout

__all__ = [
    "BYTES_PER_ID",
    "CONFLICT",
    "CONFLICT_REASON",
    "DUPLICATE",
    "IdempotencyWindow",
    "content_digests",
    "repeats_in_batch",
]

DUPLICATE = 1
"""Verdict: the id was accepted before with the same content."""
CONFLICT = 2
"""Verdict: the id was accepted before with other content."""
CONFLICT_REASON = "ID_CONFLICT"
"""EventRefusal.reason of a conflict."""
BYTES_PER_ID = 100
"""Redis memory per remembered UUID id (hash field, 8-byte value, hash table entry): 98.5,
measured on Redis 7.0 with MEMORY USAGE over 100,000 ids (scripts/bench_idempotency.py)."""
_DEFAULT_CONTENT_TYPE = "application/json"
_sorted_json = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


@dataclass(frozen=True)
class IdempotencyWindow:
    """How long ingest remembers each accepted (tenant, id) with its content digest."""

    seconds: int

    def __post_init__(self) -> None:
        if self.seconds < 1:
            raise ValueError("the idempotency window is at least 1 second")

    def keys(
        self, layout: StreamLayout, partition: int, tenant: str, now_seconds: float
    ) -> tuple[str, str, int]:
        """The current and previous digest hashes of `tenant` on the partition's stream, and
        when the current one expires (Unix seconds)."""
        bucket = int(now_seconds // self.seconds)
        base = f"{layout.prefix}:idem:{{{layout.stream(partition)}}}:{tenant}:"
        return f"{base}{bucket}", f"{base}{bucket - 1}", (bucket + 2) * self.seconds


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
