"""The revocation feed (AuthService/WatchRevocations): who may follow it, which changes it
announces with which token generation, cursor resume, snapshots after trimming, heartbeats."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import cast

import grpc
import jwt
import pytest
from sqlalchemy import text

from services.auth.revocations import Kind, RevocationRow
from services.auth.server import AuthDependencies
from streammesh.api.auth.v1 import auth_pb2
from tests.auth.conftest import Auth, AuthFactory
from tests.auth.flows import FakeClock, Stub, as_user, enrol, failure, login, register, unique_name

ADMIN = as_user("user:root-admin")
SESSION = auth_pb2.REVOCATION_KIND_SESSION
USER_TOKENS = auth_pb2.REVOCATION_KIND_USER_TOKENS


def claims(tokens: auth_pb2.SessionTokens) -> dict[str, object]:
    decoded: dict[str, object] = jwt.decode(
        tokens.access_token, options={"verify_signature": False}
    )
    return decoded


async def first(stub: Stub, cursor: str = "") -> auth_pb2.WatchRevocationsResponse:
    """The first response of a new stream."""
    call = stub.WatchRevocations(auth_pb2.WatchRevocationsRequest(cursor=cursor), timeout=10)
    try:
        response: auth_pb2.WatchRevocationsResponse = await call.read()
    finally:
        call.cancel()
    return response


def entries(response: auth_pb2.WatchRevocationsResponse) -> list[tuple[int, str, int]]:
    return [(r.kind, r.subject, r.generation) for r in response.revocations]


async def logged_in(stub: Stub, clock: FakeClock) -> tuple[str, auth_pb2.SessionTokens]:
    username = unique_name()
    await register(stub, username)
    secret = (await enrol(stub, username, clock)).secret
    return username, await login(stub, username, secret, clock)


async def test_only_the_gateway_may_follow_the_feed(auth: Auth) -> None:
    # Operators may call every other method; the feed is the gateway's alone.
    for who in ("admin", "ingest", "processor"):
        error = await failure(first(auth.stub(who)))
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED, who
    response = await first(auth.stub("gateway"))
    assert response.snapshot and response.heartbeat.ToTimedelta() > dt.timedelta(0)


@pytest.mark.usefixtures("platform_admins")
async def test_each_revoking_change_is_announced_in_commit_order(
    stub: Stub, clock: FakeClock
) -> None:
    username, tokens = await logged_in(stub, clock)
    user_id, session_id = str(claims(tokens)["sub"]), str(claims(tokens)["sid"])
    assert claims(tokens)["gen"] == 0
    _, other = await logged_in(stub, clock)
    await stub.Logout(auth_pb2.LogoutRequest(refresh_token=other.refresh_token), timeout=10)
    start = await first(stub)
    assert entries(start) == [(SESSION, str(claims(other)["sid"]), 0)]

    await stub.SetUserRoles(
        auth_pb2.SetUserRolesRequest(username=username, roles=["analyst"]),
        metadata=ADMIN,
        timeout=10,
    )
    # The session survives a role change; its next token has the new roles and generation.
    refreshed = await stub.RefreshSession(
        auth_pb2.RefreshSessionRequest(refresh_token=tokens.refresh_token), timeout=10
    )
    assert (list(refreshed.tokens.roles), claims(refreshed.tokens)["gen"]) == (["analyst"], 1)
    await stub.ResetMfa(auth_pb2.ResetMfaRequest(username=username), metadata=ADMIN, timeout=10)
    await stub.Logout(
        auth_pb2.LogoutRequest(refresh_token=refreshed.tokens.refresh_token), timeout=10
    )
    await stub.RevokeSessions(
        auth_pb2.RevokeSessionsRequest(username=username), metadata=ADMIN, timeout=10
    )
    await stub.SetUserDisabled(
        auth_pb2.SetUserDisabledRequest(username=username, disabled=True),
        metadata=ADMIN,
        timeout=10,
    )
    resumed = await first(stub, start.cursor)
    assert not resumed.snapshot
    assert entries(resumed) == [
        (USER_TOKENS, user_id, 1),  # role change
        (USER_TOKENS, user_id, 2),  # MFA reset
        (SESSION, session_id, 0),  # logout
        (USER_TOKENS, user_id, 3),  # revoke sessions
        (USER_TOKENS, user_id, 4),  # disable...
        (USER_TOKENS, user_id, 5),  # ...which ends the sessions too
    ]
    for revocation in resumed.revocations:
        lifetime = revocation.expire_time.ToDatetime() - revocation.revoke_time.ToDatetime()
        assert lifetime.total_seconds() == 300 + 120  # access-token TTL + margin


async def test_reusing_a_refresh_token_revokes_the_sessions_access_tokens(
    stub: Stub, clock: FakeClock
) -> None:
    _, tokens = await logged_in(stub, clock)
    start = await first(stub)
    await stub.RefreshSession(
        auth_pb2.RefreshSessionRequest(refresh_token=tokens.refresh_token), timeout=10
    )
    await failure(
        stub.RefreshSession(
            auth_pb2.RefreshSessionRequest(refresh_token=tokens.refresh_token), timeout=10
        )
    )
    assert entries(await first(stub, start.cursor)) == [(SESSION, str(claims(tokens)["sid"]), 0)]


async def _backdate(deps: AuthDependencies, seconds: float) -> None:
    async with deps.engine.begin() as conn:
        await conn.execute(
            text("UPDATE revocations SET created_at = created_at - make_interval(secs => :s)"),
            {"s": seconds},
        )


async def test_a_cursor_whose_entry_was_trimmed_gets_a_snapshot_of_what_still_matters(
    auth_factory: AuthFactory, clock: FakeClock
) -> None:
    """Trimming removes only revocations whose tokens have all expired (older than TTL +
    margin). A cursor pointing at a trimmed entry cannot tell what else went, so the stream
    starts with a full snapshot, which holds every revocation that still matters."""
    auth = await auth_factory()
    stub, deps = auth.stub(), auth.deps
    retention = auth.settings.revocation_retention
    _, old = await logged_in(stub, clock)
    await stub.Logout(auth_pb2.LogoutRequest(refresh_token=old.refresh_token), timeout=10)
    cursor = (await first(stub)).cursor
    await _backdate(deps, retention + 1)  # the old logout's tokens have all expired now
    _, young = await logged_in(stub, clock)
    await stub.Logout(auth_pb2.LogoutRequest(refresh_token=young.refresh_token), timeout=10)

    assert await deps.revocations.trim(retention) == 1
    response = await first(stub, cursor)
    assert response.snapshot
    assert entries(response) == [(SESSION, str(claims(young)["sid"]), 0)]
    # Not one of ours, or from a table recreated since (same id, other time): a snapshot too.
    for foreign in ("", "nonsense", "1-1", f"{cursor.split('-')[0]}-12345", "9" * 40 + "-1"):
        assert (await first(stub, foreign)).snapshot, foreign


async def test_heartbeats_confirm_a_quiet_feed(auth_factory: AuthFactory) -> None:
    auth = await auth_factory(revocation_heartbeat_seconds=0.1, revocation_poll_seconds=0.05)
    call = auth.stub().WatchRevocations(auth_pb2.WatchRevocationsRequest(), timeout=10)
    try:
        responses = [await call.read() for _ in range(4)]
    finally:
        call.cancel()
    assert [r.snapshot for r in responses] == [True, False, False, False]
    assert all(not r.revocations for r in responses[1:])


@pytest.mark.parametrize(
    "row_id, micros", [(1, 0), (123456789, 1_700_000_000_123_456)], ids=["zero", "recent"]
)
def test_cursor_round_trip(row_id: int, micros: int) -> None:
    from services.auth.revocations import parse_cursor

    created = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=micros)
    row = RevocationRow(row_id, Kind.SESSION, str(uuid.uuid4()), 0, created)
    assert parse_cursor(row.cursor) == (row_id, created)


class _BrokenStore:
    """A store whose database is gone (pure logic: how the feed ends then)."""

    async def exists(self, row_id: int, created_at: dt.datetime) -> bool:
        raise OSError("connection refused")

    async def recent(self, retention_seconds: float) -> list[RevocationRow]:
        raise OSError("connection refused")


async def test_a_database_outage_ends_the_feed_with_unavailable_not_a_heartbeat() -> None:
    from services.auth.revocations import RevocationFeed, RevocationStore
    from streammesh.mesh.errors import Unavailable

    feed = RevocationFeed(
        cast(RevocationStore, _BrokenStore()),
        retention_seconds=420,
        poll_seconds=0.01,
        heartbeat_seconds=0.01,
    )
    with pytest.raises(Unavailable, match="revocation store is unavailable"):
        async for _ in feed.watch(""):
            raise AssertionError("nothing may be sent while nothing can be read")
