"""Ed25519 signing keys, access tokens (JWT, RFC 9068 `at+jwt`) and the JWKS that verifies them.

Key ids are RFC 7638 JWK thumbprints (base64url SHA-256 of the canonical public JWK): anyone
holding the public key can recompute the kid, and the same key can never appear under two kids.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.auth.crypto import Purpose, SecretBox
from services.auth.keystore import KeyStore, RetireOutcome, RotationResult, SigningKeyRecord

__all__ = [
    "ALGORITHM",
    "JWT_TYPE",
    "AccessToken",
    "KeyRing",
    "SigningKey",
    "TokenIssuer",
    "jwk_thumbprint",
]

ALGORITHM = "EdDSA"
JWT_TYPE = "at+jwt"
"""`typ` header of access tokens (RFC 9068), so an ID token or other JWT cannot pass for one."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 thumbprint of an OKP key: SHA-256 over the required members, sorted, no spaces."""
    canonical = json.dumps(
        {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]}, separators=(",", ":"), sort_keys=True
    )
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def _public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
    return {**jwk, "kid": jwk_thumbprint(jwk), "alg": ALGORITHM, "use": "sig"}


@dataclass(frozen=True)
class SigningKey:
    """A private signing key with its kid and public JWK."""

    kid: str
    private_key: Ed25519PrivateKey = field(repr=False)
    public_jwk: dict[str, str]

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random Ed25519 key."""
        return cls.from_private_key(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_key(cls, private_key: Ed25519PrivateKey) -> SigningKey:
        """Wrap an existing key; the kid and JWK are derived from it."""
        jwk = _public_jwk(private_key.public_key())
        return cls(kid=jwk["kid"], private_key=private_key, public_jwk=jwk)

    def seal(self, box: SecretBox) -> SigningKeyRecord:
        """The row to store: the private key sealed and bound to this kid."""
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return SigningKeyRecord(
            kid=self.kid,
            alg=ALGORITHM,
            sealed_private_key=box.seal(pem, purpose=Purpose.SIGNING_KEY, row_id=self.kid),
            public_jwk=self.public_jwk,
            active=True,
        )

    @classmethod
    def unseal(cls, record: SigningKeyRecord, box: SecretBox) -> SigningKey:
        """Open a stored key and check it is the key its kid names."""
        pem = box.open(record.sealed_private_key, purpose=Purpose.SIGNING_KEY, row_id=record.kid)
        private_key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(f"signing key {record.kid} is not an Ed25519 key")
        key = cls.from_private_key(private_key)
        if key.kid != record.kid:
            raise ValueError(f"signing key {record.kid} does not match its thumbprint")
        return key


class KeyRing:
    """The signing keys as the handlers use them: the active one (re-read from the database on
    every use, so a rotation done by any replica applies at once everywhere), the published set,
    rotation and retirement. Opened private keys are cached by kid."""

    def __init__(self, store: KeyStore, box: SecretBox, *, overlap_seconds: float) -> None:
        self._store = store
        self._box = box
        self._overlap = overlap_seconds
        self._opened: dict[str, SigningKey] = {}

    async def bootstrap(self) -> SigningKey:
        """The active signing key, created if there is none.

        A candidate is generated up front (it costs microseconds) and stored only when, under the
        store's lock, no active key exists; replicas starting together all end up with the same key.
        """
        return self._open(await self._store.ensure_active(SigningKey.generate().seal(self._box)))

    async def current(self) -> SigningKey:
        """The key to sign with now."""
        record = await self._store.active()
        if record is None:
            return await self.bootstrap()
        return self._open(record)

    async def published_jwks(self) -> list[dict[str, str]]:
        """The public JWK of every key that is not retired: the one signing now, and the replaced
        ones whose tokens may still be in use (the overlap window)."""
        return [dict(record.public_jwk) for record in await self._store.published()]

    async def all(self) -> list[SigningKeyRecord]:
        """Every key, retired ones included, newest first."""
        return await self._store.all()

    async def rotate(self, *, if_older_than_seconds: float | None = None) -> RotationResult:
        """A new active key (unless `if_older_than_seconds` says none is due yet); replaced keys
        whose overlap window has passed are retired."""
        return await self._store.rotate(
            SigningKey.generate().seal(self._box),
            overlap_seconds=self._overlap,
            if_older_than_seconds=if_older_than_seconds,
        )

    async def retire_expired(self) -> list[SigningKeyRecord]:
        """Retire the replaced keys whose overlap window has passed (no rotation)."""
        return await self._store.retire_expired(overlap_seconds=self._overlap)

    async def retire(self, kid: str) -> RetireOutcome:
        """Stop publishing `kid` now; refused for the active key."""
        outcome = await self._store.retire(kid)
        if outcome.key is not None and not outcome.refused:
            self._opened.pop(kid, None)
        return outcome

    def _open(self, record: SigningKeyRecord) -> SigningKey:
        key = self._opened.get(record.kid)
        if key is None:
            key = SigningKey.unseal(record, self._box)
            self._opened[record.kid] = key
        return key


@dataclass(frozen=True)
class AccessToken:
    """A signed access token and how long it stays valid."""

    token: str
    expires_in: int
    jti: str
    kid: str


class TokenIssuer:
    """Signs access tokens with the current key for one issuer and audience."""

    def __init__(
        self,
        keys: KeyRing,
        *,
        issuer: str,
        audience: str,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._ttl = ttl_seconds
        self._clock = clock

    @property
    def ttl_seconds(self) -> int:
        """Lifetime of the tokens issued."""
        return self._ttl

    async def issue(
        self,
        *,
        subject: str,
        username: str,
        roles: Sequence[str],
        session_id: str,
        generation: int,
        tenant: str,
        tenant_generation: int,
    ) -> AccessToken:
        """A token for user `subject` of `tenant` in session `session_id`, carrying username,
        roles, the user's token generation (`gen`) and the tenant's (`tgen`): gateways refuse a
        token whose user or tenant generation was revoked."""
        key = await self._keys.current()
        now = int(self._clock())
        jti = secrets.token_urlsafe(16)
        claims = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": subject,
            "sid": session_id,
            "preferred_username": username,
            "roles": list(roles),
            "gen": generation,
            "tenant": tenant,
            "tgen": tenant_generation,
            "iat": now,
            "nbf": now,
            "exp": now + self._ttl,
            "jti": jti,
        }
        token = jwt.encode(
            claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": JWT_TYPE}
        )
        return AccessToken(token=token, expires_in=self._ttl, jti=jti, kid=key.kid)
