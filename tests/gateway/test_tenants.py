"""Tenants through the real gateway: two tenants, A and B, each with its own tenant admin and
users (one username taken in both), all made and logged in through the public API.

A tenant admin of A cannot list, create, modify or learn of B's users: naming B, or a user only
B has, answers NOT_FOUND exactly as a tenant or user that does not exist (not PERMISSION_DENIED,
which would confirm it exists). It cannot grant the platform role, nor reach the platform
methods. The platform admin can do all of it. Tokens carry their tenant through refresh, and a
disabled tenant's users can neither log in nor refresh, and their tokens are refused.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
import pyotp
import pytest
from grpc_status import rpc_status

from streammesh.api.gateway.v1 import admin_pb2, gateway_pb2
from tests.gateway.conftest import PASSWORD, Person, Stack

pytestmark = pytest.mark.timeout(180)


@dataclass
class Tenants:
    """Two tenants and their people, by name: `a`/`b` are the tenant ids."""

    a: str
    b: str
    people: dict[str, Person]
    """"a-admin", "a-user", "a-same", "b-admin", "b-user", "b-same"."""
    tenant_of: dict[str, str]


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def details(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, Any]:
    """Everything a caller learns from a refusal: code, message and rich details."""
    status = rpc_status.from_call(error)
    return error.code(), error.details() or "", status.details if status else None


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


async def login(stack: Stack, username: str, tenant: str, roles: tuple[str, ...]) -> Person:
    """TOTP enrolment and the two login steps through the gateway, in `tenant`."""
    begun = await stack.gateway.BeginTotpEnrollment(
        gateway_pb2.BeginTotpEnrollmentRequest(username=username, password=PASSWORD, tenant=tenant),
        timeout=10,
    )
    totp = pyotp.TOTP(begun.secret)
    await stack.gateway.ConfirmTotpEnrollment(
        gateway_pb2.ConfirmTotpEnrollmentRequest(
            username=username, password=PASSWORD, code=totp.now(), tenant=tenant
        ),
        timeout=10,
    )
    person = Person(username, roles, begun.secret, "", "")
    await relogin(stack, person, tenant)
    return person


async def relogin(stack: Stack, person: Person, tenant: str, *, offset: int = 30) -> None:
    started = await stack.gateway.StartLogin(
        gateway_pb2.StartLoginRequest(username=person.username, password=PASSWORD, tenant=tenant),
        timeout=10,
    )
    # The confirming code's step is spent; the next step's code is within the drift window.
    completed = await stack.gateway.CompleteLogin(
        gateway_pb2.CompleteLoginRequest(
            challenge=started.challenge,
            totp_code=pyotp.TOTP(person.totp_secret).at(time.time() + offset),
        ),
        timeout=10,
    )
    assert completed.tokens.tenant == tenant
    person.access_token = completed.tokens.access_token
    person.refresh_token = completed.tokens.refresh_token


@pytest.fixture(scope="module")
async def tenants(stack: Stack) -> Tenants:
    run = uuid.uuid4().hex[:6]
    a, b = f"ta-{run}", f"tb-{run}"
    platform = stack.admin_person.bearer()
    for tenant in (a, b):
        created = await stack.admin.CreateTenant(
            admin_pb2.CreateTenantRequest(tenant_id=tenant, display_name=f"Tenant {tenant}"),
            metadata=platform,
            timeout=10,
        )
        assert (created.tenant.tenant_id, created.tenant.disabled) == (tenant, False)
    roles = {"admin": ("tenant-admin",), "user": ("producer", "analyst"), "same": ("analyst",)}
    people: dict[str, Person] = {}
    tenant_of: dict[str, str] = {}
    for prefix, tenant in (("a", a), ("b", b)):
        for kind, granted in roles.items():
            # "same" is one username in both tenants: usernames are unique per tenant.
            username = f"same-{run}" if kind == "same" else f"{prefix}-{kind}-{run}"
            reply = await stack.admin.CreateUser(
                admin_pb2.CreateUserRequest(
                    username=username, password=PASSWORD, roles=list(granted), tenant=tenant
                ),
                metadata=platform,
                timeout=10,
            )
            assert reply.user.tenant == tenant
            people[f"{prefix}-{kind}"] = await login(stack, username, tenant, granted)
            tenant_of[f"{prefix}-{kind}"] = tenant
    return Tenants(a, b, people, tenant_of)


async def test_tokens_carry_their_tenant_through_refresh(stack: Stack, tenants: Tenants) -> None:
    for name, person in tenants.people.items():
        assert claims(person.access_token)["tenant"] == tenants.tenant_of[name]
    assert claims(stack.admin_person.access_token)["tenant"] == "default"
    person = tenants.people["a-user"]
    refreshed = await stack.gateway.RefreshSession(
        gateway_pb2.RefreshSessionRequest(refresh_token=person.refresh_token), timeout=10
    )
    assert refreshed.tokens.tenant == tenants.a
    assert claims(refreshed.tokens.access_token)["tenant"] == tenants.a
    person.access_token = refreshed.tokens.access_token
    person.refresh_token = refreshed.tokens.refresh_token
    # One username, two accounts: different users, each in its own tenant.
    same_a, same_b = (claims(tenants.people[k].access_token) for k in ("a-same", "b-same"))
    assert same_a["preferred_username"] == same_b["preferred_username"]
    assert same_a["sub"] != same_b["sub"]


async def test_login_needs_the_right_tenant(stack: Stack, tenants: Tenants) -> None:
    person = tenants.people["a-user"]
    answers = []
    for tenant in (tenants.b, "", "no-such-tenant"):
        error = await failure(
            stack.gateway.StartLogin(
                gateway_pb2.StartLoginRequest(
                    username=person.username, password=PASSWORD, tenant=tenant
                ),
                timeout=10,
            )
        )
        answers.append(details(error))
    # Another tenant, the default one and a missing one: the one answer of a wrong password.
    assert {answer[:2] for answer in answers} == {
        (grpc.StatusCode.UNAUTHENTICATED, "invalid username, password or code")
    }


async def test_tenant_admin_sees_only_its_tenant(stack: Stack, tenants: Tenants) -> None:
    boss = tenants.people["a-admin"].bearer()
    listed = await stack.admin.ListUsers(admin_pb2.ListUsersRequest(), metadata=boss, timeout=10)
    names = {user.username for user in listed.users}
    assert names == {tenants.people[k].username for k in ("a-admin", "a-user", "a-same")}
    assert {user.tenant for user in listed.users} == {tenants.a}
    own = await stack.admin.ListUsers(
        admin_pb2.ListUsersRequest(tenant=tenants.a), metadata=boss, timeout=10
    )
    assert {user.username for user in own.users} == names
    # Another tenant and one that does not exist: the same NOT_FOUND, nothing more.
    other = await failure(
        stack.admin.ListUsers(admin_pb2.ListUsersRequest(tenant=tenants.b), metadata=boss)
    )
    missing = await failure(
        stack.admin.ListUsers(admin_pb2.ListUsersRequest(tenant="zz-missing"), metadata=boss)
    )
    assert details(other) == details(missing)
    assert details(other)[:2] == (grpc.StatusCode.NOT_FOUND, "no such tenant")


async def test_tenant_admin_cannot_create_or_touch_another_tenants_users(
    stack: Stack, tenants: Tenants
) -> None:
    boss = tenants.people["a-admin"].bearer()
    theirs = tenants.people["b-user"].username
    nobody = f"nobody-{uuid.uuid4().hex[:6]}"
    created = await failure(
        stack.admin.CreateUser(
            admin_pb2.CreateUserRequest(username=nobody, password=PASSWORD, tenant=tenants.b),
            metadata=boss,
        )
    )
    assert details(created)[:2] == (grpc.StatusCode.NOT_FOUND, "no such tenant")

    def calls(username: str, tenant: str = "") -> list[Awaitable[Any]]:
        return [
            stack.admin.SetUserDisabled(
                admin_pb2.SetUserDisabledRequest(username=username, disabled=True, tenant=tenant),
                metadata=boss,
            ),
            stack.admin.SetUserRoles(
                admin_pb2.SetUserRolesRequest(username=username, roles=[], tenant=tenant),
                metadata=boss,
            ),
            stack.admin.ResetMfa(
                admin_pb2.ResetMfaRequest(username=username, tenant=tenant), metadata=boss
            ),
            stack.admin.UnlockUser(
                admin_pb2.UnlockUserRequest(username=username, tenant=tenant), metadata=boss
            ),
            stack.admin.RevokeSessions(
                admin_pb2.RevokeSessionsRequest(username=username, tenant=tenant), metadata=boss
            ),
        ]

    # B's user, looked for in A (no tenant named): as unknown as a name nobody has.
    for theirs_call, nobody_call in zip(calls(theirs), calls(nobody), strict=True):
        their_answer, nobody_answer = (
            details(await failure(theirs_call)),
            details(await failure(nobody_call)),
        )
        assert their_answer == nobody_answer
        assert their_answer[:2] == (grpc.StatusCode.NOT_FOUND, "no such user")
    # B named outright: as unknown as a tenant that does not exist.
    for their_call, missing_call in zip(
        calls(theirs, tenants.b), calls(theirs, "zz-missing"), strict=True
    ):
        assert details(await failure(their_call)) == details(await failure(missing_call))
    # The shared username: disabling A's "same" leaves B's alone.
    same = tenants.people["a-same"].username
    disabled = await stack.admin.SetUserDisabled(
        admin_pb2.SetUserDisabledRequest(username=same, disabled=True), metadata=boss, timeout=10
    )
    assert (disabled.user.tenant, disabled.user.disabled) == (tenants.a, True)
    await stack.admin.SetUserDisabled(
        admin_pb2.SetUserDisabledRequest(username=same, disabled=False), metadata=boss, timeout=10
    )
    b_users = await stack.admin.ListUsers(
        admin_pb2.ListUsersRequest(tenant=tenants.b),
        metadata=stack.admin_person.bearer(),
        timeout=10,
    )
    by_name = {user.username: user for user in b_users.users}
    assert not by_name[same].disabled
    assert not by_name[theirs].disabled and by_name[theirs].mfa_enabled
    assert set(by_name[theirs].roles) == {"producer", "analyst"}


async def test_tenant_admin_manages_its_own_users_but_never_grants_platform_power(
    stack: Stack, tenants: Tenants
) -> None:
    boss = tenants.people["a-admin"].bearer()
    username = f"a-new-{uuid.uuid4().hex[:6]}"
    created = await stack.admin.CreateUser(
        admin_pb2.CreateUserRequest(username=username, password=PASSWORD, roles=["producer"]),
        metadata=boss,
        timeout=10,
    )
    assert (created.user.tenant, list(created.user.roles)) == (tenants.a, ["producer"])
    promoted = await stack.admin.SetUserRoles(
        admin_pb2.SetUserRolesRequest(username=username, roles=["tenant-admin", "analyst"]),
        metadata=boss,
        timeout=10,
    )
    assert list(promoted.user.roles) == ["analyst", "tenant-admin"]
    for call in (
        stack.admin.SetUserRoles(
            admin_pb2.SetUserRolesRequest(username=username, roles=["admin"]), metadata=boss
        ),
        stack.admin.CreateUser(
            admin_pb2.CreateUserRequest(
                username=f"x-{uuid.uuid4().hex[:6]}", password=PASSWORD, roles=["admin"]
            ),
            metadata=boss,
        ),
    ):
        assert (await failure(call)).code() == grpc.StatusCode.PERMISSION_DENIED
    # Not even the platform admin gives the platform role outside tenant "default".
    error = await failure(
        stack.admin.SetUserRoles(
            admin_pb2.SetUserRolesRequest(username=username, roles=["admin"], tenant=tenants.a),
            metadata=stack.admin_person.bearer(),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_platform_methods_refuse_tenant_admins(stack: Stack, tenants: Tenants) -> None:
    boss = tenants.people["a-admin"].bearer()
    calls = [
        stack.admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant_id="zz-new"), metadata=boss),
        stack.admin.ListTenants(admin_pb2.ListTenantsRequest(), metadata=boss),
        stack.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id=tenants.a), metadata=boss),
        stack.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id=tenants.b), metadata=boss),
        stack.admin.SetTenantDisabled(
            admin_pb2.SetTenantDisabledRequest(tenant_id=tenants.b, disabled=True), metadata=boss
        ),
        stack.admin.ListSigningKeys(admin_pb2.ListSigningKeysRequest(), metadata=boss),
    ]  # (dead letters are its tenant's own: tests/gateway/test_tenant_events.py)
    for call in calls:
        assert (await failure(call)).code() == grpc.StatusCode.PERMISSION_DENIED
    # A producer or analyst of a tenant is no administrator at all.
    user = tenants.people["a-user"].bearer()
    error = await failure(stack.admin.ListUsers(admin_pb2.ListUsersRequest(), metadata=user))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_platform_admin_manages_every_tenant(stack: Stack, tenants: Tenants) -> None:
    platform = stack.admin_person.bearer()
    listed = await stack.admin.ListTenants(
        admin_pb2.ListTenantsRequest(page_size=500), metadata=platform, timeout=10
    )
    assert {tenants.a, tenants.b, "default"} <= {t.tenant_id for t in listed.tenants}
    got = await stack.admin.GetTenant(
        admin_pb2.GetTenantRequest(tenant_id=tenants.b), metadata=platform, timeout=10
    )
    assert (got.tenant.display_name, got.tenant.disabled) == (f"Tenant {tenants.b}", False)
    for call, code in (
        (stack.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id="zz-missing"), metadata=platform), grpc.StatusCode.NOT_FOUND),
        (stack.admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant_id=tenants.a), metadata=platform), grpc.StatusCode.ALREADY_EXISTS),
        (stack.admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant_id="Bad Id!"), metadata=platform), grpc.StatusCode.INVALID_ARGUMENT),
        (stack.admin.SetTenantDisabled(admin_pb2.SetTenantDisabledRequest(tenant_id="default", disabled=True), metadata=platform), grpc.StatusCode.FAILED_PRECONDITION),
    ):  # fmt: skip
        assert (await failure(call)).code() == code
    theirs = tenants.people["b-user"].username
    reset = await stack.admin.UnlockUser(
        admin_pb2.UnlockUserRequest(username=theirs, tenant=tenants.b),
        metadata=platform,
        timeout=10,
    )
    assert reset.user.tenant == tenants.b


async def audit_rows(stack: Stack, bearer: Any, **filters: Any) -> list[admin_pb2.AuditEvent]:
    reply = await stack.admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(page_size=500, **filters), metadata=bearer, timeout=10
    )
    return list(reply.events)


async def test_audit_rows_carry_the_tenant_and_tenant_admins_read_only_theirs(
    stack: Stack, tenants: Tenants
) -> None:
    boss = tenants.people["a-admin"].bearer()
    rows = await audit_rows(stack, boss)
    assert rows and {row.tenant for row in rows} == {tenants.a}
    # The platform admin's creation of A's users is in A's log, naming the actor's tenant.
    platform_actor = f"user:{stack.admin_person.username}"
    created = [row for row in rows if (row.action, row.actor) == ("user_created", platform_actor)]
    assert created and all(row.details["actor_tenant"] == "default" for row in created)
    assert {row.action for row in rows} >= {"login", "list_users"}
    other = await failure(
        stack.admin.ListAuditEvents(
            admin_pb2.ListAuditEventsRequest(tenant=tenants.b), metadata=boss
        )
    )
    assert details(other)[:2] == (grpc.StatusCode.NOT_FOUND, "no such tenant")
    b_rows = await audit_rows(stack, stack.admin_person.bearer(), tenant=tenants.b)
    assert b_rows and {row.tenant for row in b_rows} == {tenants.b}
    # A's admin's refused look at B left a row in A, with the reason a missing tenant gets.
    refused = [row for row in await audit_rows(stack, boss) if row.reason == "unknown_tenant"]
    assert refused and all(row.tenant == tenants.a for row in refused)


async def test_a_disabled_tenant_cannot_log_in_and_its_tokens_are_refused(
    stack: Stack, tenants: Tenants
) -> None:
    platform = stack.admin_person.bearer()
    person, other = tenants.people["b-user"], tenants.people["a-user"]
    count = gateway_pb2.CountEventsRequest()
    await stack.gateway.CountEvents(count, metadata=person.bearer(), timeout=10)
    disabled = await stack.admin.SetTenantDisabled(
        admin_pb2.SetTenantDisabledRequest(tenant_id=tenants.b, disabled=True),
        metadata=platform,
        timeout=10,
    )
    assert disabled.tenant.disabled and disabled.tenant.HasField("disabled_at")
    deadline = time.monotonic() + 10
    while True:
        try:
            await stack.gateway.CountEvents(count, metadata=person.bearer(), timeout=10)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            break
        assert time.monotonic() < deadline, "the disabled tenant's token still works"
        await asyncio.sleep(0.05)
    # Another tenant's tokens are untouched.
    await stack.gateway.CountEvents(count, metadata=other.bearer(), timeout=10)
    refresh = await failure(
        stack.gateway.RefreshSession(
            gateway_pb2.RefreshSessionRequest(refresh_token=person.refresh_token)
        )
    )
    assert refresh.code() == grpc.StatusCode.UNAUTHENTICATED
    login_error = await failure(relogin(stack, person, tenants.b, offset=60))
    assert details(login_error)[:2] == (
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid username, password or code",
    )

    await stack.admin.SetTenantDisabled(
        admin_pb2.SetTenantDisabledRequest(tenant_id=tenants.b, disabled=False),
        metadata=platform,
        timeout=10,
    )
    # Enabled again: the session refreshes, and the new token (of the new generation) works.
    refreshed = await stack.gateway.RefreshSession(
        gateway_pb2.RefreshSessionRequest(refresh_token=person.refresh_token), timeout=10
    )
    assert claims(refreshed.tokens.access_token)["tgen"] == 1
    person.access_token = refreshed.tokens.access_token
    person.refresh_token = refreshed.tokens.refresh_token
    await stack.gateway.CountEvents(count, metadata=person.bearer(), timeout=10)
