"""Attacks on the gateway's token check, over the wire against real auth: every forged, tampered,
stale or misdirected token is refused with UNAUTHENTICATED and the one message, never INTERNAL,
and each refusal leaves an audit row (read back through AdminService) with its reason code, the
method, the client address, and nothing of the token."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.gateway.tokens import INVALID_TOKEN, MAX_TOKEN_CHARS
from streammesh.api.gateway.v1 import admin_pb2, gateway_pb2
from tests.gateway.conftest import Stack, audit_events
from tests.gateway.jwts import claims, forge, hs256_with, public_jwk, sign

METHOD = "streammesh.gateway.v1.GatewayService/CountEvents"
LEEWAY = 30  # GatewaySettings.token_leeway_seconds, the default the stack runs with
MARGIN = 5  # seconds either side of the leeway edge: far above test run time, far below 30 s
ATTACKER = Ed25519PrivateKey.generate()


@dataclass(frozen=True)
class Signer:
    """The auth service's real active signing key (what a stolen key would give an attacker)."""

    kid: str
    key: Ed25519PrivateKey

    def sign(self, **overrides: Any) -> str:
        return sign(claims(roles=["analyst"], **overrides), self.key, kid=self.kid)


@pytest.fixture(scope="module")
async def signer(stack: Stack) -> Signer:
    key = await stack.auth_deps.keys.current()
    return Signer(kid=key.kid, key=key.private_key)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _count(stack: Stack, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    try:
        await stack.gateway.CountEvents(
            gateway_pb2.CountEventsRequest(), metadata=metadata, timeout=10
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _refused(stack: Stack, metadata: tuple[tuple[str, str], ...]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.gateway.CountEvents(
            gateway_pb2.CountEventsRequest(), metadata=metadata, timeout=10
        )
    return caught.value


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _public_key_bytes(signer: Signer) -> list[bytes]:
    public = signer.key.public_key()
    return [
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    ]


Attack = Callable[[Stack, Signer], tuple[tuple[str, str], ...]]


def _forged_alg(alg: str) -> Attack:
    return lambda stack, s: _bearer(
        forge({"alg": alg, "typ": "at+jwt", "kid": s.kid}, claims(roles=["analyst"]))
    )


def _hs256(index: int) -> Attack:
    return lambda stack, s: _bearer(
        hs256_with(
            _public_key_bytes(s)[index],
            {"alg": "HS256", "typ": "at+jwt", "kid": s.kid},
            claims(roles=["analyst"]),
        )
    )


def _real_token(stack: Stack) -> str:
    return stack.people["producer"].access_token


def _escalated(stack: Stack, s: Signer) -> tuple[tuple[str, str], ...]:
    """A real producer token whose payload was swapped for one claiming admin."""
    head, _, signature = _real_token(stack).split(".")
    payload = sign(claims(roles=["admin"]), ATTACKER, kid=s.kid).split(".")[1]
    return _bearer(f"{head}.{payload}.{signature}")


ATTACKS: dict[str, tuple[Attack, str]] = {
    "no authorization header": (lambda stack, s: (), "missing_token"),
    "empty bearer": (lambda stack, s: (("authorization", "Bearer "),), "missing_token"),
    "basic scheme": (lambda stack, s: (("authorization", "Basic YTpi"),), "malformed"),
    "two authorization headers": (
        lambda stack, s: (*_bearer(_real_token(stack)), *_bearer(_real_token(stack))),
        "malformed",
    ),
    "alg none": (_forged_alg("none"), "bad_header"),
    "alg None": (_forged_alg("None"), "bad_header"),
    "alg nOnE": (_forged_alg("nOnE"), "bad_header"),
    "empty signature": (
        lambda stack, s: _bearer(s.sign().rsplit(".", 1)[0] + "."),
        "bad_signature",
    ),
    "HS256 keyed with the raw public key": (_hs256(0), "bad_header"),
    "HS256 keyed with the PEM public key": (_hs256(1), "bad_header"),
    "roles edited in a real token": (_escalated, "bad_signature"),
    "wrong issuer": (lambda stack, s: _bearer(s.sign(iss="https://evil.example")), "wrong_issuer"),
    "missing audience": (lambda stack, s: _bearer(s.sign(aud=None)), "missing_claim"),
    "foreign audience": (lambda stack, s: _bearer(s.sign(aud="billing-api")), "wrong_audience"),
    "missing sid": (lambda stack, s: _bearer(s.sign(sid=None)), "missing_claim"),
    "refresh token as access token": (
        lambda stack, s: _bearer(stack.people["analyst"].refresh_token),
        "malformed",
    ),
    "expired just beyond the leeway": (
        lambda stack, s: _bearer(
            s.sign(exp=int(time.time()) - LEEWAY - MARGIN, iat=int(time.time()) - 600)
        ),
        "expired",
    ),
    "not yet valid just beyond the leeway": (
        lambda stack, s: _bearer(s.sign(nbf=int(time.time()) + LEEWAY + MARGIN)),
        "not_yet_valid",
    ),
    "kid path traversal": (
        lambda stack, s: _bearer(sign(claims(), s.key, kid="../../etc/passwd")),
        "bad_header",
    ),
    "kid sql injection": (
        lambda stack, s: _bearer(sign(claims(), s.key, kid="' OR 1=1 --")),
        "bad_header",
    ),
    "unknown kid": (
        lambda stack, s: _bearer(sign(claims(), ATTACKER, kid="attacker-key-1")),
        "unknown_kid",
    ),
    "truncated in the signature": (
        lambda stack, s: _bearer(_real_token(stack)[:-30]),
        "bad_signature",
    ),
    "truncated in half": (
        lambda stack, s: _bearer(_real_token(stack)[: len(_real_token(stack)) // 2]),
        "malformed",
    ),
    "oversize (just over the gateway's limit)": (
        lambda stack, s: _bearer("e" * (MAX_TOKEN_CHARS + 1)),
        "oversize",
    ),
    "not base64": (lambda stack, s: _bearer("@@@@.!!!!.$$$$"), "malformed"),
    "attacker key with an embedded jwk header": (
        lambda stack, s: _bearer(
            sign(claims(roles=["analyst"]), ATTACKER, kid=s.kid, jwk=public_jwk(ATTACKER))
        ),
        "bad_signature",
    ),
    "attacker key with jku, x5u and x5c headers": (
        lambda stack, s: _bearer(
            sign(
                claims(roles=["analyst"]),
                ATTACKER,
                kid=s.kid,
                jku="https://evil.example/jwks.json",
                x5u="https://evil.example/key.pem",
                x5c=["MIIBszCCAVmgAwIBAgIUW"],
            )
        ),
        "bad_signature",
    ),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_attack_is_refused_identically_and_audited(
    stack: Stack, signer: Signer, attack: str
) -> None:
    make, reason = ATTACKS[attack]
    metadata = make(stack, signer)
    since = _now()
    error = await _refused(stack, metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == INVALID_TOKEN
    # No rich status either: the reason never leaves the gateway.
    assert all(key != "grpc-status-details-bin" for key, _ in error.trailing_metadata() or ())

    def ours(event: admin_pb2.AuditEvent) -> bool:
        return event.reason == reason and event.details.get("method") == METHOD

    events = await audit_events(stack, since=since, action="token_invalid", match=ours)
    assert len(events) == 1, f"expected one audit row for {reason}, found {events}"
    event = events[0]
    assert (event.actor, event.outcome, event.source) == ("anonymous", "denied", "127.0.0.1")
    secrets = [value for _, value in metadata if len(value) > 12]
    stored = str(event)
    assert not any(secret.removeprefix("Bearer ") in stored for secret in secrets)


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": -(LEEWAY - MARGIN), "iat": -600, "nbf": -600},
        {"nbf": LEEWAY - MARGIN},
    ],
    ids=["expired just inside the leeway", "not yet valid just inside the leeway"],
)
async def test_clock_skew_within_the_leeway_is_accepted(
    stack: Stack, signer: Signer, overrides: dict[str, int]
) -> None:
    now = int(time.time())
    token = signer.sign(**{name: now + delta for name, delta in overrides.items()})
    assert await _count(stack, _bearer(token)) == grpc.StatusCode.OK


async def test_real_tokens_work(stack: Stack) -> None:
    analyst = stack.people["analyst"]
    assert await _count(stack, analyst.bearer()) == grpc.StatusCode.OK


async def test_a_one_megabyte_token_is_refused_by_the_transport(stack: Stack) -> None:
    """grpc's limit on received metadata (8 KiB soft, 16 KiB hard) refuses a 1 MB header before
    any handler runs: RESOURCE_EXHAUSTED from the transport, never INTERNAL or UNKNOWN. The
    gateway never sees the call, so there is nothing it could audit."""
    handled = stack.audit.sent + stack.audit.dropped
    error = await _refused(stack, _bearer("e" * 1024 * 1024))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "metadata" in (error.details() or "")
    assert stack.audit.sent + stack.audit.dropped == handled


async def test_tokens_between_the_metadata_limits_are_never_internal(stack: Stack) -> None:
    """Between grpc's soft (8 KiB) and hard (16 KiB) limits the transport refuses some calls at
    random; the ones it lets through reach the gateway's length check. Either way the answer is
    a clean refusal."""
    seen = set()
    for _ in range(10):
        error = await _refused(stack, _bearer("e" * 12 * 1024))
        seen.add(error.code())
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:
            assert error.details() == INVALID_TOKEN
    assert seen <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED}
