"""Access-token verification: EdDSA JWTs from auth, keys from auth's JWKS.

The verifier pins the algorithm (EdDSA only, with keys bound to it), requires the RFC 9068 `typ`
and every claim it relies on, checks iss/aud/exp/nbf/iat with a small leeway, and uses `kid` only
as a lookup key into keys fetched from auth. Headers that point at other keys (jku, x5u, jwk,
x5c) are never read: PyJWT only ever sees the key this module hands it. Headers that would change
how the token is parsed (crit, b64) are refused.

A token that passes all that is then checked against the revocations auth announced (see
services.gateway.revocations): its session (`sid`) revoked, or its user's token generation
(`gen`, 0 when absent) or its tenant's (`tgen`, 0 when absent) below the one auth revoked up to.

The principal's tenant is the `tenant` claim ("default" when absent: tokens issued before
tenants existed). The platform-admin role (`admin`) counts only in tenant "default", where auth
alone grants it, so a token of another tenant can never carry platform power.

Every rejection is a `TokenRejected`: the client sees UNAUTHENTICATED with the one message
INVALID_TOKEN, while `reason` (a `Reason`) goes to the audit log only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import jwt

from services.gateway.revocations import RevocationList, Revoked
from streammesh.api.auth.v1 import auth_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.mesh.errors import StreamMeshError, Unauthenticated, Unavailable
from streammesh.mesh.tenancy import DEFAULT_TENANT, canonical_tenant

__all__ = [
    "ALGORITHM",
    "INVALID_TOKEN",
    "MAX_TOKEN_CHARS",
    "PLATFORM_ADMIN_ROLE",
    "REQUIRED_CLAIMS",
    "TOKEN_TYPE",
    "JwksCache",
    "Principal",
    "Reason",
    "TokenRejected",
    "TokenVerifier",
    "public_keys",
]

log = logging.getLogger(__name__)

INVALID_TOKEN = "missing or invalid access token"  # noqa: S105 - a message, not a secret
MAX_TOKEN_CHARS = 4096
"""Auth's tokens are well under 1 kB; anything longer is refused before it is parsed."""
ALGORITHM = "EdDSA"


def public_keys(keys: Sequence[auth_pb2.JsonWebKey]) -> list[gateway_pb2.JsonWebKey]:
    """The keys as the gateway publishes them (GetJwks, /.well-known/jwks.json): bound to EdDSA
    signatures, which is all the gateway accepts, so every verifier is told so."""
    return [
        gateway_pb2.JsonWebKey(kty=k.kty, kid=k.kid, alg=ALGORITHM, use="sig", crv=k.crv, x=k.x)
        for k in keys
    ]


TOKEN_TYPE = "at+jwt"  # noqa: S105 - RFC 9068 token type
_TOKEN_TYPES = frozenset({TOKEN_TYPE, f"application/{TOKEN_TYPE}"})
REQUIRED_CLAIMS = ["iss", "aud", "sub", "exp", "nbf", "iat", "jti", "sid", "preferred_username"]
# Auth's kids are RFC 7638 thumbprints (base64url); anything else cannot name one of its keys.
_KID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Headers that change how PyJWT parses the token (RFC 7797 detached payloads, critical
# extensions); auth never sets them, so their presence means someone else made the token.
_REFUSED_HEADERS = frozenset({"crit", "b64"})
_MAX_USERNAME_CHARS = 128
PLATFORM_ADMIN_ROLE = "admin"
"""The platform administrator's role; auth grants it only in tenant "default"."""


class Reason(StrEnum):
    """Why a token was refused: audit only, never sent to the client."""

    MISSING_TOKEN = "missing_token"  # noqa: S105 - a reason code, not a secret
    OVERSIZE = "oversize"
    MALFORMED = "malformed"
    BAD_HEADER = "bad_header"
    UNKNOWN_KID = "unknown_kid"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_AUDIENCE = "wrong_audience"
    WRONG_ISSUER = "wrong_issuer"
    MISSING_CLAIM = "missing_claim"
    BAD_CLAIM = "bad_claim"
    REVOKED = "revoked"


class TokenRejected(Unauthenticated):
    """A refused access token. The status message is always INVALID_TOKEN; `reason` is not sent."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(INVALID_TOKEN)
        self.reason = reason


@dataclass(frozen=True)
class Principal:
    """Who is calling, as the verified token says."""

    subject: str
    username: str
    roles: frozenset[str]
    token_id: str
    session_id: str
    generation: int = 0
    """The user's token generation when the token was issued (`gen`)."""
    tenant: str = DEFAULT_TENANT
    """The tenant the caller belongs to and every call acts in (`tenant`)."""
    tenant_generation: int = 0
    """The tenant's token generation when the token was issued (`tgen`)."""

    @property
    def actor(self) -> str:
        """The caller as auth's audit log names people."""
        return f"user:{self.username}"


FetchKeys = Callable[[], Awaitable[Sequence[auth_pb2.JsonWebKey]]]


FIRST_FETCH_BACKOFF_SECONDS = 1.0
"""After a failed first fetch, requests are refused without asking auth for this long."""


class JwksCache:
    """Auth's public keys by kid, each bound to EdDSA.

    Refetched `max_age` seconds after the last fetch, which bounds how long a retired key keeps
    verifying. An unknown kid triggers a refetch at once, unless another unknown kid did so less
    than `min_refetch` seconds ago: forged kids cost auth at most one extra fetch per interval,
    and the first tokens of a new key wait at most that long. If auth cannot be reached, the
    keys fetched last stay in use and auth is asked again every `min_refetch` seconds.
    """

    def __init__(
        self,
        fetch: FetchKeys,
        *,
        max_age: float,
        min_refetch: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._max_age = max_age
        self._min_refetch = min_refetch
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._published: tuple[auth_pb2.JsonWebKey, ...] = ()
        """The JWKS entries behind `_keys`, as auth sent them."""
        self._fetched = False
        self._due = 0.0
        """When the keys are refetched whatever the kid."""
        self._unknown_kid_due = 0.0
        """When an unknown kid may trigger a refetch."""
        self._attempts = 0
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key named `kid`, or TokenRejected(UNKNOWN_KID). Raises Unavailable only when no
        keys were ever fetched and auth cannot be reached."""
        now = self._clock()
        if not self._fetched and now < self._due:
            # Auth failed moments ago: answer at once instead of adding load while it is down.
            raise Unavailable("auth is unavailable: no token keys fetched yet")
        if not self._fetched or now >= self._due:
            await self._refresh(self._attempts, unknown_kid=False)
        elif kid not in self._keys and now >= self._unknown_kid_due:
            await self._refresh(self._attempts, unknown_kid=True)
        if not self._fetched:
            raise Unavailable("auth is unavailable: no token keys fetched yet")
        try:
            return self._keys[kid]
        except KeyError:
            raise TokenRejected(Reason.UNKNOWN_KID) from None

    async def published(self) -> tuple[tuple[auth_pb2.JsonWebKey, ...], float]:
        """The keys this cache verifies with, as auth published them, and for how many more
        seconds they are current (until the next scheduled refetch). Never refetches before
        that, whoever asks: publishing the keys costs auth nothing more than verifying does."""
        now = self._clock()
        if not self._fetched and now < self._due:
            raise Unavailable("auth is unavailable: no token keys fetched yet")
        if not self._fetched or now >= self._due:
            await self._refresh(self._attempts, unknown_kid=False)
        if not self._fetched:
            raise Unavailable("auth is unavailable: no token keys fetched yet")
        return self._published, max(0.0, self._due - self._clock())

    async def _refresh(self, seen: int, *, unknown_kid: bool) -> None:
        async with self._lock:
            if self._attempts != seen:  # fetched while this caller waited: use that result
                return
            self._attempts += 1
            now = self._clock()
            if unknown_kid:
                self._unknown_kid_due = now + self._min_refetch
            try:
                keys = await self._fetch()
            except StreamMeshError:
                if not self._fetched:
                    self._due = now + min(self._min_refetch, FIRST_FETCH_BACKOFF_SECONDS)
                    raise
                log.warning("JWKS refresh failed; using cached keys", exc_info=True)
                self._due = now + self._min_refetch
                return
            usable = [(jwk, key) for jwk in keys if (key := _verification_key(jwk)[1])]
            self._keys = {jwk.kid: key for jwk, key in usable}
            self._published = tuple(jwk for jwk, _ in usable)
            self._fetched = True
            self._due = now + self._max_age


def _verification_key(jwk: auth_pb2.JsonWebKey) -> tuple[str, jwt.PyJWK | None]:
    """An Ed25519 signing key from the JWKS bound to EdDSA, or None for any other key."""
    if jwk.kty != "OKP" or jwk.crv != "Ed25519" or jwk.use not in ("", "sig"):
        return jwk.kid, None
    if jwk.alg not in ("", ALGORITHM) or not _KID.fullmatch(jwk.kid):
        return jwk.kid, None
    try:
        key = jwt.PyJWK({"kty": jwk.kty, "crv": jwk.crv, "x": jwk.x}, algorithm=ALGORITHM)
    except jwt.PyJWTError:
        log.warning("skipping unusable key %s in auth's JWKS", jwk.kid)
        return jwk.kid, None
    return jwk.kid, key


# Checked in this order: InvalidSignatureError is a DecodeError, and every other class is an
# InvalidTokenError.
_DECODE_REASONS: tuple[tuple[type[jwt.PyJWTError], Reason], ...] = (
    (jwt.InvalidSignatureError, Reason.BAD_SIGNATURE),
    (jwt.ExpiredSignatureError, Reason.EXPIRED),
    (jwt.ImmatureSignatureError, Reason.NOT_YET_VALID),
    (jwt.InvalidAudienceError, Reason.WRONG_AUDIENCE),
    (jwt.InvalidIssuerError, Reason.WRONG_ISSUER),
    (jwt.MissingRequiredClaimError, Reason.MISSING_CLAIM),
    (jwt.InvalidAlgorithmError, Reason.BAD_HEADER),
    (jwt.InvalidKeyError, Reason.BAD_SIGNATURE),
    (jwt.DecodeError, Reason.MALFORMED),
)


def _decode_reason(error: jwt.PyJWTError) -> Reason:
    for error_type, reason in _DECODE_REASONS:
        if isinstance(error, error_type):
            return reason
    return Reason.BAD_CLAIM


def _checked_header(token: str) -> dict[str, Any]:
    """The unverified header when it could belong to one of auth's tokens."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError:  # not base64url, not JSON, not an object
        raise TokenRejected(Reason.MALFORMED) from None
    except jwt.PyJWTError:  # a header PyJWT refuses (kid not a string, unknown crit, ...)
        raise TokenRejected(Reason.BAD_HEADER) from None
    typ = header.get("typ")
    kid = header.get("kid")
    if (
        header.get("alg") != ALGORITHM
        or not isinstance(typ, str)
        or typ.lower() not in _TOKEN_TYPES
        or not isinstance(kid, str)
        or not _KID.fullmatch(kid)
        or _REFUSED_HEADERS & header.keys()
    ):
        raise TokenRejected(Reason.BAD_HEADER)
    return header


class TokenVerifier:
    """Checks access tokens against auth's keys and the issuer and audience configured."""

    def __init__(
        self,
        keys: JwksCache,
        *,
        issuer: str,
        audience: str,
        leeway: float,
        revocations: RevocationList,
    ) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._revocations = revocations
        self.refusals: Counter[str] = Counter()
        """Tokens refused at the gateway's door, by reason (the guard counts them here, for
        the metrics)."""

    async def verify(self, token: str) -> Principal:
        """The principal a valid, unrevoked token names; TokenRejected (with its reason)
        otherwise. Unavailable when the revocation list is stale and fails closed."""
        if not token:
            raise TokenRejected(Reason.MISSING_TOKEN)
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenRejected(Reason.OVERSIZE)
        if not token.isascii() or token.count(".") != 2:
            raise TokenRejected(Reason.MALFORMED)
        header = _checked_header(token)
        key = await self._keys.key(header["kid"])
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as error:
            raise TokenRejected(_decode_reason(error)) from None
        principal = _principal(claims)
        try:
            self._revocations.check(
                principal.subject,
                principal.session_id,
                principal.generation,
                tenant=principal.tenant,
                tenant_generation=principal.tenant_generation,
            )
        except Revoked:
            raise TokenRejected(Reason.REVOKED) from None
        return principal


def _principal(claims: dict[str, Any]) -> Principal:
    roles = claims.get("roles", [])
    username = claims["preferred_username"]
    session_id = claims["sid"]
    generation = claims.get("gen", 0)
    tenant_claim = claims.get("tenant", DEFAULT_TENANT)
    tenant = canonical_tenant(tenant_claim) if isinstance(tenant_claim, str) else None
    tenant_generation = claims.get("tgen", 0)
    if (
        not isinstance(roles, list)
        or not all(isinstance(role, str) for role in roles)
        # The username travels on in gRPC metadata (the actor), which must be printable ASCII.
        or not isinstance(username, str)
        or not 0 < len(username) <= _MAX_USERNAME_CHARS
        or not (username.isascii() and username.isprintable())
        or not isinstance(session_id, str)
        or not session_id
        # bool is an int in Python, but not a generation
        or not isinstance(generation, int)
        or isinstance(generation, bool)
        or generation < 0
        # The tenant travels on in metadata too, and only in its canonical form.
        or tenant is None
        or tenant != tenant_claim
        or not isinstance(tenant_generation, int)
        or isinstance(tenant_generation, bool)
        or tenant_generation < 0
    ):
        raise TokenRejected(Reason.BAD_CLAIM)
    granted = frozenset(roles)
    if tenant != DEFAULT_TENANT:
        granted -= {PLATFORM_ADMIN_ROLE}
    return Principal(
        subject=str(claims["sub"]),
        username=username,
        roles=granted,
        token_id=str(claims["jti"]),
        session_id=session_id,
        generation=generation,
        tenant=tenant,
        tenant_generation=tenant_generation,
    )
