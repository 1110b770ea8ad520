"""`streammesh tenant ...`: tenants, for a platform admin's session (role `admin`, tenant
"default"), through the gateway's AdminService. Tables for people, `--json` for scripts.

A new tenant has no users: create its first tenant admin with
`streammesh admin create-user NAME --tenant ID --role tenant-admin`; its users then log in with
`streammesh login NAME --tenant ID`.
"""

from __future__ import annotations

import argparse
from typing import Any

from streammesh.api.gateway.v1 import admin_pb2
from streammesh.cli.admin import PAGE_TOKEN, AdminCommand, add_admin_subcommands

__all__ = ["add_tenant_commands"]

TENANT_ID: tuple[tuple[str, ...], dict[str, Any]] = (
    ("tenant_id",),
    {
        "metavar": "ID",
        "help": "the tenant id: 2 to 32 of a-z, 0-9 and '-', starting with a letter",
    },
)

COMMANDS: dict[str, AdminCommand] = {
    "create": AdminCommand(
        "CreateTenant",
        "create a tenant (no users yet)",
        lambda a: admin_pb2.CreateTenantRequest(tenant_id=a.tenant_id, display_name=a.name),
        (TENANT_ID, (("--name",), {"default": "", "help": "display name (default: the id)"})),
    ),
    "list": AdminCommand(
        "ListTenants",
        "list tenants by id",
        lambda a: admin_pb2.ListTenantsRequest(page_size=a.limit, page_token=a.page_token),
        ((("--limit",), {"type": int, "default": 100}), PAGE_TOKEN),
    ),
    "show": AdminCommand(
        "GetTenant",
        "show one tenant",
        lambda a: admin_pb2.GetTenantRequest(tenant_id=a.tenant_id),
        (TENANT_ID,),
    ),
    "disable": AdminCommand(
        "SetTenantDisabled",
        "disable a tenant: its users cannot log in, and their tokens stop working within 2 s",
        lambda a: admin_pb2.SetTenantDisabledRequest(tenant_id=a.tenant_id, disabled=True),
        (TENANT_ID,),
    ),
    "enable": AdminCommand(
        "SetTenantDisabled",
        "enable a tenant again (its sessions refresh again)",
        lambda a: admin_pb2.SetTenantDisabledRequest(tenant_id=a.tenant_id, disabled=False),
        (TENANT_ID,),
    ),
}


def add_tenant_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    tenant = commands.add_parser("tenant", help="tenants (needs a platform admin session)")
    add_admin_subcommands(tenant.add_subparsers(dest="tenant_cmd", required=True), COMMANDS)
