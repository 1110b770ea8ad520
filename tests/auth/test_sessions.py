"""Sessions: refresh-token rotation, reuse detection revoking the family, logout, disabled users,
expiry and the absolute lifetime."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import jwt
import pytest
from sqlalchemy import text

from services.auth.server import AuthDependencies
from streammesh.api.auth.v1 import auth_pb2
from tests.auth.conftest import AuthFactory, audit_rows
from tests.auth.flows import (
    FakeClock,
    Stub,
    as_user,
    enrol,
    failure,
    login,
    register,
    start,
    unique_name,
)

REFRESH_REFUSED = "invalid or expired refresh token"
ADMIN = as_user("user:root-admin")


async def logged_in(stub: Stub, clock: FakeClock) -> tuple[str, auth_pb2.SessionTokens]:
    username = unique_name()
    await register(stub, username)
    secret = (await enrol(stub, username, clock)).secret
    return username, await login(stub, username, secret, clock)


async def refresh(stub: Stub, token: str) -> auth_pb2.SessionTokens:
    reply = await stub.RefreshSession(
        auth_pb2.RefreshSessionRequest(refresh_token=token), timeout=10
    )
    tokens: auth_pb2.SessionTokens = reply.tokens
    return tokens


def assert_refused(error: grpc.aio.AioRpcError) -> None:
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, REFRESH_REFUSED)


def sid(tokens: auth_pb2.SessionTokens) -> str:
    return str(jwt.decode(tokens.access_token, options={"verify_signature": False})["sid"])


@pytest.mark.usefixtures("platform_admins")
async def test_refresh_rotates_the_token_and_keeps_the_session(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username, first = await logged_in(stub, clock)
    second = await refresh(stub, first.refresh_token)
    assert second.refresh_token != first.refresh_token
    assert second.access_token != first.access_token
    assert sid(second) == sid(first)
    assert second.expires_in.seconds == 300
    assert 0 < second.refresh_expires_in.seconds <= 30 * 86400
    # Refresh picks up role changes made since the login.
    await stub.SetUserRoles(
        auth_pb2.SetUserRolesRequest(username=username, roles=["analyst"]),
        metadata=ADMIN,
        timeout=10,
    )
    third = await refresh(stub, second.refresh_token)
    assert list(third.roles) == ["analyst"]
    assert jwt.decode(third.access_token, options={"verify_signature": False})["roles"] == [
        "analyst"
    ]
    async with deps.engine.connect() as conn:
        stored = {
            bytes(row[0])
            for row in await conn.execute(text("SELECT token_hash FROM refresh_tokens"))
        }
    # Only hashes are stored.
    for tokens in (first, second, third):
        assert hashlib.sha256(tokens.refresh_token.encode()).digest() in stored
    assert len(await audit_rows(deps, action="refresh", outcome="success")) == 2


async def test_reusing_a_rotated_token_revokes_the_whole_family(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username, first = await logged_in(stub, clock)
    second = await refresh(stub, first.refresh_token)
    newest = await refresh(stub, second.refresh_token)
    assert_refused(await failure(refresh(stub, first.refresh_token)))
    # The newest token, which the thief or the owner holds, stops working too.
    assert_refused(await failure(refresh(stub, newest.refresh_token)))
    [reuse] = await audit_rows(deps, action="refresh", reason="reuse_detected")
    assert (reuse["subject"], reuse["outcome"]) == (username, "failure")
    assert reuse["details"] == {"session_id": sid(first), "family_revoked": "now"}
    [revoked] = await audit_rows(deps, action="refresh", reason="session_revoked")
    assert revoked["subject"] == username
    async with deps.engine.connect() as conn:
        reason = (await conn.execute(text("SELECT revoked_reason FROM sessions"))).scalar_one()
    assert reason == "reuse_detected"


async def test_concurrent_refreshes_of_one_token_count_as_reuse(
    stub: Stub, clock: FakeClock
) -> None:
    _, first = await logged_in(stub, clock)
    results = await asyncio.gather(
        refresh(stub, first.refresh_token),
        refresh(stub, first.refresh_token),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, auth_pb2.SessionTokens)]
    assert len(won) == 1, results
    assert_refused(await failure(refresh(stub, won[0].refresh_token)))


async def test_logout_ends_the_session(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username, tokens = await logged_in(stub, clock)
    metadata = as_user(f"user:{username}", "198.51.100.9")
    await stub.Logout(
        auth_pb2.LogoutRequest(refresh_token=tokens.refresh_token), metadata=metadata, timeout=10
    )
    assert_refused(await failure(refresh(stub, tokens.refresh_token)))
    # Logging out twice is fine; an unknown token is not.
    await stub.Logout(auth_pb2.LogoutRequest(refresh_token=tokens.refresh_token), timeout=10)
    error = await failure(
        stub.Logout(auth_pb2.LogoutRequest(refresh_token="smr_" + "A" * 43), timeout=10)
    )
    assert_refused(error)
    first, again = await audit_rows(deps, action="logout", outcome="success")
    assert (first["actor"], first["subject"], first["source"]) == (
        f"user:{username}",
        username,
        "198.51.100.9",
    )
    assert again["details"]["already_ended"] == "true"


async def test_logout_with_a_spent_token_revokes_the_family(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    _, first = await logged_in(stub, clock)
    newest = await refresh(stub, first.refresh_token)
    assert_refused(
        await failure(
            stub.Logout(auth_pb2.LogoutRequest(refresh_token=first.refresh_token), timeout=10)
        )
    )
    assert_refused(await failure(refresh(stub, newest.refresh_token)))
    [row] = await audit_rows(deps, action="logout")
    assert row["reason"] == "reuse_detected"


@pytest.mark.usefixtures("platform_admins")
async def test_disabled_users_cannot_refresh_or_log_in(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username = unique_name()
    await register(stub, username)
    secret = (await enrol(stub, username, clock)).secret
    tokens = await login(stub, username, secret, clock)
    challenge = await start(stub, username)
    await stub.SetUserDisabled(
        auth_pb2.SetUserDisabledRequest(username=username, disabled=True),
        metadata=ADMIN,
        timeout=10,
    )
    assert_refused(await failure(refresh(stub, tokens.refresh_token)))
    error = await failure(start(stub, username))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    # A challenge issued before the account was disabled does not complete either.
    error = await failure(
        stub.CompleteLogin(
            auth_pb2.CompleteLoginRequest(challenge=challenge, recovery_code="AAAAA-AAAAA"),
            timeout=10,
        )
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    reasons = {r["reason"] for r in await audit_rows(deps, subject=username, outcome="failure")}
    assert {"session_revoked", "user_disabled"} <= reasons
    # Re-enabling does not bring the revoked sessions back, but allows logging in.
    await stub.SetUserDisabled(
        auth_pb2.SetUserDisabledRequest(username=username, disabled=False),
        metadata=ADMIN,
        timeout=10,
    )
    assert_refused(await failure(refresh(stub, tokens.refresh_token)))
    await login(stub, username, secret, clock)


async def test_expired_refresh_token_is_refused(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    _, tokens = await logged_in(stub, clock)
    async with deps.engine.begin() as conn:
        await conn.execute(text("UPDATE refresh_tokens SET expires_at = now() - interval '1 s'"))
    assert_refused(await failure(refresh(stub, tokens.refresh_token)))
    [row] = await audit_rows(deps, action="refresh")
    assert row["reason"] == "expired"


async def test_session_lifetime_is_capped(auth_factory: AuthFactory, clock: FakeClock) -> None:
    auth = await auth_factory(session_max_seconds=120, refresh_token_ttl_seconds=3600)
    stub = auth.stub()
    _, tokens = await logged_in(stub, clock)
    assert 110 <= tokens.refresh_expires_in.seconds <= 120
    refreshed = await refresh(stub, tokens.refresh_token)
    assert refreshed.refresh_expires_in.seconds <= 120
    async with auth.deps.engine.begin() as conn:
        await conn.execute(text("UPDATE sessions SET expires_at = now() - interval '1 s'"))
    assert_refused(await failure(refresh(stub, refreshed.refresh_token)))


async def test_malformed_refresh_tokens_are_refused(stub: Stub) -> None:
    for token in ("", "smr_short", "eyJhbGciOiJFZERTQSJ9.e30.sig", "smr_" + "A" * 43):
        assert_refused(await failure(refresh(stub, token)))


async def test_long_ended_sessions_are_forgotten(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    _, ended = await logged_in(stub, clock)
    _, live = await logged_in(stub, clock)
    await stub.Logout(auth_pb2.LogoutRequest(refresh_token=ended.refresh_token), timeout=10)
    assert await deps.sessions.sweep(7 * 86400) == 0  # ended just now: kept for a while
    async with deps.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE sessions SET revoked_at = now() - interval '8 days' "
                "WHERE revoked_at IS NOT NULL"
            )
        )
    assert await deps.sessions.sweep(7 * 86400) == 1
    async with deps.engine.connect() as conn:
        tokens = (await conn.execute(text("SELECT count(*) FROM refresh_tokens"))).scalar_one()
    assert tokens == 1
    await refresh(stub, live.refresh_token)
