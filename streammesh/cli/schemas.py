"""`streammesh schema ...`: the schema registry through the gateway, with the saved session.

    streammesh schema register order.created order.schema.json   # role schema-admin
    streammesh schema check order.created order.schema.json      # exit 1 when incompatible
    streammesh schema list                                       # the tenant's event types
    streammesh schema list order.created                         # versions of one type
    streammesh schema show order.created [--version 2]           # the document
    streammesh schema mode order.created FULL_TRANSITIVE          # role schema-admin
    streammesh schema policy [accept|refuse]                     # types without a schema

A schema file of "-" is read from stdin. Every command takes `--json` (the whole reply).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from google.protobuf.message import Message

from streammesh.api.common.v1 import schema_registry_pb2 as common
from streammesh.api.gateway.v1 import schema_registry_pb2 as pb
from streammesh.cli.output import print_reply
from streammesh.cli.paging import page_size_option
from streammesh.cli.session import with_session
from streammesh.cli.stack import StackConfig
from streammesh.client import GatewayClient

__all__ = ["SchemaFileError", "add_schema_commands", "read_schema", "read_text"]

MODES = [
    name.removeprefix("COMPATIBILITY_MODE_")
    for name, number in common.CompatibilityMode.items()
    if number != common.COMPATIBILITY_MODE_UNSPECIFIED
]
_TIMEOUT = 30


class SchemaFileError(Exception):
    """A schema (or rule/window) file cannot be read or is not JSON (said before anything is
    sent)."""


def read_text(path: str) -> str:
    """The file's text (UTF-8), or stdin's for "-"."""
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SchemaFileError(f"cannot read {path}: {error}") from error


def read_schema(path: str) -> str:
    """The document, checked to be JSON here so that a typo is named with its line."""
    text = read_text(path)
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        raise SchemaFileError(
            f"{path} is not JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from error
    return text


async def _call(config: StackConfig, method: str, request: Message) -> Message:
    async def call(client: GatewayClient) -> Message:
        reply: Message = await getattr(client.schemas, method)(
            request, metadata=client.bearer(), timeout=_TIMEOUT
        )
        return reply

    return await with_session(config, call)


async def cmd_register(config: StackConfig, args: argparse.Namespace) -> int:
    request = pb.RegisterSchemaRequest(event_type=args.type, schema_json=read_schema(args.file))
    reply = await _call(config, "RegisterSchema", request)
    assert isinstance(reply, pb.RegisterSchemaResponse)
    if args.json:
        print_reply(reply, as_json=True)
    elif reply.created:
        print(f"registered {args.type} version {reply.schema.version} ({reply.schema.fingerprint})")
    else:
        print(f"already registered as {args.type} version {reply.schema.version}; nothing changed")
    return 0


async def cmd_check(config: StackConfig, args: argparse.Namespace) -> int:
    request = pb.CheckCompatibilityRequest(event_type=args.type, schema_json=read_schema(args.file))
    if args.mode:
        request.compatibility = common.CompatibilityMode.Value(f"COMPATIBILITY_MODE_{args.mode}")
    reply = await _call(config, "CheckCompatibility", request)
    assert isinstance(reply, pb.CheckCompatibilityResponse)
    print_reply(reply, as_json=args.json)
    return 0 if reply.compatible else 1


async def cmd_list(config: StackConfig, args: argparse.Namespace) -> int:
    request: Message
    if args.type:
        request = pb.ListSchemaVersionsRequest(
            event_type=args.type, page_size=args.limit, page_token=args.page_token
        )
        print_reply(await _call(config, "ListSchemaVersions", request), as_json=args.json)
    else:
        request = pb.ListSubjectsRequest(page_size=args.limit, page_token=args.page_token)
        print_reply(await _call(config, "ListSubjects", request), as_json=args.json)
    return 0


async def cmd_show(config: StackConfig, args: argparse.Namespace) -> int:
    request = pb.GetSchemaRequest(event_type=args.type, version=args.version)
    reply = await _call(config, "GetSchema", request)
    assert isinstance(reply, pb.GetSchemaResponse)
    if args.json:
        print_reply(reply, as_json=True)
        return 0
    mode = common.CompatibilityMode.Name(reply.subject.compatibility)
    print(
        f"# {args.type} version {reply.schema.version} of {reply.subject.latest_version}, "
        f"mode {mode.removeprefix('COMPATIBILITY_MODE_')}, {reply.schema.fingerprint}",
        file=sys.stderr,
    )
    # The document alone on stdout, so `schema show t > t.json` gives a file to edit.
    print(json.dumps(json.loads(reply.schema.schema_json), indent=2, ensure_ascii=False))
    return 0


async def cmd_mode(config: StackConfig, args: argparse.Namespace) -> int:
    request = pb.SetCompatibilityRequest(
        event_type=args.type,
        compatibility=common.CompatibilityMode.Value(f"COMPATIBILITY_MODE_{args.mode}"),
    )
    print_reply(await _call(config, "SetCompatibility", request), as_json=args.json)
    return 0


async def cmd_policy(config: StackConfig, args: argparse.Namespace) -> int:
    if args.unknown_types is None:
        reply = await _call(config, "GetSchemaPolicy", pb.GetSchemaPolicyRequest())
    else:
        value = common.UnknownTypePolicy.Value(f"UNKNOWN_TYPE_POLICY_{args.unknown_types.upper()}")
        reply = await _call(
            config, "SetSchemaPolicy", pb.SetSchemaPolicyRequest(unknown_types=value)
        )
    print_reply(reply, as_json=args.json)
    return 0


def _guarded(handler: object) -> object:
    async def run(config: StackConfig, args: argparse.Namespace) -> int:
        try:
            return await handler(config, args)  # type: ignore[operator, no-any-return]
        except SchemaFileError as error:
            print(error, file=sys.stderr)
            return 2

    return run


def add_schema_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    schema = commands.add_parser(
        "schema", help="the schema registry (JSON Schemas of your event types)"
    )
    sub = schema.add_subparsers(dest="schema_cmd", required=True)

    def command(name: str, help_text: str, handler: object) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        parser.add_argument(
            "--json",
            action="store_true",
            help="print the whole reply as JSON, every field included (for scripts)",
        )
        parser.set_defaults(handler=_guarded(handler))
        return parser

    register = command("register", "register the next version of a type's schema", cmd_register)
    register.add_argument("type", help="the event type, for example order.created")
    register.add_argument("file", help="the JSON Schema (Draft 2020-12) file; - for stdin")

    check = command(
        "check", "check a schema against the registered versions (exit 1 if not)", cmd_check
    )
    check.add_argument("type")
    check.add_argument("file", help="the candidate JSON Schema file; - for stdin")
    check.add_argument("--mode", choices=MODES, help="check under this mode, not the type's")

    listing = command("list", "list event types, or the versions of one", cmd_list)
    listing.add_argument("type", nargs="?", help="list this type's versions")
    listing.add_argument(
        "--limit", type=page_size_option, default=100, help="a page; above 1000 is lowered to 1000"
    )
    listing.add_argument(
        "--page-token", default="", help="next_page_token of the previous page (on stderr)"
    )

    show = command("show", "print a version's schema (the latest by default)", cmd_show)
    show.add_argument("type")
    show.add_argument("--version", type=int, default=0, help="this version, not the latest")

    mode = command("mode", "set the compatibility mode of a type", cmd_mode)
    mode.add_argument("type")
    mode.add_argument("mode", choices=MODES)

    policy = command(
        "policy", "show or set what ingest does with types without a schema", cmd_policy
    )
    policy.add_argument("unknown_types", nargs="?", choices=["accept", "refuse"])
