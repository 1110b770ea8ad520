"""Client-side steps the auth tests share: register, enrol, the two login steps, and metadata."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TypeAlias, cast

import grpc
import pyotp
import pytest

from streammesh.api.auth.v1 import auth_pb2, auth_pb2_grpc

__all__ = [
    "INVALID",
    "PASSWORD",
    "Enrolled",
    "FakeClock",
    "Stub",
    "as_user",
    "async_stub",
    "complete",
    "enrol",
    "failure",
    "fresh_code",
    "login",
    "register",
    "start",
    "unique_name",
    "wrong_code",
]

Stub: TypeAlias = "auth_pb2_grpc.AuthServiceAsyncStub"
"""What `AuthServiceStub(aio_channel)` is (the async stub type exists only for type checkers)."""
Metadata = tuple[tuple[str, str], ...]

PASSWORD = "correct horse battery staple"
INVALID = "invalid username, password or code"


class FakeClock:
    """The time auth checks TOTP codes against; starts at the real time, moves when told."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Clock = FakeClock


def async_stub(channel: grpc.aio.Channel) -> Stub:
    # grpc ships no type information, so the stub's overload cannot see the channel is async.
    return cast(Stub, auth_pb2_grpc.AuthServiceStub(channel))


def unique_name() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


def as_user(actor: str = "anonymous", source: str = "198.51.100.7") -> Metadata:
    """The metadata the gateway sends for a call on behalf of a person."""
    return (("x-streammesh-actor", actor), ("x-streammesh-source", source))


async def failure(call: object) -> grpc.aio.AioRpcError:
    """The error a call ends with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


@dataclass(frozen=True)
class Enrolled:
    secret: str
    recovery_codes: list[str]


async def register(
    stub: Stub, username: str, password: str = PASSWORD, *, metadata: Metadata = ()
) -> str:
    reply = await stub.Register(
        auth_pb2.RegisterRequest(username=username, password=password),
        metadata=metadata,
        timeout=10,
    )
    return str(reply.user_id)


def fresh_code(secret: str, clock: Clock) -> str:
    """The code of the next time step: moves the (fake) clock on by one step first, because a
    code, once accepted, is never accepted again."""
    clock.advance(30)
    return str(pyotp.TOTP(secret).at(clock()))


async def enrol(
    stub: Stub, username: str, clock: Clock, password: str = PASSWORD, *, metadata: Metadata = ()
) -> Enrolled:
    """Begin and confirm TOTP; returns the base32 secret and the recovery codes."""
    begun = await stub.BeginTotpEnrollment(
        auth_pb2.BeginTotpEnrollmentRequest(username=username, password=password),
        metadata=metadata,
        timeout=10,
    )
    confirmed = await stub.ConfirmTotpEnrollment(
        auth_pb2.ConfirmTotpEnrollmentRequest(
            username=username, password=password, code=pyotp.TOTP(begun.secret).at(clock())
        ),
        metadata=metadata,
        timeout=10,
    )
    return Enrolled(secret=str(begun.secret), recovery_codes=list(confirmed.recovery_codes))


async def start(
    stub: Stub, username: str, password: str = PASSWORD, *, metadata: Metadata = ()
) -> str:
    """StartLogin; returns the challenge."""
    reply = await stub.StartLogin(
        auth_pb2.StartLoginRequest(username=username, password=password),
        metadata=metadata,
        timeout=10,
    )
    return str(reply.challenge)


async def complete(
    stub: Stub,
    challenge: str,
    *,
    totp_code: str | None = None,
    recovery_code: str | None = None,
    metadata: Metadata = (),
) -> auth_pb2.SessionTokens:
    request = auth_pb2.CompleteLoginRequest(challenge=challenge)
    if totp_code is not None:
        request.totp_code = totp_code
    if recovery_code is not None:
        request.recovery_code = recovery_code
    reply = await stub.CompleteLogin(request, metadata=metadata, timeout=10)
    tokens: auth_pb2.SessionTokens = reply.tokens
    return tokens


async def login(
    stub: Stub,
    username: str,
    secret: str,
    clock: Clock,
    password: str = PASSWORD,
    *,
    metadata: Metadata = (),
) -> auth_pb2.SessionTokens:
    """Both steps with the authenticator's next code."""
    challenge = await start(stub, username, password, metadata=metadata)
    return await complete(stub, challenge, totp_code=fresh_code(secret, clock), metadata=metadata)


def wrong_code(secret: str, now: float) -> str:
    """A well-formed code that is valid in none of the steps near `now`."""
    totp = pyotp.TOTP(secret)
    accepted = {totp.at(now + 30 * offset) for offset in range(-3, 4)}
    return next(c for c in (f"{n:06d}" for n in range(1000)) if c not in accepted)
