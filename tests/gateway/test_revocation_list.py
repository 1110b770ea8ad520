"""The gateway's revocation list as pure logic (fake clocks): what it refuses, for how long,
and what it does while the feed is stale, in each fail mode. The feed itself, end to end, is in
test_revocations."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.gateway.revocations import (
    STALE_RETRY_SECONDS,
    FailMode,
    RevocableStream,
    RevocationList,
    Revoked,
)
from streammesh.api.auth.v1 import auth_pb2
from streammesh.mesh.errors import Unavailable

MAX_STALENESS = 2.0
NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _response(
    *revocations: tuple[int, str, int], expires: float = NOW + 420, snapshot: bool = False
) -> auth_pb2.WatchRevocationsResponse:
    response = auth_pb2.WatchRevocationsResponse(snapshot=snapshot, cursor="7-7")
    for kind, subject, generation in revocations:
        entry = response.revocations.add(kind=kind, subject=subject, generation=generation)
        entry.expire_time.FromNanoseconds(int(expires * 1e9))
    return response


def _list(mode: FailMode) -> tuple[RevocationList, Clock, Clock]:
    monotonic, wall = Clock(100.0), Clock(NOW)
    revocations = RevocationList(
        max_staleness=MAX_STALENESS, fail_mode=mode, clock=monotonic, wall_clock=wall
    )
    return revocations, monotonic, wall


SESSION = auth_pb2.REVOCATION_KIND_SESSION
USER = auth_pb2.REVOCATION_KIND_USER_TOKENS


def test_sessions_and_generations_are_refused_until_they_expire() -> None:
    revocations, monotonic, wall = _list(FailMode.CLOSED)
    revocations.apply(_response((SESSION, "s1", 0), (USER, "u1", 3), snapshot=True))
    with pytest.raises(Revoked):
        revocations.check("u9", "s1", 0)  # the session, whoever's it is
    for generation in (0, 2):
        with pytest.raises(Revoked):
            revocations.check("u1", "s2", generation)
    revocations.check("u1", "s2", 3)  # issued after the revocation
    revocations.check("u2", "s2", 0)  # someone else
    # A later revocation raises the generation; an older one arriving late does not lower it.
    revocations.apply(_response((USER, "u1", 5), (USER, "u1", 4)))
    with pytest.raises(Revoked):
        revocations.check("u1", "s2", 4)
    revocations.check("u1", "s2", 5)
    assert (len(revocations), revocations.cursor, revocations.snapshots) == (2, "7-7", 1)
    # Past expire_time every token the entries concern has expired: they go.
    wall.now = NOW + 421
    monotonic.now += 1
    revocations.check("u1", "s1", 0)
    monotonic.now += 5
    revocations.apply(_response())
    assert len(revocations) == 0


@pytest.mark.parametrize("mode", list(FailMode))
def test_before_the_first_response_the_list_is_stale(mode: FailMode) -> None:
    revocations, _, _ = _list(mode)
    assert not revocations.live.is_set()
    if mode is FailMode.CLOSED:
        with pytest.raises(Unavailable) as refused:
            revocations.check("u1", "s1", 0)
        assert refused.value.retry_after_seconds == STALE_RETRY_SECONDS
    else:
        revocations.check("u1", "s1", 0)
        assert revocations.accepted_while_stale == 1
    revocations.apply(_response(snapshot=True))
    assert revocations.live.is_set()
    revocations.check("u1", "s1", 0)


@pytest.mark.parametrize("mode", list(FailMode))
def test_the_staleness_bound(mode: FailMode, caplog: pytest.LogCaptureFixture) -> None:
    revocations, monotonic, _ = _list(mode)
    revocations.apply(_response((SESSION, "s1", 0), snapshot=True))
    monotonic.now += MAX_STALENESS  # at the bound: still fresh
    revocations.check("u1", "s2", 0)
    monotonic.now += 0.01
    with pytest.raises(Revoked):  # what is known is refused in both modes
        revocations.check("u1", "s1", 0)
    if mode is FailMode.CLOSED:
        with pytest.raises(Unavailable):
            revocations.check("u1", "s2", 0)
    else:
        for _ in range(3):
            revocations.check("u1", "s2", 0)
        assert revocations.accepted_while_stale == 3
        warnings = [r for r in caplog.records if "fail-open" in r.getMessage()]
        assert len(warnings) == 1  # one warning per interval, not one per call
    revocations.apply(_response())  # a heartbeat: fresh again
    revocations.check("u1", "s2", 0)


def test_an_unknown_kind_is_ignored_not_applied(caplog: pytest.LogCaptureFixture) -> None:
    revocations, _, _ = _list(FailMode.CLOSED)
    revocations.apply(_response((99, "u1", 1), snapshot=True))
    revocations.check("u1", "s1", 0)
    assert len(revocations) == 0 and "unknown revocation kind" in caplog.text


async def test_a_revocable_stream_ends_its_requests_at_the_revocation() -> None:
    revocations, _, _ = _list(FailMode.CLOSED)
    revocations.apply(_response(snapshot=True))
    stream = RevocableStream(revocations, subject="u1", session_id="s1", generation=0)

    async def requests() -> AsyncIterator[int]:
        for number in range(1, 10):
            if number == 4:  # the logout lands between the third and the fourth request
                revocations.apply(_response((SESSION, "s1", 0)))
            yield number

    assert [number async for number in stream.requests(requests())] == [1, 2, 3]
    assert stream.revoked


TENANT = auth_pb2.REVOCATION_KIND_TENANT_TOKENS


async def test_a_tenant_generation_refuses_that_tenants_older_tokens_until_it_expires() -> None:
    revocations, _, wall = _list(FailMode.CLOSED)
    revocations.apply(_response((TENANT, "acme", 1), snapshot=True))
    for user in ("u1", "u2"):  # every user of the tenant
        with pytest.raises(Revoked):
            revocations.check(user, "s1", 0, tenant="acme", tenant_generation=0)
    revocations.check("u1", "s1", 0, tenant="acme", tenant_generation=1)  # issued after
    revocations.check("u1", "s1", 0, tenant="other", tenant_generation=0)
    revocations.check("u1", "s1", 0)  # tenant "default", generation 0
    stream = RevocableStream(
        revocations, subject="u1", session_id="s1", generation=0, tenant="acme"
    )

    async def one() -> AsyncIterator[int]:
        yield 1

    assert [item async for item in stream.requests(one())] == []
    assert stream.revoked
    wall.now = NOW + 421  # every token it concerns has expired
    revocations.check("u1", "s1", 0, tenant="acme", tenant_generation=0)
