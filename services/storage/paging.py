"""Opaque keyset page tokens: urlsafe base64 of `{"s": position, "f": filter_hash}`, where the
position is the last seq of an events page or the last id of a dead-letters page.

The hash ties a token to the filter it was issued for, so a client cannot carry a position from
one filter into another and silently skip or repeat events. Tokens are not secret: forging one
only moves the caller's own cursor over data it may read anyway.

Superseded: the query API of issue 9 pages with streammesh.mesh.paging.PageTokens (HMAC, bound
to the principal too) over `event_page_scope`; the unkeyed tokens below stay until QueryEvents
and ListDeadLetters are wired to it, then go.

Caveat: seq is drawn when a row is inserted, not when its transaction commits, so a reader paging
while writers commit may pass a seq whose row becomes visible later. Paging history is exact;
tailing live data this way can skip rows (live delivery belongs to the subscription path).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable

from services.storage.store import EventQuery
from services.storage.times import TimeBound, unix_micros

__all__ = [
    "MAX_TOKEN_CHARS",
    "dead_letter_scope",
    "decode_page_token",
    "decode_position",
    "encode_page_token",
    "encode_position",
    "event_page_scope",
    "filter_hash",
]

MAX_TOKEN_CHARS = 256
"""Longer tokens are refused before decoding; real ones are about 50 characters."""


_MAX_SEQ = 2**63 - 1


def _instant(value: TimeBound | None) -> int | list[int] | None:
    # Unix microseconds, as tokens issued before nanosecond bounds existed; [micros, nanos]
    # only when a bound has nanoseconds below its microsecond.
    if value is None:
        return None
    micros, nanos = value
    return [unix_micros(micros), nanos] if nanos else unix_micros(micros)


def filter_hash(query: EventQuery) -> str:
    """A short, stable fingerprint of the filter (keys as a set, times to the nanosecond)."""
    canonical = json.dumps(
        [sorted(set(query.keys)), query.type, _instant(query.start_time), _instant(query.end_time)],
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def event_page_scope(
    *,
    tenant: str,
    filter: str,
    keys: Iterable[str] = (),
    types: Iterable[str] = (),
    start_time: TimeBound | None = None,
    end_time: TimeBound | None = None,
) -> dict[str, object]:
    """What a page token of an events query is bound to (streammesh.mesh.paging): every field
    that decides which events the query returns, keys and types as sets, times to the
    nanosecond, the filter as written (another spelling of the same filter is another query:
    the client repeats the request it made). page_size is left out: AIP-158 lets it change."""
    return {
        "what": "events",
        "tenant": tenant,
        "filter": filter,
        "keys": sorted(set(keys)),
        "types": sorted(set(types)),
        "start": list(start_time) if start_time is not None else None,
        "end": list(end_time) if end_time is not None else None,
    }


def dead_letter_scope(partition: int | None, replayed: bool | None) -> str:
    """The fingerprint of a dead-letter filter (partition, replayed state)."""
    canonical = json.dumps(["dead_letters", partition, replayed], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_page_token(last_seq: int, query: EventQuery) -> str:
    """The token that continues after `last_seq` under the same filter."""
    return encode_position(last_seq, filter_hash(query))


def decode_page_token(token: str, query: EventQuery) -> int:
    """The seq to continue after; ValueError (with a client-facing reason) when the token does
    not decode or was issued for another filter."""
    return decode_position(token, filter_hash(query))


def encode_position(position: int, scope: str) -> str:
    """The token that continues after `position` under the filter whose fingerprint is `scope`."""
    body = json.dumps({"s": position, "f": scope}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).rstrip(b"=").decode()


def decode_position(token: str, scope: str) -> int:
    """The position to continue after; ValueError (with a client-facing reason) when the token
    does not decode or was issued for another filter."""
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError("not a page token issued by this service")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError) as error:
        raise ValueError("not a page token issued by this service") from error
    if not isinstance(body, dict):
        raise ValueError("not a page token issued by this service")
    seq, fingerprint = body.get("s"), body.get("f")
    if type(seq) is not int or not 0 <= seq <= _MAX_SEQ or not isinstance(fingerprint, str):
        raise ValueError("not a page token issued by this service")
    if fingerprint != scope:
        raise ValueError("the token belongs to a different filter; start again without a token")
    return seq
