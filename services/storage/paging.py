"""Page-token scopes and the unkeyed dead-letter tokens.

QueryEvents pages with streammesh.mesh.paging.PageTokens (HMAC, bound to the principal too)
over `event_page_scope`; services.storage.queries.PAGING_GUARANTEE says what its keyset on seq
guarantees while writers commit.

ListDeadLetters still uses the older unkeyed tokens: urlsafe base64 of `{"s": position, "f":
scope}`, the position the last id of a page and the scope a fingerprint of the filter, which
ties a token to the filter it was issued for. They are not secret: forging one only moves an
admin's own cursor over data it may read anyway. They go when ListDeadLetters moves to
PageTokens.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable

from services.storage.times import TimeBound

__all__ = [
    "MAX_TOKEN_CHARS",
    "dead_letter_scope",
    "decode_position",
    "encode_position",
    "event_page_scope",
]

MAX_TOKEN_CHARS = 256
"""Longer tokens are refused before decoding; real ones are about 50 characters."""


_MAX_SEQ = 2**63 - 1


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
