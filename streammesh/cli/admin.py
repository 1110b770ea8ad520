"""`streammesh admin ...`: account, key, audit and dead-letter administration through the
gateway's AdminService, with the saved session (which must carry the admin role). Replies print as
tables for people, or with `--json` as the whole reply, every field included, for scripts.

The first admin cannot log in to create themselves, so `admin bootstrap` is the break-glass path:
it calls the auth service directly over mTLS with the operator (`admin`) certificate, which only
someone holding the PKI folder has.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from streammesh.api.auth.v1 import auth_pb2, auth_pb2_grpc
from streammesh.api.gateway.v1 import admin_pb2
from streammesh.cli.accounts import read_password
from streammesh.cli.output import print_reply
from streammesh.cli.paging import page_size_option
from streammesh.cli.session import with_session
from streammesh.cli.stack import StackConfig
from streammesh.client import GatewayClient
from streammesh.mesh.client import MeshClient, MeshClientConfig, TlsFiles, parse_targets

__all__ = [
    "TENANT_OPTION",
    "AdminCommand",
    "add_admin_commands",
    "add_admin_subcommands",
    "json_option",
]


@dataclass(frozen=True)
class AdminCommand:
    """One subcommand: the AdminService method it calls and how its request is built."""

    method: str
    help: str
    build: Callable[[argparse.Namespace], Message]
    arguments: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = ()


USERNAME: tuple[tuple[str, ...], dict[str, Any]] = (("username",), {})
TENANT_OPTION: tuple[tuple[str, ...], dict[str, Any]] = (
    ("--tenant",),
    {
        "default": "",
        "help": "the tenant of the account(s) (default: your own); only a platform admin "
        "may name another",
    },
)
PAGE_TOKEN: tuple[tuple[str, ...], dict[str, Any]] = (
    ("--page-token",),
    {"default": "", "help": "next_page_token of the previous page (printed after its table)"},
)


def _audit_request(args: argparse.Namespace) -> Message:
    return admin_pb2.ListAuditEventsRequest(
        tenant=args.tenant,
        actor=args.actor or "",
        subject=args.subject or "",
        action=args.action or "",
        outcome=args.outcome or "",
        page_size=args.limit,
        page_token=args.page_token,
    )


def _dead_letters_request(args: argparse.Namespace) -> Message:
    request = admin_pb2.ListDeadLettersRequest(page_size=args.limit, page_token=args.page_token)
    if args.partition is not None:
        request.partition = args.partition
    if args.pending:
        request.replayed = False
    return request


DEAD_LETTER_ID: tuple[tuple[str, ...], dict[str, Any]] = (
    ("id",),
    {"type": int, "help": "the dead letter's id (from `admin dead-letters`)"},
)

COMMANDS: dict[str, AdminCommand] = {
    "users": AdminCommand(
        "ListUsers",
        "list accounts",
        lambda a: admin_pb2.ListUsersRequest(
            username_prefix=a.prefix or "",
            page_size=a.limit,
            page_token=a.page_token,
            tenant=a.tenant,
        ),
        (
            (("--prefix",), {}),
            (("--limit",), {"type": page_size_option, "default": 100}),
            PAGE_TOKEN,
            TENANT_OPTION,
        ),
    ),
    "disable": AdminCommand(
        "SetUserDisabled",
        "disable an account and end its sessions",
        lambda a: admin_pb2.SetUserDisabledRequest(
            username=a.username, disabled=True, tenant=a.tenant
        ),
        (USERNAME, TENANT_OPTION),
    ),
    "enable": AdminCommand(
        "SetUserDisabled",
        "re-enable an account",
        lambda a: admin_pb2.SetUserDisabledRequest(
            username=a.username, disabled=False, tenant=a.tenant
        ),
        (USERNAME, TENANT_OPTION),
    ),
    "roles": AdminCommand(
        "SetUserRoles",
        "replace an account's roles (admin, tenant-admin, producer, analyst, schema-admin, rule-admin)",
        lambda a: admin_pb2.SetUserRolesRequest(
            username=a.username, roles=a.roles, tenant=a.tenant
        ),
        (USERNAME, (("roles",), {"nargs": "*"}), TENANT_OPTION),
    ),
    "reset-mfa": AdminCommand(
        "ResetMfa",
        "remove TOTP and recovery codes",
        lambda a: admin_pb2.ResetMfaRequest(username=a.username, tenant=a.tenant),
        (USERNAME, TENANT_OPTION),
    ),
    "unlock": AdminCommand(
        "UnlockUser",
        "lift a lockout",
        lambda a: admin_pb2.UnlockUserRequest(username=a.username, tenant=a.tenant),
        (USERNAME, TENANT_OPTION),
    ),
    "revoke-sessions": AdminCommand(
        "RevokeSessions",
        "end every session of an account",
        lambda a: admin_pb2.RevokeSessionsRequest(username=a.username, tenant=a.tenant),
        (USERNAME, TENANT_OPTION),
    ),
    "keys": AdminCommand(
        "ListSigningKeys", "list token-signing keys", lambda a: admin_pb2.ListSigningKeysRequest()
    ),
    "rotate-key": AdminCommand(
        "RotateSigningKey",
        "make a new signing key active",
        lambda a: admin_pb2.RotateSigningKeyRequest(),
    ),
    "retire-key": AdminCommand(
        "RetireSigningKey",
        "stop publishing a key (its tokens stop working)",
        lambda a: admin_pb2.RetireSigningKeyRequest(kid=a.kid),
        ((("kid",), {}),),
    ),
    "audit": AdminCommand(
        "ListAuditEvents",
        "read the audit log, newest first",
        _audit_request,
        (
            (("--actor",), {}),
            (("--subject",), {}),
            (("--action",), {}),
            (("--outcome",), {"choices": ["success", "failure", "denied"]}),
            (("--limit",), {"type": page_size_option, "default": 50}),
            PAGE_TOKEN,
            (
                ("--tenant",),
                {
                    "default": "",
                    "help": "only this tenant's events (a tenant admin always reads only "
                    "its own; a platform admin reads every tenant's by default)",
                },
            ),
        ),
    ),
    "dead-letters": AdminCommand(
        "ListDeadLetters",
        "list dead letters (entries the pipeline set aside), newest first",
        _dead_letters_request,
        (
            (("--partition",), {"type": int, "help": "only this partition"}),
            (("--pending",), {"action": "store_true", "help": "only those not yet replayed"}),
            (("--limit",), {"type": page_size_option, "default": 50}),
            PAGE_TOKEN,
        ),
    ),
    "dead-letter": AdminCommand(
        "GetDeadLetter",
        "show one dead letter with its events",
        lambda a: admin_pb2.GetDeadLetterRequest(id=a.id),
        (DEAD_LETTER_ID,),
    ),
    "replay": AdminCommand(
        "ReplayDeadLetter",
        "publish a dead letter's events again (same ids: nothing is stored twice)",
        lambda a: admin_pb2.ReplayDeadLetterRequest(id=a.id),
        (DEAD_LETTER_ID,),
    ),
}


async def run_admin_command(config: StackConfig, args: argparse.Namespace) -> int:
    command: AdminCommand = args.admin_command

    async def call(client: GatewayClient) -> Message:
        method = getattr(client.admin, command.method)
        reply: Message = await method(command.build(args), metadata=client.bearer(), timeout=30)
        return reply

    print_reply(await with_session(config, call), as_json=args.json)
    return 0


async def cmd_create_user(config: StackConfig, args: argparse.Namespace) -> int:
    password = read_password(args, confirm=True)
    request = admin_pb2.CreateUserRequest(
        username=args.username, password=password, roles=args.role, tenant=args.tenant
    )

    async def call(client: GatewayClient) -> Message:
        reply: Message = await client.admin.CreateUser(
            request, metadata=client.bearer(), timeout=30
        )
        return reply

    print_reply(await with_session(config, call), as_json=args.json)
    return 0


async def create_user_as_operator(
    config: StackConfig, username: str, password: str, roles: list[str]
) -> auth_pb2.User:
    """Create an account by calling auth directly with the operator certificate."""
    mesh = MeshClient(
        MeshClientConfig(
            server_name="auth",
            targets=parse_targets(config.address("auth")),
            tls=TlsFiles.of(config.pki_dir, "admin"),
            services=(auth_pb2.DESCRIPTOR.services_by_name["AuthService"],),
            timeout_seconds=30,
        )
    )
    async with mesh:
        reply: auth_pb2.CreateUserResponse = await mesh.stub(
            auth_pb2_grpc.AuthServiceStub
        ).CreateUser(auth_pb2.CreateUserRequest(username=username, password=password, roles=roles))
    return reply.user


async def cmd_bootstrap(config: StackConfig, args: argparse.Namespace) -> int:
    password = read_password(args, confirm=True)
    user = await create_user_as_operator(config, args.username, password, ["admin"])
    print(f"created admin {user.username}; next: streammesh mfa enroll {args.username}")
    return 0


def add_admin_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    admin = commands.add_parser("admin", help="administration (needs an admin session)")
    sub = admin.add_subparsers(dest="admin_cmd", required=True)

    bootstrap = sub.add_parser(
        "bootstrap", help="create the first admin with the operator certificate"
    )
    bootstrap.add_argument("username")
    bootstrap.add_argument("--password-stdin", action="store_true")
    bootstrap.set_defaults(handler=cmd_bootstrap)

    create = sub.add_parser("create-user", help="create an account with roles")
    create.add_argument("username")
    create.add_argument("--role", action="append", default=[], help="repeat for several roles")
    create.add_argument("--password-stdin", action="store_true")
    create.add_argument(*TENANT_OPTION[0], **TENANT_OPTION[1])
    json_option(create)
    create.set_defaults(handler=cmd_create_user)
    add_admin_subcommands(sub, COMMANDS)


def add_admin_subcommands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    commands: dict[str, AdminCommand],
) -> None:
    """One subcommand per entry, each calling its AdminService method with the session."""
    for name, command in commands.items():
        parser = sub.add_parser(name, help=command.help)
        for flags, options in command.arguments:
            parser.add_argument(*flags, **options)
        json_option(parser)
        parser.set_defaults(handler=run_admin_command, admin_command=command)


def json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the whole reply as JSON, every field included (for scripts)",
    )
