"""Page sizes and opaque page tokens of the List calls.

A token is url-safe base64 of a small JSON object: the keyset position to continue after, and a
fingerprint of the filters it was made for, so a token cannot be replayed with other filters
(INVALID_ARGUMENT). Tokens are opaque to callers but not secret: editing one can only move the
position, within what the caller may list anyway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from streammesh.mesh import paging
from streammesh.mesh.errors import InvalidArgument

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "decode_token", "encode_token", "page_size"]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
_MAX_TOKEN_CHARS = 1024


def page_size(requested: int) -> int:
    """0 means 100, above 500 is lowered to 500, negative is refused (AIP-158, the rule of
    streammesh.mesh.paging)."""
    return paging.page_size(requested, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)


def _fingerprint(scope: Mapping[str, Any]) -> str:
    canonical = json.dumps(scope, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_token(position: Mapping[str, Any], scope: Mapping[str, Any]) -> str:
    """A token to continue after `position` with the same `scope` (the filters)."""
    payload = json.dumps({"p": dict(position), "s": _fingerprint(scope)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_token(token: str, scope: Mapping[str, Any]) -> dict[str, Any] | None:
    """The position in `token` (None for an empty token, the first page)."""
    if not token:
        return None
    invalid = InvalidArgument(
        "invalid page token",
        field_violations=[("page_token", "not a token from the previous page of this query")],
    )
    if len(token) > _MAX_TOKEN_CHARS:
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError):
        raise invalid from None
    if (
        not isinstance(payload, dict)
        or payload.get("s") != _fingerprint(scope)
        or not isinstance(payload.get("p"), dict)
    ):
        raise invalid
    position: dict[str, Any] = payload["p"]
    return position
