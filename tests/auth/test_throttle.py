"""Throttling and lockout, shared through Redis: failed passwords and failed second factors count
per account and per source, with exponential delays (RESOURCE_EXHAUSTED + RetryInfo) and a
temporary lock that admins can lift."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.auth.throttle import Verdict
from streammesh.api.auth.v1 import auth_pb2
from tests.auth.conftest import Auth, AuthFactory, audit_rows
from tests.auth.flows import (
    INVALID,
    FakeClock,
    Stub,
    as_user,
    complete,
    enrol,
    failure,
    fresh_code,
    login,
    register,
    start,
    unique_name,
    wrong_code,
)


async def enrolled_user(stub: Stub, clock: FakeClock) -> tuple[str, str]:
    username = unique_name()
    await register(stub, username)
    return username, (await enrol(stub, username, clock)).secret


def assert_refused(error: grpc.aio.AioRpcError) -> None:
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, INVALID)


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay of a RESOURCE_EXHAUSTED answer, in seconds."""
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(info) for detail in status.details)
    nanoseconds: int = info.retry_delay.ToNanoseconds()
    return nanoseconds / 1e9


@pytest.mark.usefixtures("platform_admins")
async def test_brute_force_locks_the_account_until_an_admin_unlocks_it(
    auth_factory: AuthFactory, clock: FakeClock
) -> None:
    auth = await auth_factory(lockout_threshold=3)
    stub = auth.stub()
    username, secret = await enrolled_user(stub, clock)
    for guess in ("guess number 1", "guess number 2", "guess number 3"):
        assert_refused(await failure(start(stub, username, guess)))
    # Locked: even the right password gets the generic answer.
    assert_refused(await failure(start(stub, username)))
    rows = await audit_rows(auth.deps, subject=username)
    assert [(r["action"], r["reason"]) for r in rows[3:]] == [
        ("login_password", "bad_credentials"),
        ("login_password", "bad_credentials"),
        ("login_password", "bad_credentials"),
        ("lockout", "too_many_failures"),
        ("login_password", "locked"),
    ]

    admin = as_user("user:root-admin", "192.0.2.1")
    listed = await stub.ListUsers(
        auth_pb2.ListUsersRequest(username_prefix=username), metadata=admin, timeout=10
    )
    assert listed.users[0].HasField("locked_until")

    reply = await stub.UnlockUser(
        auth_pb2.UnlockUserRequest(username=username), metadata=admin, timeout=10
    )
    assert not reply.user.HasField("locked_until")
    [unlock] = await audit_rows(auth.deps, action="unlock")
    assert (unlock["actor"], unlock["subject"], unlock["source"]) == (
        "user:root-admin",
        username,
        "192.0.2.1",
    )
    await login(stub, username, secret, clock)


async def test_wrong_second_factors_count_toward_the_lock(
    auth_factory: AuthFactory, clock: FakeClock
) -> None:
    auth = await auth_factory(lockout_threshold=3)
    stub = auth.stub()
    username, secret = await enrolled_user(stub, clock)
    for _ in range(2):
        challenge = await start(stub, username)
        assert_refused(
            await failure(complete(stub, challenge, totp_code=wrong_code(secret, clock())))
        )
    # Correct passwords do not count as failures (nor reset the count).
    third, spare = await start(stub, username), await start(stub, username)
    assert_refused(await failure(complete(stub, third, recovery_code="AAAAA-AAAAA")))
    # The lock stops a challenge issued before it, and the password step.
    assert_refused(await failure(complete(stub, spare, totp_code=fresh_code(secret, clock))))
    assert_refused(await failure(start(stub, username)))
    reasons = [
        r["reason"]
        for r in await audit_rows(auth.deps, subject=username)
        if r["outcome"] != "success"
    ]
    assert reasons == [
        "bad_code",
        "bad_code",
        "bad_recovery_code",
        "too_many_failures",
        "locked",
        "locked",
    ]


async def test_a_lock_expires_by_itself(auth_factory: AuthFactory, clock: FakeClock) -> None:
    auth = await auth_factory(lockout_threshold=2, lockout_seconds=0.5)
    stub = auth.stub()
    username, secret = await enrolled_user(stub, clock)
    for _ in range(2):
        assert_refused(await failure(start(stub, username, "not the password")))
    assert_refused(await failure(start(stub, username)))
    await asyncio.sleep(0.6)
    await login(stub, username, secret, clock)


async def test_a_successful_login_resets_the_account_counter(
    auth_factory: AuthFactory, clock: FakeClock
) -> None:
    auth = await auth_factory(lockout_threshold=3)
    stub = auth.stub()
    username, secret = await enrolled_user(stub, clock)
    for _ in range(2):
        assert_refused(await failure(start(stub, username, "not the password")))
    await login(stub, username, secret, clock)
    for _ in range(2):
        assert_refused(await failure(start(stub, username, "not the password")))
    await login(stub, username, secret, clock)


async def test_account_delay_refuses_early_attempts_with_retry_info(
    auth_factory: AuthFactory, clock: FakeClock
) -> None:
    auth = await auth_factory(backoff_free_failures=1, backoff_base_seconds=30)
    stub = auth.stub()
    username, _ = await enrolled_user(stub, clock)
    other, other_secret = await enrolled_user(stub, clock)
    assert_refused(await failure(start(stub, username, "not the password")))  # free
    assert_refused(await failure(start(stub, username, "not the password")))  # sets 30 s
    delay = retry_delay(await failure(start(stub, username)))
    assert 25 < delay <= 30
    # Another account from the same source is not held up.
    await login(stub, other, other_secret, clock)
    [throttled] = await audit_rows(auth.deps, subject=username, reason="throttled")
    assert throttled["outcome"] == "failure"


async def test_per_source_delay(auth_factory: AuthFactory, clock: FakeClock) -> None:
    auth = await auth_factory(
        source_free_failures=2, backoff_free_failures=50, backoff_base_seconds=60
    )
    stub = auth.stub()
    username, secret = await enrolled_user(stub, clock)
    spraying = as_user(source="203.0.113.66")
    # Password spraying: one guess each at several (partly unknown) accounts.
    for victim in (unique_name(), unique_name(), username):
        assert_refused(await failure(start(stub, victim, "Summer2024!", metadata=spraying)))
    delay = retry_delay(await failure(start(stub, username, metadata=spraying)))
    assert 55 < delay <= 60
    # The same /64 of IPv6 or the IPv4 address with a port is the same source.
    spraying_v6 = as_user(source="2001:db8:1:2::1")
    for victim in (unique_name(), unique_name(), unique_name()):
        assert_refused(await failure(start(stub, victim, "Summer2024!", metadata=spraying_v6)))
    retry_delay(
        await failure(start(stub, username, metadata=as_user(source="[2001:db8:1:2::99]:5000")))
    )
    retry_delay(await failure(start(stub, username, metadata=as_user(source="203.0.113.66:4431"))))
    # Another client is not held up, and neither is the account itself.
    await login(stub, username, secret, clock, metadata=as_user(source="198.51.100.23"))


async def test_concurrent_guesses_cannot_pass_the_threshold(
    auth_factory: AuthFactory, clock: FakeClock
) -> None:
    auth = await auth_factory(lockout_threshold=3)
    stub = auth.stub()
    username, _ = await enrolled_user(stub, clock)
    results = await asyncio.gather(
        *(start(stub, username, f"guess number {i}") for i in range(8)), return_exceptions=True
    )
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
    checked = await audit_rows(auth.deps, subject=username, reason="bad_credentials")
    # At most `threshold` guesses were ever checked against the hash.
    assert len(checked) <= 3
    assert_refused(await failure(start(stub, username)))


async def test_admission_is_atomic(auth: Auth) -> None:
    throttle = auth.deps.throttle
    admissions = await asyncio.gather(*(throttle.admit("someone", "192.0.2.9") for _ in range(25)))
    allowed = [a for a in admissions if a.verdict is Verdict.ALLOWED]
    assert len(allowed) == auth.settings.lockout_threshold
    for _ in allowed:
        await throttle.release("someone", "192.0.2.9")
    assert (await throttle.admit("someone", "192.0.2.9")).verdict is Verdict.ALLOWED


async def refused_after_waiting(call: Callable[[], Awaitable[Any]]) -> tuple[int, str]:
    """Retry `call` while it is told to wait (sleeping the RetryInfo delay); returns how many
    times it was told to wait, and the details of the refusal it ends with."""
    for waits in range(50):
        error = await failure(call())
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert_refused(error)
            return waits, str(error.details())
        await asyncio.sleep(retry_delay(error))
    pytest.fail("still told to wait after 50 tries")


async def test_second_factor_guesses_through_many_challenges_wait_then_lock(
    auth_factory: AuthFactory, clock: FakeClock
) -> None:
    """Whoever knows the password collects challenges first, then spends them on guesses: each
    guess still waits out the delay the earlier failures set, whichever challenge it uses, and
    the account locks at the threshold."""
    auth = await auth_factory(
        lockout_threshold=4, backoff_free_failures=1, backoff_base_seconds=0.2
    )
    stub = auth.stub()
    username, secret = await enrolled_user(stub, clock)
    challenges = [await start(stub, username) for _ in range(5)]
    bad = wrong_code(secret, clock())
    assert_refused(await failure(complete(stub, challenges[0], totp_code=bad)))  # free
    assert_refused(await failure(complete(stub, challenges[1], totp_code=bad)))  # sets 0.2 s
    # Recovery codes count the same. A caller told to wait keeps its challenge for the retry.
    waits, _ = await refused_after_waiting(
        lambda: complete(stub, challenges[2], recovery_code="AAAAA-AAAAA")
    )
    assert waits >= 1
    waits, _ = await refused_after_waiting(lambda: complete(stub, challenges[3], totp_code=bad))
    assert waits >= 1
    # Four failures: locked. The right code on the last challenge, and the right password, get
    # the generic answer.
    assert_refused(
        await failure(complete(stub, challenges[4], totp_code=fresh_code(secret, clock)))
    )
    assert_refused(await failure(start(stub, username)))
    reasons = [
        r["reason"]
        for r in await audit_rows(auth.deps, subject=username)
        if r["outcome"] != "success"
    ]
    assert [r for r in reasons if r != "throttled"] == [
        "bad_code",
        "bad_code",
        "bad_recovery_code",
        "bad_code",
        "too_many_failures",
        "locked",
        "locked",
    ]
    assert reasons.count("throttled") >= 2


async def test_early_second_factor_is_refused_with_retry_info_and_keeps_the_challenge(
    auth_factory: AuthFactory, clock: FakeClock
) -> None:
    auth = await auth_factory(backoff_free_failures=1, backoff_base_seconds=30)
    stub = auth.stub()
    username, secret = await enrolled_user(stub, clock)
    first, second, third = [await start(stub, username) for _ in range(3)]
    bad = wrong_code(secret, clock())
    assert_refused(await failure(complete(stub, first, totp_code=bad)))  # free
    assert_refused(await failure(complete(stub, second, recovery_code="AAAAA-AAAAA")))  # 30 s
    # Even the right code waits: the delay is the account's, whichever challenge is used.
    delay = retry_delay(await failure(complete(stub, third, totp_code=fresh_code(secret, clock))))
    assert 25 < delay <= 30
    for early in (complete(stub, third, recovery_code="BBBBB-BBBBB"), start(stub, username)):
        delay = retry_delay(await failure(early))
        assert 25 < delay <= 30
    # An admin lifts the delay; the challenge that was refused for waiting still works.
    await auth.deps.throttle.unlock(username)
    await complete(stub, third, totp_code=fresh_code(secret, clock))


async def test_registration_is_throttled_per_source(
    auth_factory: AuthFactory, clock: FakeClock
) -> None:
    auth = await auth_factory(source_free_failures=2, backoff_base_seconds=60)
    stub = auth.stub()
    probing = as_user(source="203.0.113.80")
    taken = unique_name()
    await register(stub, taken, metadata=as_user(source="192.0.2.44"))
    # Probing for usernames: taken or free, every attempt counts for the source.
    error = await failure(register(stub, taken, metadata=probing))  # free
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    await register(stub, unique_name(), metadata=probing)  # free
    await register(stub, unique_name(), metadata=probing)  # sets 60 s
    for name in (taken, unique_name()):
        delay = retry_delay(await failure(register(stub, name, metadata=probing)))
        assert 55 < delay <= 60
    # The same source cannot turn to guessing passwords instead (IPv4 with a port is the same).
    retry_delay(await failure(start(stub, taken, metadata=as_user(source="203.0.113.80:4431"))))
    # Other sources are not held up.
    await register(stub, unique_name(), metadata=as_user(source="198.51.100.23"))
    throttled = await audit_rows(auth.deps, action="register", reason="throttled")
    assert [(r["source"], r["outcome"]) for r in throttled] == [("203.0.113.80", "failure")] * 2


async def test_concurrent_registrations_cannot_pass_the_source_delay(
    auth_factory: AuthFactory,
) -> None:
    auth = await auth_factory(source_free_failures=3, backoff_base_seconds=60)
    stub = auth.stub()
    burst = as_user(source="203.0.113.81")
    results = await asyncio.gather(
        *(register(stub, unique_name(), metadata=burst) for _ in range(10)),
        return_exceptions=True,
    )
    created = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    # The free three and the one that set the delay; the rest were told to wait.
    assert (len(created), len(refused)) == (4, 6)
    assert all(retry_delay(r) > 55 for r in refused)
