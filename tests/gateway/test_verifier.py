"""The token verifier, its key cache and the audit queue on their own (no servers): every refusal
raises TokenRejected with the one message and a precise reason code."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.gateway.audit import AuditTrail, refusal
from services.gateway.tokens import (
    INVALID_TOKEN,
    MAX_TOKEN_CHARS,
    JwksCache,
    Reason,
    TokenRejected,
    TokenVerifier,
)
from services.gateway.upstream import client_address
from streammesh.api.auth.v1 import auth_pb2
from streammesh.mesh.errors import Unavailable
from tests.gateway.jwts import (
    b64url,
    claims,
    forge,
    hs256_with,
    live_revocations,
    public_jwk,
    sign,
    sign_exact,
)

KEY = Ed25519PrivateKey.generate()
KID = "test-key-1"
ATTACKER = Ed25519PrivateKey.generate()
LEEWAY = 30


def _jwks(*keys: tuple[str, Ed25519PrivateKey]) -> list[auth_pb2.JsonWebKey]:
    return [
        auth_pb2.JsonWebKey(kid=kid, alg="EdDSA", use="sig", **public_jwk(key)) for kid, key in keys
    ]


class FakeAuth:
    """A JWKS source that counts fetches and can be made to fail."""

    def __init__(self, keys: list[auth_pb2.JsonWebKey]) -> None:
        self.keys = keys
        self.fetches = 0
        self.down = False

    async def __call__(self) -> list[auth_pb2.JsonWebKey]:
        self.fetches += 1
        if self.down:
            raise Unavailable("auth is unavailable: test")
        return list(self.keys)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def auth() -> FakeAuth:
    return FakeAuth(_jwks((KID, KEY)))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(auth: FakeAuth, clock: Clock) -> TokenVerifier:
    cache = JwksCache(auth, max_age=60, min_refetch=10, clock=clock)
    return TokenVerifier(
        cache,
        issuer="streammesh-auth",
        audience="streammesh",
        leeway=LEEWAY,
        revocations=live_revocations(),
    )


async def _reason(verifier: TokenVerifier, token: str) -> Reason:
    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(token)
    assert caught.value.message == INVALID_TOKEN
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    return caught.value.reason


def _public_bytes() -> list[bytes]:
    public = KEY.public_key()
    return [
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        public_jwk(KEY)["x"].encode(),
    ]


def _valid() -> str:
    return sign(claims(), KEY, kid=KID)


def _with_alg(alg: str) -> str:
    return forge({"alg": alg, "typ": "at+jwt", "kid": KID}, claims())


def _hs256(secret: bytes) -> str:
    return hs256_with(secret, {"alg": "HS256", "typ": "at+jwt", "kid": KID}, claims())


def _without(claim: str) -> str:
    return sign(claims(**{claim: None}), KEY, kid=KID)


ATTACKS: dict[str, tuple[Callable[[], str], Reason]] = {
    "empty": (lambda: "", Reason.MISSING_TOKEN),
    "oversize": (lambda: "a" * (MAX_TOKEN_CHARS + 1), Reason.OVERSIZE),
    "one segment": (lambda: "abc", Reason.MALFORMED),
    "four segments": (lambda: _valid() + ".x", Reason.MALFORMED),
    "not base64": (lambda: "@@@.###.$$$", Reason.MALFORMED),
    "header not json": (lambda: f"{b64url(b'nope')}.{b64url(b'{}')}.", Reason.MALFORMED),
    # An Ed25519 signature is 86 base64url characters. Cut to 64 they still decode (48 bytes):
    # a wrong signature. Cut to 66 they decode only when the 4 spare bits happen to be zero.
    "truncated signature": (lambda: _valid()[:-22], Reason.BAD_SIGNATURE),
    "signature with spare bits set": (lambda: _spare_bits_set(_valid()), Reason.MALFORMED),
    "truncated payload": (lambda: _valid()[:60], Reason.MALFORMED),
    "signature stripped": (lambda: _valid().rsplit(".", 1)[0] + ".", Reason.BAD_SIGNATURE),
    "payload swapped": (
        lambda: ".".join(
            [
                _valid().split(".")[0],
                sign(claims(roles=["admin"]), ATTACKER, kid=KID).split(".")[1],
                _valid().split(".")[2],
            ]
        ),
        Reason.BAD_SIGNATURE,
    ),
    **{
        f"alg {alg}": (
            partial(_with_alg, alg),
            Reason.BAD_HEADER,
        )
        for alg in ("none", "None", "nOnE", "NONE", "")
    },
    "no alg": (lambda: forge({"typ": "at+jwt", "kid": KID}, claims()), Reason.BAD_HEADER),
    **{
        f"HS256 keyed with public key {i}": (
            partial(_hs256, secret),
            Reason.BAD_HEADER,
        )
        for i, secret in enumerate(_public_bytes())
    },
    "no typ": (
        lambda: jwt_encode_with_headers({"kid": KID}),
        Reason.BAD_HEADER,
    ),
    "typ JWT (an ID token)": (
        lambda: jwt_encode_with_headers({"kid": KID, "typ": "JWT"}),
        Reason.BAD_HEADER,
    ),
    "no kid": (lambda: jwt_encode_with_headers({"typ": "at+jwt"}), Reason.BAD_HEADER),
    "kid path traversal": (lambda: sign(claims(), KEY, kid="../../etc/passwd"), Reason.BAD_HEADER),
    "kid sql injection": (lambda: sign(claims(), KEY, kid="' OR 1=1 --"), Reason.BAD_HEADER),
    "kid not a string": (
        lambda: jwt_encode_with_headers({"kid": 7, "typ": "at+jwt"}),
        Reason.BAD_HEADER,
    ),
    "unknown kid": (lambda: sign(claims(), KEY, kid="no-such-key"), Reason.UNKNOWN_KID),
    "crit header": (lambda: sign(claims(), KEY, kid=KID, crit=["exp"]), Reason.BAD_HEADER),
    "b64 false": (
        lambda: sign(claims(), KEY, kid=KID, b64=False, crit=["b64"]),
        Reason.BAD_HEADER,
    ),
    "attacker key with jwk header": (
        lambda: sign(claims(), ATTACKER, kid=KID, jwk=public_jwk(ATTACKER)),
        Reason.BAD_SIGNATURE,
    ),
    "attacker key with jku/x5u/x5c": (
        lambda: sign(
            claims(),
            ATTACKER,
            kid=KID,
            jku="https://evil.example/jwks.json",
            x5u="https://evil.example/cert.pem",
            x5c=["MIIB"],
        ),
        Reason.BAD_SIGNATURE,
    ),
    "wrong issuer": (lambda: sign(claims(iss="evil"), KEY, kid=KID), Reason.WRONG_ISSUER),
    "no audience": (lambda: sign(claims(aud=None), KEY, kid=KID), Reason.MISSING_CLAIM),
    "foreign audience": (
        lambda: sign(claims(aud="other-api"), KEY, kid=KID),
        Reason.WRONG_AUDIENCE,
    ),
    "foreign audience list": (
        lambda: sign(claims(aud=["a", "b"]), KEY, kid=KID),
        Reason.WRONG_AUDIENCE,
    ),
    **{
        f"no {claim}": (
            partial(_without, claim),
            Reason.MISSING_CLAIM,
        )
        for claim in ("iss", "sub", "exp", "nbf", "iat", "jti", "sid", "preferred_username")
    },
    "roles not a list": (
        lambda: sign(claims(roles="admin"), KEY, kid=KID),
        Reason.BAD_CLAIM,
    ),
    "roles not strings": (lambda: sign(claims(roles=[1]), KEY, kid=KID), Reason.BAD_CLAIM),
    "username not ascii": (
        lambda: sign(claims(preferred_username="m\u00e4llory"), KEY, kid=KID),
        Reason.BAD_CLAIM,
    ),
    "username with newline": (
        lambda: sign(claims(preferred_username="a\nb"), KEY, kid=KID),
        Reason.BAD_CLAIM,
    ),
    "sid empty": (lambda: sign(claims(sid=""), KEY, kid=KID), Reason.BAD_CLAIM),
    "gen a string": (lambda: sign(claims(gen="1"), KEY, kid=KID), Reason.BAD_CLAIM),
    "gen a boolean": (lambda: sign(claims(gen=True), KEY, kid=KID), Reason.BAD_CLAIM),
    "gen negative": (lambda: sign(claims(gen=-1), KEY, kid=KID), Reason.BAD_CLAIM),
    "gen fractional": (lambda: sign(claims(gen=1.5), KEY, kid=KID), Reason.BAD_CLAIM),
    "sub not a string": (lambda: sign(claims(sub=7), KEY, kid=KID), Reason.BAD_CLAIM),
    "expired beyond leeway": (
        lambda: sign(claims(exp=int(time.time()) - LEEWAY - 5, iat=0, nbf=0), KEY, kid=KID),
        Reason.EXPIRED,
    ),
    "nbf beyond leeway": (
        lambda: sign(claims(nbf=int(time.time()) + LEEWAY + 5), KEY, kid=KID),
        Reason.NOT_YET_VALID,
    ),
    "iat beyond leeway": (
        lambda: sign(claims(iat=int(time.time()) + LEEWAY + 5), KEY, kid=KID),
        Reason.NOT_YET_VALID,
    ),
}


def _spare_bits_set(token: str) -> str:
    """The token with its signature cut to 66 characters whose last one has non-zero spare
    bits: not canonical base64url."""
    head, signature = token.rsplit(".", 1)
    return f"{head}.{signature[:65]}B"


def jwt_encode_with_headers(headers: dict[str, Any]) -> str:
    """A token signed with the real key whose header is exactly alg EdDSA plus `headers`."""
    return sign_exact({"alg": "EdDSA", **headers}, claims(), KEY)


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_attack_is_refused_with_its_reason(verifier: TokenVerifier, attack: str) -> None:
    make, reason = ATTACKS[attack]
    assert await _reason(verifier, make()) == reason


async def test_valid_token_names_the_caller(verifier: TokenVerifier) -> None:
    body = claims(roles=["producer"])
    principal = await verifier.verify(sign(body, KEY, kid=KID))
    assert principal.subject == body["sub"]
    assert principal.session_id == body["sid"]
    assert principal.roles == {"producer"}
    assert principal.actor == "user:mallory"


@pytest.mark.parametrize(
    ("overrides"),
    [
        {"exp": -(LEEWAY - 5), "iat": -600, "nbf": -600},  # expired, but within the leeway
        {"nbf": LEEWAY - 5},  # not yet valid, but within the leeway
        {"iat": LEEWAY - 5},
    ],
    ids=["exp", "nbf", "iat"],
)
async def test_clock_skew_within_the_leeway_is_accepted(
    verifier: TokenVerifier, overrides: dict[str, int]
) -> None:
    now = int(time.time())
    body = claims(**{name: now + delta for name, delta in overrides.items()})
    assert (await verifier.verify(sign(body, KEY, kid=KID))).subject == body["sub"]


async def test_unknown_kids_refetch_at_most_once_per_interval(
    verifier: TokenVerifier, auth: FakeAuth, clock: Clock
) -> None:
    await verifier.verify(_valid())
    assert auth.fetches == 1
    for i in range(20):
        assert await _reason(verifier, sign(claims(), KEY, kid=f"forged-{i}")) == Reason.UNKNOWN_KID
    assert auth.fetches == 2  # the first forged kid refetched; the others wait
    clock.now += 9
    await _reason(verifier, sign(claims(), KEY, kid="forged-x"))
    assert auth.fetches == 2
    clock.now += 1
    for i in range(20):
        await _reason(verifier, sign(claims(), KEY, kid=f"forged-{i}"))
    assert auth.fetches == 3


async def test_a_new_key_verifies_at_once(
    verifier: TokenVerifier, auth: FakeAuth, clock: Clock
) -> None:
    """Right after a fetch (here the first one), a rotation's first token triggers a refetch."""
    await verifier.verify(_valid())
    rotated = Ed25519PrivateKey.generate()
    auth.keys = _jwks((KID, KEY), ("test-key-2", rotated))
    clock.now += 0.1
    await verifier.verify(sign(claims(), rotated, kid="test-key-2"))
    assert auth.fetches == 2


async def test_concurrent_unknown_kids_share_one_refetch(
    verifier: TokenVerifier, auth: FakeAuth, clock: Clock
) -> None:
    await verifier.verify(_valid())
    rotated = Ed25519PrivateKey.generate()
    auth.keys = _jwks((KID, KEY), ("test-key-2", rotated))
    token = sign(claims(), rotated, kid="test-key-2")
    await asyncio.gather(*(verifier.verify(token) for _ in range(10)))
    assert auth.fetches == 2


async def test_retired_key_stops_verifying_after_max_age(
    verifier: TokenVerifier, auth: FakeAuth, clock: Clock
) -> None:
    token = _valid()
    await verifier.verify(token)
    auth.keys = []  # auth retired the key
    clock.now += 59
    await verifier.verify(token)  # still cached
    clock.now += 2
    assert await _reason(verifier, token) == Reason.UNKNOWN_KID


async def test_cached_keys_survive_an_auth_outage(
    verifier: TokenVerifier, auth: FakeAuth, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    token = _valid()
    await verifier.verify(token)
    auth.down = True
    clock.now += 61
    with caplog.at_level(logging.WARNING):
        await verifier.verify(token)
    assert "JWKS refresh failed" in caplog.text
    await verifier.verify(token)
    assert auth.fetches == 2  # the next attempt waits min_refetch
    clock.now += 10
    await verifier.verify(token)
    assert auth.fetches == 3


async def test_no_keys_and_auth_down_is_unavailable(
    verifier: TokenVerifier, auth: FakeAuth, clock: Clock
) -> None:
    auth.down = True
    results = await asyncio.gather(
        *(verifier.verify(_valid()) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(result, Unavailable) for result in results), results
    auth.down = False
    clock.now += 1.5  # past the first-fetch backoff
    await verifier.verify(_valid())


async def test_only_ed25519_signing_keys_are_used(auth: FakeAuth, clock: Clock) -> None:
    auth.keys = [
        auth_pb2.JsonWebKey(kid="ec", kty="EC", crv="P-256", x="AA", y="AA", alg="ES256"),
        auth_pb2.JsonWebKey(kid="enc", use="enc", alg="EdDSA", **public_jwk(KEY)),
        auth_pb2.JsonWebKey(kid="broken", kty="OKP", crv="Ed25519", x="!!", alg="EdDSA"),
        *_jwks((KID, KEY)),
    ]
    cache = JwksCache(auth, max_age=60, min_refetch=10, clock=clock)
    verifier = TokenVerifier(
        cache,
        issuer="streammesh-auth",
        audience="streammesh",
        leeway=0,
        revocations=live_revocations(),
    )
    await verifier.verify(_valid())
    for kid in ("ec", "enc", "broken"):
        assert await _reason(verifier, sign(claims(), KEY, kid=kid)) == Reason.UNKNOWN_KID


def _event(n: int) -> auth_pb2.AuditEvent:
    return refusal(
        action="token_invalid",
        reason="malformed",
        actor="anonymous",
        source=f"ipv4:10.0.0.{n}:1",
        details={"method": "m"},
    )


async def test_audit_trail_sends_events_in_the_background() -> None:
    sent: list[auth_pb2.AuditEvent] = []

    async def send(event: auth_pb2.AuditEvent) -> None:
        sent.append(event)

    trail = AuditTrail(send, capacity=10)
    for n in range(5):
        trail.record(_event(n))
    await trail.close(timeout=5)
    assert [e.source for e in sent] == [f"ipv4:10.0.0.{n}:1" for n in range(5)]
    assert trail.sent == 5 and trail.dropped == 0
    assert all(e.event_id and e.time.seconds and e.outcome == "denied" for e in sent)


async def test_audit_trail_never_blocks_and_counts_what_it_drops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def stuck(event: auth_pb2.AuditEvent) -> None:
        await release.wait()

    trail = AuditTrail(stuck, capacity=3, warn_interval=3600)
    with caplog.at_level(logging.WARNING):
        started = time.perf_counter()
        for n in range(100):
            trail.record(_event(n))
        assert time.perf_counter() - started < 0.1
    await asyncio.sleep(0)
    # One event is with the sender, three wait in the queue, the rest were dropped.
    assert 96 <= trail.dropped <= 97
    warnings = [r for r in caplog.records if "audit event dropped" in r.getMessage()]
    assert len(warnings) == 1  # rate limited
    release.set()
    await trail.close(timeout=5)


async def test_audit_trail_drops_when_auth_fails_and_keeps_going() -> None:
    calls = 0

    async def flaky(event: auth_pb2.AuditEvent) -> None:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise ConnectionError("auth is down")

    trail = AuditTrail(flaky, capacity=100)
    for n in range(10):
        trail.record(_event(n))
    await trail.close(timeout=5)
    assert (trail.sent, trail.dropped) == (5, 5)


async def test_audit_trail_close_gives_up_after_its_timeout() -> None:
    async def hang(event: auth_pb2.AuditEvent) -> None:
        await asyncio.sleep(3600)

    trail = AuditTrail(hang, capacity=10)
    for n in range(3):
        trail.record(_event(n))
    started = time.perf_counter()
    await trail.close(timeout=0.2)
    assert time.perf_counter() - started < 1
    assert (trail.sent, trail.dropped) == (0, 3)


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:127.0.0.1:57522", "127.0.0.1"),
        ("ipv6:%5B::1%5D:49590", "::1"),
        ("ipv6:[2001:db8::7]:443", "2001:db8::7"),
        ("unix:/run/gw.sock", "unix:/run/gw.sock"),
        ("ipv4:not-an-ip:1", "ipv4:not-an-ip:1"),
        (None, ""),
    ],
)
def test_client_address_drops_the_port(peer: str | None, address: str) -> None:
    assert client_address(peer) == address


async def test_auth_down_before_the_first_fetch_is_not_hammered(
    auth: FakeAuth, clock: Clock, verifier: TokenVerifier
) -> None:
    auth.down = True
    token = _valid()
    for _ in range(20):
        with pytest.raises(Unavailable):
            await verifier.verify(token)
    assert auth.fetches == 1  # one attempt, then refusals without asking auth
    clock.now += 1.5
    auth.down = False
    assert (await verifier.verify(token)).subject
    assert auth.fetches == 2


async def test_published_keys_come_from_the_cache_and_never_add_fetches(
    auth: FakeAuth, clock: Clock
) -> None:
    auth.keys = [
        *_jwks((KID, KEY)),
        auth_pb2.JsonWebKey(kid="ec", kty="EC", crv="P-256", x="eA", y="eQ"),
    ]
    cache = JwksCache(auth, max_age=60, min_refetch=10, clock=clock)
    for _ in range(50):
        keys, fresh_for = await cache.published()
    # Only the keys the gateway verifies with: the P-256 key is not one.
    assert [k.kid for k in keys] == [KID]
    assert (auth.fetches, fresh_for) == (1, 60)
    clock.now += 45
    assert (await cache.published())[1] == 15
    # An unknown kid at verification refetches; publishing does not, until the keys are due.
    clock.now += 16
    await cache.published()
    assert auth.fetches == 2


async def test_published_keys_during_an_auth_outage(auth: FakeAuth, clock: Clock) -> None:
    auth.down = True
    cache = JwksCache(auth, max_age=60, min_refetch=10, clock=clock)
    with pytest.raises(Unavailable):
        await cache.published()
    with pytest.raises(Unavailable):  # backed off: auth is not asked again at once
        await cache.published()
    assert auth.fetches == 1
    auth.down = False
    clock.now += 2
    await cache.published()
    auth.down = True
    clock.now += 61
    keys, fresh_for = await cache.published()  # the last keys stay, for min_refetch
    assert [k.kid for k in keys] == [KID] and fresh_for == 10
