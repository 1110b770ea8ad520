"""The two-step login: challenges (single use, expiry, binding, storage), TOTP codes (replay,
concurrent double submit, drift) and recovery codes."""

from __future__ import annotations

import asyncio

import grpc
import pyotp
import redis.asyncio as aioredis

from services.auth.server import AuthDependencies
from tests.auth.conftest import Auth, AuthFactory, audit_rows
from tests.auth.flows import (
    INVALID,
    FakeClock,
    Stub,
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


async def enrolled_user(stub: Stub, clock: FakeClock) -> tuple[str, str, list[str]]:
    """A registered user with TOTP: (username, secret, recovery codes)."""
    username = unique_name()
    await register(stub, username)
    enrolled = await enrol(stub, username, clock)
    return username, enrolled.secret, enrolled.recovery_codes


def assert_refused(error: grpc.aio.AioRpcError) -> None:
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, INVALID)


async def test_challenge_is_single_use(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username, secret, _ = await enrolled_user(stub, clock)
    challenge = await start(stub, username)
    await complete(stub, challenge, totp_code=fresh_code(secret, clock))
    assert_refused(await failure(complete(stub, challenge, totp_code=fresh_code(secret, clock))))
    assert [
        r["outcome"] for r in await audit_rows(deps, action="login", reason="bad_challenge")
    ] == ["failure"]


async def test_a_wrong_code_spends_the_challenge(stub: Stub, clock: FakeClock) -> None:
    username, secret, _ = await enrolled_user(stub, clock)
    challenge = await start(stub, username)
    assert_refused(await failure(complete(stub, challenge, totp_code=wrong_code(secret, clock()))))
    assert_refused(await failure(complete(stub, challenge, totp_code=fresh_code(secret, clock))))
    # A new password step gives a new chance.
    await login(stub, username, secret, clock)


async def test_challenge_expires(auth_factory: AuthFactory, clock: FakeClock) -> None:
    auth = await auth_factory(login_challenge_ttl_seconds=0.3)
    stub = auth.stub()
    username, secret, _ = await enrolled_user(stub, clock)
    challenge = await start(stub, username)
    await asyncio.sleep(0.5)
    assert_refused(await failure(complete(stub, challenge, totp_code=fresh_code(secret, clock))))


async def test_challenge_is_stored_hashed_in_redis(
    auth: Auth, stub: Stub, clock: FakeClock, redis_url: str
) -> None:
    username, _, _ = await enrolled_user(stub, clock)
    reply_challenge = await start(stub, username)
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [
            key async for key in client.scan_iter(match=f"{auth.settings.redis_prefix}challenge:*")
        ]
        assert len(keys) == 1
        value = await client.get(keys[0])
        ttl = await client.pttl(keys[0])
    finally:
        await client.aclose()
    assert value is not None
    assert reply_challenge.encode() not in keys[0] and reply_challenge.encode() not in value
    assert reply_challenge[4:].encode() not in keys[0] + value
    assert 0 < ttl <= 300_000


async def test_challenge_is_bound_to_its_user(stub: Stub, clock: FakeClock) -> None:
    alice, alice_secret, _ = await enrolled_user(stub, clock)
    bob, bob_secret, bob_codes = await enrolled_user(stub, clock)
    # Bob's valid factors do not complete Alice's challenge.
    alice_challenge = await start(stub, alice)
    assert_refused(
        await failure(complete(stub, alice_challenge, totp_code=fresh_code(bob_secret, clock)))
    )
    alice_challenge = await start(stub, alice)
    assert_refused(await failure(complete(stub, alice_challenge, recovery_code=bob_codes[0])))
    # The tokens name the challenge's user; Bob's code was not spent by the attempt.
    tokens = await complete(stub, await start(stub, bob), recovery_code=bob_codes[0])
    assert list(tokens.roles) == []
    await login(stub, alice, alice_secret, clock)


async def test_recovery_code_works_once(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username, _, codes = await enrolled_user(stub, clock)
    tokens = await complete(stub, await start(stub, username), recovery_code=codes[0])
    assert tokens.access_token and tokens.refresh_token
    assert_refused(
        await failure(complete(stub, await start(stub, username), recovery_code=codes[0]))
    )
    # Typed loosely (lower case, no dash, spaces) another code still works.
    loose = " " + codes[1].replace("-", "").lower() + " "
    await complete(stub, await start(stub, username), recovery_code=loose)
    successes = await audit_rows(deps, action="login", outcome="success", subject=username)
    assert [row["details"]["factor"] for row in successes] == ["recovery_code"] * 2
    assert [row["details"]["recovery_codes_left"] for row in successes] == ["9", "8"]
    [refused] = await audit_rows(deps, action="login", outcome="failure", subject=username)
    assert refused["reason"] == "bad_recovery_code"


async def test_totp_code_is_accepted_once(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username, secret, _ = await enrolled_user(stub, clock)
    code = fresh_code(secret, clock)
    await complete(stub, await start(stub, username), totp_code=code)
    assert_refused(await failure(complete(stub, await start(stub, username), totp_code=code)))
    # An older code of the window is refused too: a later step was already used.
    older = pyotp.TOTP(secret).at(clock() - 30)
    assert_refused(await failure(complete(stub, await start(stub, username), totp_code=older)))
    reasons = [r["reason"] for r in await audit_rows(deps, action="login", outcome="failure")]
    assert reasons == ["code_reused", "code_reused"]


async def test_concurrent_double_submit_succeeds_once(stub: Stub, clock: FakeClock) -> None:
    username, secret, _ = await enrolled_user(stub, clock)
    first, second = await start(stub, username), await start(stub, username)
    code = fresh_code(secret, clock)
    results = await asyncio.gather(
        complete(stub, first, totp_code=code),
        complete(stub, second, totp_code=code),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(errors) == 1, results
    assert_refused(errors[0])


async def test_one_step_of_drift_is_accepted_two_are_not(stub: Stub, clock: FakeClock) -> None:
    username, secret, _ = await enrolled_user(stub, clock)
    totp = pyotp.TOTP(secret)
    # Well past the confirming code's step; a time whose five codes around it all differ.
    clock.advance(600)
    while len({totp.at(clock() + 30 * k) for k in range(-2, 3)}) < 5:
        clock.advance(30)
    now = clock()
    for offset in (-2, 2):
        assert_refused(
            await failure(
                complete(stub, await start(stub, username), totp_code=totp.at(now + 30 * offset))
            )
        )
    # Each accepted code must be of a later step than the last, so they go in time order.
    for offset in (-1, 0, 1):
        await complete(stub, await start(stub, username), totp_code=totp.at(now + 30 * offset))


async def test_login_is_audited_step_by_step(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username, secret, _ = await enrolled_user(stub, clock)
    metadata = (("x-streammesh-actor", "anonymous"), ("x-streammesh-source", "203.0.113.50"))
    challenge = await start(stub, username, metadata=metadata)
    await complete(stub, challenge, totp_code=fresh_code(secret, clock), metadata=metadata)
    rows = await audit_rows(deps, subject=username)
    assert [(r["action"], r["outcome"]) for r in rows] == [
        ("register", "success"),
        ("totp_enroll_begin", "success"),
        ("totp_enroll_confirm", "success"),
        ("login_password", "success"),
        ("login", "success"),
    ]
    for row in rows[-2:]:
        assert (row["actor"], row["source"]) == ("anonymous", "203.0.113.50")
    assert rows[-1]["details"]["factor"] == "totp"
    assert rows[-1]["details"]["session_id"]
