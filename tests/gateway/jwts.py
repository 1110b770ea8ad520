"""Hand-made JWTs for attack tests: signed with any key, or forged byte by byte."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.gateway.revocations import FailMode, RevocationList
from streammesh.api.auth.v1 import auth_pb2

__all__ = [
    "b64url",
    "claims",
    "forge",
    "hs256_with",
    "live_revocations",
    "public_jwk",
    "sign",
    "sign_exact",
]


def live_revocations() -> RevocationList:
    """A revocation list that revokes nothing and is confirmed live (for verifier unit tests;
    the feed itself is tested in test_revocations)."""
    revocations = RevocationList(max_staleness=300, fail_mode=FailMode.CLOSED)
    revocations.apply(auth_pb2.WatchRevocationsResponse(snapshot=True))
    return revocations


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}


def claims(*, now: float | None = None, **overrides: Any) -> dict[str, Any]:
    """Claims like auth's, issued at `now`; `overrides` replace (or, as None, remove) any."""
    moment = int(time.time() if now is None else now)
    body: dict[str, Any] = {
        "iss": "streammesh-auth",
        "aud": "streammesh",
        "sub": str(uuid.uuid4()),
        "preferred_username": "mallory",
        "roles": ["producer", "analyst", "admin"],
        "iat": moment,
        "nbf": moment,
        "exp": moment + 300,
        "jti": uuid.uuid4().hex,
        "sid": str(uuid.uuid4()),
    }
    body.update(overrides)
    return {name: value for name, value in body.items() if value is not None}


def sign(body: dict[str, Any], key: Ed25519PrivateKey, *, kid: str, **headers: Any) -> str:
    """An EdDSA token with typ at+jwt and `kid`; extra `headers` are added as given."""
    return jwt.encode(
        body, key, algorithm="EdDSA", headers={"kid": kid, "typ": "at+jwt", **headers}
    )


def forge(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"") -> str:
    """A compact JWS made by hand, so any header (alg none, HS256, ...) can be sent."""
    head = b64url(json.dumps(header, separators=(",", ":")).encode())
    payload = b64url(json.dumps(body, separators=(",", ":")).encode())
    return f"{head}.{payload}.{b64url(signature)}"


def sign_exact(header: dict[str, Any], body: dict[str, Any], key: Ed25519PrivateKey) -> str:
    """An Ed25519 signature over exactly `header` (PyJWT would add alg and typ itself)."""
    unsigned = forge(header, body).rsplit(".", 1)[0]
    return f"{unsigned}.{b64url(key.sign(unsigned.encode()))}"


def hs256_with(secret: bytes, header: dict[str, Any], body: dict[str, Any]) -> str:
    """The classic confusion attack: HMAC-SHA256 keyed with a public key's bytes."""
    unsigned = forge(header, body).rsplit(".", 1)[0]
    mac = hmac.new(secret, unsigned.encode(), hashlib.sha256).digest()
    return f"{unsigned}.{b64url(mac)}"
