"""Administration calls, each audited with the actor the gateway names (or the operator's
certificate), the audit log queries, and edge events recorded through RecordAuditEvent."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.auth.server import AuthDependencies
from streammesh.api.auth.v1 import auth_pb2
from tests.auth.conftest import Auth, audit_rows
from tests.auth.flows import (
    PASSWORD,
    FakeClock,
    Stub,
    as_user,
    complete,
    enrol,
    failure,
    login,
    register,
    start,
    unique_name,
)

ADMIN = as_user("user:root-admin", "192.0.2.1")
pytestmark = pytest.mark.usefixtures("platform_admins")


def violated_fields(error: grpc.aio.AioRpcError) -> set[str]:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    return {violation.field for violation in bad_request.field_violations}


async def last_audit(deps: AuthDependencies, action: str) -> dict[str, object]:
    rows = await audit_rows(deps, action=action)
    assert rows, f"no {action} row"
    return rows[-1]


def assert_admin_row(row: dict[str, object], subject: str) -> None:
    assert (row["actor"], row["source"], row["subject"], row["outcome"]) == (
        "user:root-admin",
        "192.0.2.1",
        subject,
        "success",
    )


async def test_create_user_with_roles_then_enrol_and_log_in(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username = unique_name()
    reply = await stub.CreateUser(
        auth_pb2.CreateUserRequest(username=username, password=PASSWORD, roles=["admin", "admin"]),
        metadata=ADMIN,
        timeout=10,
    )
    user = reply.user
    assert (user.username, list(user.roles), user.disabled, user.mfa_enabled) == (
        username,
        ["admin"],
        False,
        False,
    )
    assert uuid.UUID(user.user_id) and user.HasField("created_at")
    row = await last_audit(deps, "user_created")
    assert_admin_row(row, username)
    assert row["details"] == {"roles": "admin"}

    default = await stub.CreateUser(
        auth_pb2.CreateUserRequest(username=unique_name(), password=PASSWORD),
        metadata=ADMIN,
        timeout=10,
    )
    assert list(default.user.roles) == []  # the default: none

    secret = (await enrol(stub, username, clock)).secret
    tokens = await login(stub, username, secret, clock)
    assert list(tokens.roles) == ["admin"]


async def test_create_user_validates_like_registration(stub: Stub) -> None:
    username = unique_name()
    await register(stub, username)
    for request, fields in (
        (auth_pb2.CreateUserRequest(username="x", password=PASSWORD), {"username"}),
        (auth_pb2.CreateUserRequest(username=unique_name(), password="password1"), {"password"}),
        (
            auth_pb2.CreateUserRequest(username=unique_name(), password=PASSWORD, roles=["root"]),
            {"roles"},
        ),
    ):
        assert (
            violated_fields(await failure(stub.CreateUser(request, metadata=ADMIN, timeout=10)))
            == fields
        )
    duplicate = auth_pb2.CreateUserRequest(username=username.upper(), password=PASSWORD)
    error = await failure(stub.CreateUser(duplicate, metadata=ADMIN, timeout=10))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_set_roles(stub: Stub, deps: AuthDependencies) -> None:
    username = unique_name()
    await register(stub, username)
    reply = await stub.SetUserRoles(
        auth_pb2.SetUserRolesRequest(username=username.upper(), roles=["analyst", "admin"]),
        metadata=ADMIN,
        timeout=10,
    )
    assert list(reply.user.roles) == ["admin", "analyst"]
    row = await last_audit(deps, "role_change")
    assert_admin_row(row, username)
    assert row["details"] == {"roles": "admin,analyst", "previous": ""}
    bad = auth_pb2.SetUserRolesRequest(username=username, roles=["analyst", "superuser"])
    assert violated_fields(await failure(stub.SetUserRoles(bad, metadata=ADMIN, timeout=10))) == {
        "roles"
    }
    # Empty is a valid (empty) set.
    none = await stub.SetUserRoles(
        auth_pb2.SetUserRolesRequest(username=username), metadata=ADMIN, timeout=10
    )
    assert list(none.user.roles) == []


async def test_disabling_revokes_sessions(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username = unique_name()
    await register(stub, username)
    secret = (await enrol(stub, username, clock)).secret
    tokens = await login(stub, username, secret, clock)
    reply = await stub.SetUserDisabled(
        auth_pb2.SetUserDisabledRequest(username=username, disabled=True),
        metadata=ADMIN,
        timeout=10,
    )
    assert reply.user.disabled
    row = await last_audit(deps, "user_disabled")
    assert_admin_row(row, username)
    assert row["details"] == {"sessions_revoked": "1"}
    error = await failure(
        stub.RefreshSession(auth_pb2.RefreshSessionRequest(refresh_token=tokens.refresh_token))
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    enabled = await stub.SetUserDisabled(
        auth_pb2.SetUserDisabledRequest(username=username, disabled=False),
        metadata=ADMIN,
        timeout=10,
    )
    assert not enabled.user.disabled
    assert_admin_row(await last_audit(deps, "user_enabled"), username)


async def test_reset_mfa_requires_enrolling_again(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username = unique_name()
    await register(stub, username)
    enrolled = await enrol(stub, username, clock)
    reply = await stub.ResetMfa(
        auth_pb2.ResetMfaRequest(username=username), metadata=ADMIN, timeout=10
    )
    assert not reply.user.mfa_enabled
    assert_admin_row(await last_audit(deps, "mfa_reset"), username)
    error = await failure(start(stub, username))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "TOTP enrolment required",
    )
    user = await deps.store.get_user(username)
    assert user is not None and await deps.store.unused_recovery_codes(user.id) == 0
    again = await enrol(stub, username, clock)
    assert again.secret != enrolled.secret
    # Old recovery codes are gone; new ones work.
    error = await failure(
        complete(stub, await start(stub, username), recovery_code=enrolled.recovery_codes[0])
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    await complete(stub, await start(stub, username), recovery_code=again.recovery_codes[0])


async def test_revoke_sessions(stub: Stub, deps: AuthDependencies, clock: FakeClock) -> None:
    username = unique_name()
    await register(stub, username)
    secret = (await enrol(stub, username, clock)).secret
    sessions = [await login(stub, username, secret, clock) for _ in range(2)]
    reply = await stub.RevokeSessions(
        auth_pb2.RevokeSessionsRequest(username=username), metadata=ADMIN, timeout=10
    )
    assert reply.revoked == 2
    for tokens in sessions:
        error = await failure(
            stub.RefreshSession(
                auth_pb2.RefreshSessionRequest(refresh_token=tokens.refresh_token), timeout=10
            )
        )
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    row = await last_audit(deps, "sessions_revoked")
    assert_admin_row(row, username)
    assert row["details"] == {"count": "2"}


@pytest.mark.parametrize(
    ("method", "request_", "action"),
    [
        ("SetUserDisabled", auth_pb2.SetUserDisabledRequest(disabled=True), "user_disabled"),
        ("SetUserRoles", auth_pb2.SetUserRolesRequest(roles=["analyst"]), "role_change"),
        ("ResetMfa", auth_pb2.ResetMfaRequest(), "mfa_reset"),
        ("UnlockUser", auth_pb2.UnlockUserRequest(), "unlock"),
        ("RevokeSessions", auth_pb2.RevokeSessionsRequest(), "sessions_revoked"),
    ],
)
async def test_unknown_usernames_are_not_found(
    stub: Stub, deps: AuthDependencies, method: str, request_: Any, action: str
) -> None:
    missing = unique_name()
    request_.username = missing
    error = await failure(getattr(stub, method)(request_, metadata=ADMIN, timeout=10))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    row = await last_audit(deps, action)
    assert (row["subject"], row["outcome"], row["reason"]) == (missing, "failure", "unknown_user")
    malformed = type(request_)(username="not a name")
    assert violated_fields(await failure(getattr(stub, method)(malformed, timeout=10))) == {
        "username"
    }


async def test_list_users_pages_by_username(stub: Stub, deps: AuthDependencies) -> None:
    prefix = f"team-{uuid.uuid4().hex[:6]}-"
    names = [f"{prefix}{letter}" for letter in "edcba"]
    for name in names:
        await register(stub, name)
    await register(stub, unique_name())  # not in the prefix

    seen: list[str] = []
    token = ""
    while True:
        reply = await stub.ListUsers(
            auth_pb2.ListUsersRequest(page_size=2, page_token=token, username_prefix=prefix),
            metadata=ADMIN,
            timeout=10,
        )
        seen += [user.username for user in reply.users]
        assert all(not user.disabled and not user.mfa_enabled for user in reply.users)
        token = reply.next_page_token
        if not token:
            break
    assert seen == sorted(names)
    row = await last_audit(deps, "list_users")
    assert (row["actor"], row["outcome"]) == ("user:root-admin", "success")

    first = await stub.ListUsers(
        auth_pb2.ListUsersRequest(page_size=1, username_prefix=prefix), metadata=ADMIN
    )
    other_query = auth_pb2.ListUsersRequest(page_token=first.next_page_token, username_prefix="x")
    assert violated_fields(await failure(stub.ListUsers(other_query, metadata=ADMIN))) == {
        "page_token"
    }
    assert violated_fields(
        await failure(stub.ListUsers(auth_pb2.ListUsersRequest(page_size=-1), metadata=ADMIN))
    ) == {"page_size"}
    # AIP-158: above the maximum (500) is lowered to it, not refused.
    await stub.ListUsers(auth_pb2.ListUsersRequest(page_size=501), metadata=ADMIN)
    wildcard = auth_pb2.ListUsersRequest(username_prefix="%")
    assert violated_fields(await failure(stub.ListUsers(wildcard, metadata=ADMIN))) == {
        "username_prefix"
    }


async def test_list_audit_events_filters_newest_first_and_pages(
    stub: Stub, deps: AuthDependencies
) -> None:
    username = unique_name()
    await register(stub, username, metadata=as_user("anonymous", "203.0.113.1"))
    for source in ("203.0.113.2", "203.0.113.3", "203.0.113.4"):
        await failure(start(stub, username, "not the password", metadata=as_user(source=source)))

    query = auth_pb2.ListAuditEventsRequest(subject=username, action="login_password", page_size=2)
    reply = await stub.ListAuditEvents(query, metadata=ADMIN, timeout=10)
    assert [e.source for e in reply.events] == ["203.0.113.4", "203.0.113.3"]
    assert all(e.reason == "bad_credentials" and e.outcome == "failure" for e in reply.events)
    assert reply.events[0].time.ToDatetime() >= reply.events[1].time.ToDatetime()
    assert uuid.UUID(reply.events[0].event_id)
    query.page_token = reply.next_page_token
    rest = await stub.ListAuditEvents(query, metadata=ADMIN, timeout=10)
    assert [e.source for e in rest.events] == ["203.0.113.2"]
    assert rest.next_page_token == ""

    everything = await stub.ListAuditEvents(
        auth_pb2.ListAuditEventsRequest(subject=username, outcome="success"),
        metadata=ADMIN,
        timeout=10,
    )
    assert [e.action for e in everything.events] == ["register"]
    assert everything.events[0].actor == "anonymous"

    # Time range: [start, end).
    first = reply.events[1].time
    window = auth_pb2.ListAuditEventsRequest(subject=username, start_time=first, end_time=first)
    assert list((await stub.ListAuditEvents(window, metadata=ADMIN, timeout=10)).events) == []
    window.end_time.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
    newer = await stub.ListAuditEvents(window, metadata=ADMIN, timeout=10)
    assert [e.source for e in newer.events] == ["203.0.113.4", "203.0.113.3"]

    mismatched = auth_pb2.ListAuditEventsRequest(
        subject="someone-else", page_token=reply.next_page_token
    )
    assert violated_fields(await failure(stub.ListAuditEvents(mismatched, metadata=ADMIN))) == {
        "page_token"
    }
    by_actor = await stub.ListAuditEvents(
        auth_pb2.ListAuditEventsRequest(actor="user:root-admin", action="list_audit_events"),
        metadata=ADMIN,
    )
    assert len(by_actor.events) == 5


async def test_operators_act_as_themselves(
    auth: Auth, deps: AuthDependencies, clock: FakeClock
) -> None:
    # CreateUser is the operator's one auth method (the break-glass bootstrap; see the peer
    # policy file): an operator cannot pose as someone else through metadata.
    operator = auth.stub("admin")
    username = unique_name()
    await operator.CreateUser(
        auth_pb2.CreateUserRequest(username=username, password=PASSWORD, roles=["analyst"]),
        metadata=as_user("user:somebody-else", "10.9.9.9"),
        timeout=10,
    )
    row = await last_audit(deps, "user_created")
    assert (row["actor"], row["source"], row["subject"]) == (
        "operator:admin",
        "127.0.0.1",
        username,
    )
    # Every other administration call is the gateway's, on behalf of a person.
    error = await failure(
        operator.UnlockUser(auth_pb2.UnlockUserRequest(username=username), timeout=10)
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_without_metadata_the_gateway_itself_is_the_origin(
    stub: Stub, deps: AuthDependencies
) -> None:
    # The gateway acting for itself is no administrator (it never needs to be one).
    error = await failure(stub.ListSigningKeys(auth_pb2.ListSigningKeysRequest(), timeout=10))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    await stub.RecordAuditEvent(
        auth_pb2.RecordAuditEventRequest(
            event=auth_pb2.AuditEvent(
                event_id=str(uuid.uuid4()), action="access_denied", outcome="denied"
            )
        ),
        timeout=10,
    )
    row = await last_audit(deps, "access_denied")
    # Every such caller shares the gateway's address as source: stricter throttling, not looser.
    assert (row["actor"], row["source"]) == ("service:gateway", "127.0.0.1")


async def test_malformed_caller_metadata_is_refused(stub: Stub) -> None:
    for metadata, field in (
        ((("x-streammesh-actor", "root"),), "x-streammesh-actor"),
        ((("x-streammesh-source", "a b"),), "x-streammesh-source"),
    ):
        error = await failure(stub.ListUsers(auth_pb2.ListUsersRequest(), metadata=metadata))
        assert violated_fields(error) == {field}


async def test_record_audit_event_stores_edge_events(stub: Stub, deps: AuthDependencies) -> None:
    event = auth_pb2.AuditEvent(
        event_id=str(uuid.uuid4()),
        actor="user:ada",
        subject="ada",
        action="access_denied",
        outcome="denied",
        reason="missing_role",
        details={"method": "/streammesh.gateway.v1.GatewayService/PublishBatch"},
    )
    # Queued at the edge for a while: the edge's time is kept.
    observed = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=10)
    event.time.FromDatetime(observed)
    request = auth_pb2.RecordAuditEventRequest(event=event)
    metadata = as_user("user:ada", "198.51.100.77")
    await stub.RecordAuditEvent(request, metadata=metadata, timeout=10)
    # A retry with the same event id is stored once.
    await stub.RecordAuditEvent(request, metadata=metadata, timeout=10)
    [row] = await audit_rows(deps, action="access_denied")
    assert (row["actor"], row["subject"], row["outcome"], row["reason"], row["source"]) == (
        "user:ada",
        "ada",
        "denied",
        "missing_role",
        "198.51.100.77",
    )
    assert str(row["event_id"]) == event.event_id
    assert row["occurred_at"] == observed
    # The actor defaults to the one in the metadata.
    anonymous = auth_pb2.AuditEvent(
        action="token_invalid", outcome="denied", reason="bad_signature"
    )
    await stub.RecordAuditEvent(
        auth_pb2.RecordAuditEventRequest(event=anonymous), metadata=as_user(), timeout=10
    )
    [row] = await audit_rows(deps, action="token_invalid")
    assert (row["actor"], row["source"]) == ("anonymous", "198.51.100.7")


async def test_record_audit_event_validates(stub: Stub) -> None:
    stale = timestamp_pb2.Timestamp()
    stale.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    ahead = timestamp_pb2.Timestamp()
    ahead.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10))
    good: dict[str, Any] = {"action": "access_denied", "outcome": "denied"}
    for event, fields in (
        (auth_pb2.AuditEvent(action="login", outcome="success"), {"event.action"}),
        (auth_pb2.AuditEvent(action="access_denied", outcome="maybe"), {"event.outcome"}),
        (auth_pb2.AuditEvent(**good, event_id="42"), {"event.event_id"}),
        (auth_pb2.AuditEvent(**good, time=stale), {"event.time"}),
        (auth_pb2.AuditEvent(**good, time=ahead), {"event.time"}),
        (auth_pb2.AuditEvent(**good, actor="root"), {"event.actor"}),
        (auth_pb2.AuditEvent(**good, source="x" * 200), {"event.source"}),
        (auth_pb2.AuditEvent(**good, reason="R" * 100), {"event.reason"}),
        (auth_pb2.AuditEvent(**good, details={"v": "x" * 300}), {"event.details[v]"}),
        (auth_pb2.AuditEvent(**good, details={"token": "smr_" + "B" * 43}), {"event"}),
    ):
        request = auth_pb2.RecordAuditEventRequest(event=event)
        assert violated_fields(await failure(stub.RecordAuditEvent(request, timeout=10))) == fields
    assert violated_fields(
        await failure(stub.RecordAuditEvent(auth_pb2.RecordAuditEventRequest(), timeout=10))
    ) == {"event"}


@pytest.mark.parametrize(
    "bad_time",
    [
        timestamp_pb2.Timestamp(seconds=1, nanos=-1),
        timestamp_pb2.Timestamp(seconds=1, nanos=2**31 - 1),
        timestamp_pb2.Timestamp(seconds=2**62),
        timestamp_pb2.Timestamp(seconds=-(2**62)),
    ],
    ids=["negative-nanos", "nanos-past-a-second", "after-9999", "before-0001"],
)
async def test_audit_query_with_an_invalid_timestamp_names_the_field(
    stub: Stub, bad_time: timestamp_pb2.Timestamp
) -> None:
    for field in ("start_time", "end_time"):
        query = auth_pb2.ListAuditEventsRequest()
        getattr(query, field).CopyFrom(bad_time)
        assert violated_fields(await failure(stub.ListAuditEvents(query))) == {field}


@pytest.mark.parametrize("kid", ["\x00", "a\x00b", "a b", "\u00e9", "x" * 129, ""])
async def test_retire_with_a_kid_no_key_can_have_is_invalid(stub: Stub, kid: str) -> None:
    request = auth_pb2.RetireSigningKeyRequest(kid=kid)
    assert violated_fields(
        await failure(stub.RetireSigningKey(request, metadata=ADMIN, timeout=10))
    ) == {"kid"}
