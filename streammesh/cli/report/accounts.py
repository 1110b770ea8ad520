"""The report's account facts, read through the gateway's AdminService with the saved session (a
platform admin's, to see every tenant; a tenant admin sees its own): every user's MFA, lock and
disabled state, and the signing keys' ages. Without a usable session these are a gap, not a
guess."""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc

from streammesh.api.gateway.v1 import admin_pb2
from streammesh.cli.session import NotLoggedIn, with_session
from streammesh.cli.stack import StackConfig
from streammesh.client import GatewayClient

__all__ = ["read_accounts"]

_MAX_PAGES = 200  # 100,000 users at 500 a page: a bound, not a limit anyone should meet


def _time(message: Any, name: str) -> dt.datetime | None:
    if not message.HasField(name):
        return None
    value: dt.datetime = getattr(message, name).ToDatetime(tzinfo=dt.UTC)
    return value


async def _pages(call: Any, request: Any, items: str) -> list[Any]:
    found: list[Any] = []
    for _ in range(_MAX_PAGES):
        reply = await call(request, timeout=30)
        found += list(getattr(reply, items))
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    return found


async def _read(client: GatewayClient) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    admin, auth = client.admin, client.bearer()
    try:
        tenants = [
            t.tenant_id
            for t in await _pages(
                lambda r, timeout: admin.ListTenants(r, timeout=timeout, metadata=auth),
                admin_pb2.ListTenantsRequest(page_size=500),
                "tenants",
            )
        ]
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.PERMISSION_DENIED:
            raise
        tenants = [""]  # a tenant admin: its own tenant only
    users = []
    for tenant in tenants:
        for user in await _pages(
            lambda r, timeout: admin.ListUsers(r, timeout=timeout, metadata=auth),
            admin_pb2.ListUsersRequest(page_size=500, tenant=tenant),
            "users",
        ):
            users.append(
                {
                    "tenant": user.tenant,
                    "username": user.username,
                    "roles": list(user.roles),
                    "disabled": user.disabled,
                    "mfa_enabled": user.mfa_enabled,
                    "locked_until": _time(user, "locked_until"),
                }
            )
    keys = []
    try:
        reply = await admin.ListSigningKeys(
            admin_pb2.ListSigningKeysRequest(), timeout=30, metadata=auth
        )
        keys = [
            {
                "kid": key.kid,
                "active": key.active,
                "created_at": _time(key, "created_at"),
                "retired_at": _time(key, "retired_at"),
            }
            for key in reply.keys
        ]
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.PERMISSION_DENIED:
            raise
    return users, keys


async def read_accounts(
    config: StackConfig,
) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None, str | None]:
    """(users, signing keys, gap): the gap says why accounts were not read."""
    try:
        users, keys = await with_session(config, _read)
    except NotLoggedIn as error:
        return None, None, f"no admin session ({error}); run `streammesh login` as an admin"
    except grpc.aio.AioRpcError as error:
        return (
            None,
            None,
            f"the gateway refused the account listing: {error.code().name}: {error.details()}",
        )
    return users, keys or None, None
