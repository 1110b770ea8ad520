"""Auth's own check of an administrator's scope (behind the gateway's role check): it reads the
caller named in the metadata from its own rows, so the tenant and roles a call acts with are
auth's, whatever the gateway's token said."""

from __future__ import annotations

import uuid

import grpc

from streammesh.api.auth.v1 import auth_pb2
from tests.auth.conftest import Auth
from tests.auth.flows import PASSWORD, Stub, as_user, failure


def in_tenant(actor: str, tenant: str) -> tuple[tuple[str, str], ...]:
    return (*as_user(actor), ("x-streammesh-tenant", tenant))


async def platform_admin(auth: Auth) -> tuple[tuple[str, str], ...]:
    """The metadata of a new platform admin (made by the operator, the bootstrap path)."""
    root = f"root-{uuid.uuid4().hex[:6]}"
    await auth.stub("admin").CreateUser(
        auth_pb2.CreateUserRequest(username=root, password=PASSWORD, roles=["admin"]),
        timeout=10,
    )
    return in_tenant(f"user:{root}", "default")


async def test_the_caller_is_checked_against_auths_own_rows(auth: Auth, stub: Stub) -> None:
    operator = auth.stub("admin")
    platform = await platform_admin(auth)
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    await stub.CreateTenant(
        auth_pb2.CreateTenantRequest(tenant_id=tenant), metadata=platform, timeout=10
    )
    boss, worker = f"boss-{uuid.uuid4().hex[:6]}", f"worker-{uuid.uuid4().hex[:6]}"
    for name, roles in ((boss, ["tenant-admin"]), (worker, ["analyst"])):
        await operator.CreateUser(
            auth_pb2.CreateUserRequest(
                username=name, password=PASSWORD, roles=roles, tenant=tenant
            ),
            timeout=10,
        )
    listed = await stub.ListUsers(
        auth_pb2.ListUsersRequest(), metadata=in_tenant(f"user:{boss}", tenant), timeout=10
    )
    assert {user.username for user in listed.users} == {boss, worker}
    # The same name in another tenant, a non-admin, a name nobody has: no administrator.
    for metadata in (
        in_tenant(f"user:{boss}", "default"),
        in_tenant(f"user:{worker}", tenant),
        in_tenant("user:nobody-at-all", tenant),
        in_tenant("anonymous", tenant),
    ):
        error = await failure(stub.ListUsers(auth_pb2.ListUsersRequest(), metadata=metadata))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    # A tenant admin reaches no platform call, even when the gateway let it through.
    for call in (
        stub.ListTenants(auth_pb2.ListTenantsRequest(), metadata=in_tenant(f"user:{boss}", tenant)),
        stub.ListSigningKeys(
            auth_pb2.ListSigningKeysRequest(), metadata=in_tenant(f"user:{boss}", tenant)
        ),
    ):
        assert (await failure(call)).code() == grpc.StatusCode.PERMISSION_DENIED
    # Disabled, it is no administrator any more, at once.
    await stub.SetUserDisabled(
        auth_pb2.SetUserDisabledRequest(username=boss, disabled=True, tenant=tenant),
        metadata=platform,
        timeout=10,
    )
    error = await failure(
        stub.ListUsers(auth_pb2.ListUsersRequest(), metadata=in_tenant(f"user:{boss}", tenant))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_call_without_a_tenant_grants_nothing_by_itself(auth: Auth, stub: Stub) -> None:
    # A gateway that predates tenants names no tenant: its caller is looked up in "default"
    # and must be an administrator there; the missing entry is no platform grant.
    operator = auth.stub("admin")
    analyst = f"analyst-{uuid.uuid4().hex[:6]}"
    await operator.CreateUser(
        auth_pb2.CreateUserRequest(username=analyst, password=PASSWORD, roles=["analyst"]),
        timeout=10,
    )
    for actor in (f"user:{analyst}", "user:nobody-at-all", "anonymous"):
        for call in (
            stub.ListTenants(auth_pb2.ListTenantsRequest(), metadata=as_user(actor)),
            stub.ListUsers(auth_pb2.ListUsersRequest(), metadata=as_user(actor)),
        ):
            assert (await failure(call)).code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_tenant_named_by_another_service_is_refused(auth: Auth) -> None:
    # The peer policy admits only the gateway (and the operator to CreateUser); auth's helper
    # refuses anyone else's header besides.
    error = await failure(
        auth.stub("processor").ListUsers(
            auth_pb2.ListUsersRequest(), metadata=(("x-streammesh-tenant", "default"),)
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_signing_key_calls_are_platform_rows_not_rows_of_tenant_default(
    auth: Auth, stub: Stub
) -> None:
    # A platform admin's own tenant is "default", but its key calls are platform events: a
    # tenant admin of "default" reads "default"'s log and must not find them there.
    operator = auth.stub("admin")
    root, boss = f"root-{uuid.uuid4().hex[:6]}", f"boss-{uuid.uuid4().hex[:6]}"
    for name, roles in ((root, ["admin"]), (boss, ["tenant-admin"])):
        await operator.CreateUser(
            auth_pb2.CreateUserRequest(username=name, password=PASSWORD, roles=roles),
            timeout=10,
        )
    platform = in_tenant(f"user:{root}", "default")
    rotated = await stub.RotateSigningKey(
        auth_pb2.RotateSigningKeyRequest(), metadata=platform, timeout=10
    )
    await stub.ListSigningKeys(auth_pb2.ListSigningKeysRequest(), metadata=platform, timeout=10)
    await failure(
        stub.RetireSigningKey(
            auth_pb2.RetireSigningKeyRequest(kid=rotated.active.kid), metadata=platform
        )
    )
    seen = await stub.ListAuditEvents(
        auth_pb2.ListAuditEventsRequest(actor=f"user:{root}", page_size=100),
        metadata=in_tenant(f"user:{boss}", "default"),
        timeout=10,
    )
    key_actions = {"key_rotation", "key_retired", "list_signing_keys"}
    assert [event.action for event in seen.events if event.action in key_actions] == []
    everything = await stub.ListAuditEvents(
        auth_pb2.ListAuditEventsRequest(actor=f"user:{root}", page_size=100),
        metadata=platform,
        timeout=10,
    )
    rows = [event for event in everything.events if event.action in key_actions]
    assert {event.action for event in rows} == key_actions
    assert {event.tenant for event in rows} == {""}
