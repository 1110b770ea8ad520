"""AIP-158 pagination shared by every List/Query call: page sizes, and opaque page tokens bound to
the query and to the principal that asked, which a client can neither forge nor carry over.

A token is `<body>.<tag>`, both url-safe base64 without padding. The body is a small JSON
object: the keyset position to continue after (`p`, e.g. {"seq": 4711}), when the token was
issued (`t`, Unix seconds) and a fingerprint of the query (`q`). The tag is HMAC-SHA256 (first
16 bytes) over the body, the canonical query and the principal, under a key of the service.

Why HMAC and not AEAD: what a token carries is the caller's own: the position is the `sequence`
of the last event the caller was just sent, and the fingerprint hashes the request the caller
wrote. Nothing needs hiding; what matters is that a token cannot be made up or edited (to jump
the cursor or hop between queries) and that it works only for the principal it was issued to,
which the tag gives. The principal is bound by the tag without appearing in the token, so a
token in a log names nobody.

Refusals are INVALID_ARGUMENT with a reason a client can act on: a token of another query
(checked first, with the fingerprint in the clear) says so; a token edited, forged, signed by a
retired key or replayed by another principal gets one generic reason (no oracle for which).
Several keys: the first signs, all verify, so a key can be rotated without breaking the tokens
of clients in mid-paging.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streammesh.mesh.errors import InvalidArgument

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "MAX_TOKEN_CHARS",
    "PageTokens",
    "Principal",
    "derive_page_token_key",
    "page_size",
]

DEFAULT_PAGE_SIZE = 100
"""page_size 0 (unset) means this."""
MAX_PAGE_SIZE = 1000
"""A larger page_size is lowered to this (AIP-158: coerce, do not refuse); every listing
of every service applies `page_size`, with its own default and maximum where it has them."""
MAX_TOKEN_CHARS = 1024
"""Longer tokens are refused before decoding."""

_VERSION = 1
_TAG_BYTES = 16
_DOMAIN = b"streammesh page token v1\x00"
_MIN_KEY_BYTES = 16
_CLOCK_SKEW_SECONDS = 60


@dataclass(frozen=True, slots=True)
class Principal:
    """Who pages: the tenant and the user (subject) of the access token."""

    tenant: str
    subject: str


def page_size(
    requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE
) -> int:
    """AIP-158: 0 means `default`, above `maximum` is lowered to it, negative is refused."""
    if requested < 0:
        raise InvalidArgument(
            "page_size must not be negative",
            field_violations=[("page_size", f"{requested}: use 0 (for {default}) to {maximum}")],
        )
    return min(requested or default, maximum)


def derive_page_token_key(secret: bytes, purpose: str) -> bytes:
    """A page-token key for `purpose` (e.g. "storage.events") from a service secret (such as a
    secret file's content), so that one secret can serve several uses without sharing a key."""
    if len(secret) < _MIN_KEY_BYTES:
        raise ValueError(f"a page-token secret needs at least {_MIN_KEY_BYTES} bytes")
    return hmac.digest(secret, b"streammesh page-token key\x00" + purpose.encode(), "sha256")


def _canonical(value: Any) -> bytes:
    # Refuses what JSON does not hold exactly (a set, bytes, a datetime) instead of str()-ing it:
    # two different queries must never share a canonical form.
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _fingerprint(scope: Mapping[str, Any]) -> str:
    return hashlib.sha256(b"query\x00" + _canonical(scope)).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _refused(reason: str) -> InvalidArgument:
    return InvalidArgument(
        f"invalid page_token: {reason}", field_violations=[("page_token", reason)]
    )


_NOT_OURS = "not a page token issued to this caller for this query"
_OTHER_QUERY = (
    "the token belongs to a different query (filter, keys, types or time range); "
    "repeat the request without page_token"
)
_EXPIRED = "the token has expired; repeat the request without page_token"


class PageTokens:
    """Issues and opens page tokens under `keys` (the first signs; all verify). Pure: no clock
    and no I/O, the caller passes `now` (Unix seconds)."""

    def __init__(self, keys: Sequence[bytes], *, max_age_seconds: float | None = None) -> None:
        if not keys or any(len(key) < _MIN_KEY_BYTES for key in keys):
            raise ValueError(f"page-token keys need at least {_MIN_KEY_BYTES} bytes each")
        self._keys = tuple(keys)
        self._max_age = max_age_seconds

    def _tag(
        self, key: bytes, body: bytes, scope: Mapping[str, Any], principal: Principal
    ) -> bytes:
        message = b"\x00".join(
            (_DOMAIN, _canonical(scope), _canonical([principal.tenant, principal.subject]), body)
        )
        return hmac.digest(key, message, "sha256")[:_TAG_BYTES]

    def issue(
        self,
        position: Mapping[str, Any],
        *,
        scope: Mapping[str, Any],
        principal: Principal,
        now: float,
    ) -> str:
        """The token that continues after `position` for this query and principal. `scope` is
        every request field that decides what the query returns (not page_size: AIP-158 lets
        a client change it between pages), as JSON values."""
        body = _canonical(
            {"v": _VERSION, "p": dict(position), "t": int(now), "q": _fingerprint(scope)}
        )
        return f"{_b64(body)}.{_b64(self._tag(self._keys[0], body, scope, principal))}"

    def open(
        self,
        token: str,
        *,
        scope: Mapping[str, Any],
        principal: Principal,
        now: float,
    ) -> dict[str, Any] | None:
        """The position `token` continues after; None for an empty token (the first page).
        InvalidArgument when the token is not one this service issued to `principal` for
        this query, or has expired."""
        if not token:
            return None
        body_text, dot, tag_text = token.partition(".")
        if len(token) > MAX_TOKEN_CHARS or not dot:
            raise _refused(_NOT_OURS)
        try:
            body, tag = _unb64(body_text), _unb64(tag_text)
            fields = json.loads(body)
        except (binascii.Error, ValueError):
            raise _refused(_NOT_OURS) from None
        if (
            not isinstance(fields, dict)
            or fields.get("v") != _VERSION
            or not isinstance(fields.get("p"), dict)
            or type(fields.get("t")) is not int
            or not isinstance(fields.get("q"), str)
        ):
            raise _refused(_NOT_OURS)
        if not hmac.compare_digest(fields["q"], _fingerprint(scope)):
            raise _refused(_OTHER_QUERY)
        if not any(
            hmac.compare_digest(tag, self._tag(key, body, scope, principal)) for key in self._keys
        ):
            raise _refused(_NOT_OURS)
        issued: int = fields["t"]
        if issued > now + _CLOCK_SKEW_SECONDS:
            raise _refused(_NOT_OURS)
        if self._max_age is not None and now - issued > self._max_age:
            raise _refused(_EXPIRED)
        position: dict[str, Any] = fields["p"]
        return position
