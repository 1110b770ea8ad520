"""`streammesh rule ...`, `streammesh window ...`, `streammesh alerts` and `streammesh
late-events`: the RuleService
through the gateway, with the saved session.

    streammesh rule create hot.yaml          # role rule-admin; the file's "id" names the rule
    streammesh rule update hot-sensor hot.yaml
    streammesh rule disable hot-sensor       # (enable) a new version; the processors stop it
    streammesh rule list                     # latest version of each rule
    streammesh rule show hot-sensor [--version 2]
    streammesh window create|update|disable|enable|list|show ...   # the same for windows
    streammesh window results orders-per-minute ['group = "eu" AND revision = 0']
    streammesh window results - 'values.orders > 100'   # every window's
    streammesh alerts [--rule hot-sensor] ['rule_version >= 2 AND key = "sensor-1"']
    streammesh late-events ['source = "window" AND reason:"*lateness*"']
    # The listings' FILTER is AIP-160 as for `streammesh query`; a refused one is printed again
    # with a caret under the column the service names.

Definition files are YAML, as the docs show them, or JSON (definition_files.py); "-" reads
stdin. A file is checked to be one object here, so a typo is named with its line; the service
names a part the engine cannot run (INVALID_ARGUMENT with the path, e.g.
definition.steps[1].within). Every command takes `--json` (the whole reply).

    # hot.yaml: three readings over 80 within a minute, per sensor
    id: hot-sensor
    kind: threshold
    match: {type: reading}
    field: payload.celsius
    op: gt
    value: 80
    mode: level
    count: 3
    within: 1m
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from streammesh.api.gateway.v1 import rules_pb2 as pb
from streammesh.cli.definition_files import read_definition
from streammesh.cli.errors import describe_rpc_error
from streammesh.cli.output import print_reply
from streammesh.cli.paging import page_size_option
from streammesh.cli.query import filter_pointer
from streammesh.cli.schemas import SchemaFileError
from streammesh.cli.session import with_session
from streammesh.cli.stack import StackConfig
from streammesh.client import GatewayClient

__all__ = ["add_rule_commands"]

_TIMEOUT = 30
Handler = Callable[[StackConfig, argparse.Namespace], Awaitable[int]]


async def _call(config: StackConfig, method: str, request: Message) -> Message:
    async def call(client: GatewayClient) -> Message:
        reply: Message = await getattr(client.rules, method)(
            request, metadata=client.bearer(), timeout=_TIMEOUT
        )
        return reply

    return await with_session(config, call)


def _print_document(reply: Message, field: str, latest: int) -> None:
    definition = getattr(reply, field)
    state = "enabled" if definition.enabled else "disabled"
    print(
        f"# {field} {definition.id} version {definition.version} of {latest}, {state}, "
        f"by {definition.created_by or '-'}",
        file=sys.stderr,
    )
    # The document alone on stdout, so `rule show x > x.json` gives a file to edit.
    print(json.dumps(json.loads(definition.definition_json), indent=2, ensure_ascii=False))


def _commands(kind: str) -> dict[str, Handler]:
    """The handlers of `rule` or `window` (the RPCs differ by name and id field only)."""
    noun = kind.capitalize()
    id_field = f"{kind}_id"

    def build(rpc: str, **fields: object) -> Message:
        """The request of `rpc` (CreateRule, ListWindows...) built from `fields`."""
        message: Message = getattr(pb, f"{rpc}Request")(**fields)
        return message

    async def create(config: StackConfig, args: argparse.Namespace) -> int:
        rpc = f"Create{noun}"
        reply = await _call(config, rpc, build(rpc, definition_json=read_definition(args.file)))
        if args.json:
            print_reply(reply, as_json=True)
        else:
            made = getattr(reply, kind)
            print(f"created {kind} {made.id} version {made.version}")
        return 0

    async def update(config: StackConfig, args: argparse.Namespace) -> int:
        rpc = f"Update{noun}"
        fields = {id_field: args.id, "definition_json": read_definition(args.file)}
        reply = await _call(config, rpc, build(rpc, **fields))
        if args.json:
            print_reply(reply, as_json=True)
        else:
            print(f"updated {kind} {args.id}: version {getattr(reply, kind).version}")
        return 0

    def set_enabled(enabled: bool) -> Handler:
        async def run(config: StackConfig, args: argparse.Namespace) -> int:
            rpc = f"Set{noun}Enabled"
            fields = {id_field: args.id, "enabled": enabled}
            reply: Any = await _call(config, rpc, build(rpc, **fields))
            if args.json:
                print_reply(reply, as_json=True)
                return 0
            version = getattr(reply, kind).version
            state = "enabled" if enabled else "disabled"
            if reply.changed:
                print(f"{state} {kind} {args.id}: version {version}")
            else:
                print(f"{kind} {args.id} was already {state} (version {version}); nothing changed")
            return 0

        return run

    async def listing(config: StackConfig, args: argparse.Namespace) -> int:
        rpc = f"List{noun}s"
        message = build(rpc, page_size=args.limit, page_token=args.page_token)
        print_reply(await _call(config, rpc, message), as_json=args.json)
        return 0

    async def show(config: StackConfig, args: argparse.Namespace) -> int:
        rpc = f"Get{noun}"
        fields = {id_field: args.id, "version": args.version}
        reply: Any = await _call(config, rpc, build(rpc, **fields))
        if args.json:
            print_reply(reply, as_json=True)
        else:
            _print_document(reply, kind, reply.latest_version)
        return 0

    return {
        "create": create,
        "update": update,
        "disable": set_enabled(False),
        "enable": set_enabled(True),
        "list": listing,
        "show": show,
    }


async def _listed(config: StackConfig, args: argparse.Namespace, rpc: str, **fields: Any) -> int:
    """One page of a filtered listing; a refused filter is printed again with a caret."""
    request = getattr(pb, f"{rpc}Request")(
        filter_expression=args.filter, page_size=args.limit, page_token=args.page_token, **fields
    )
    try:
        reply = await _call(config, rpc, request)
    except grpc.RpcError as error:
        print(describe_rpc_error(error), file=sys.stderr)
        for line in filter_pointer(args.filter, error.details() or ""):
            print(line, file=sys.stderr)
        return 1
    print_reply(reply, as_json=args.json)
    return 0


async def cmd_alerts(config: StackConfig, args: argparse.Namespace) -> int:
    return await _listed(config, args, "ListAlerts", rule_id=args.rule)


async def cmd_results(config: StackConfig, args: argparse.Namespace) -> int:
    window_id = "" if args.id == "-" else args.id
    return await _listed(config, args, "ListWindowResults", window_id=window_id)


async def cmd_late_events(config: StackConfig, args: argparse.Namespace) -> int:
    return await _listed(config, args, "ListLateEvents")


def _guarded(handler: Handler) -> Handler:
    async def run(config: StackConfig, args: argparse.Namespace) -> int:
        try:
            return await handler(config, args)
        except SchemaFileError as error:
            print(error, file=sys.stderr)
            return 2

    return run


def _with_json(parser: argparse.ArgumentParser, handler: Handler) -> argparse.ArgumentParser:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the whole reply as JSON, every field included (for scripts)",
    )
    parser.set_defaults(handler=_guarded(handler))
    return parser


def _paged(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit",
        type=page_size_option,
        default=100,
        help="at most this many; above 1000 is lowered to 1000",
    )
    parser.add_argument(
        "--page-token", default="", help="next_page_token of the previous page (see --json)"
    )


def _filter_argument(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "filter",
        nargs="?",
        default="",
        help=f"an AIP-160 filter (README \"Alerts, window results and late events\"), e.g. '{example}'",
    )


def add_rule_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    helps = {
        "rule": "pattern rules (threshold, rate, sequence, absence) of your tenant",
        "window": "windows with aggregates (tumbling, hopping, session) of your tenant",
    }
    for kind, help_text in helps.items():
        group = commands.add_parser(kind, help=help_text)
        sub = group.add_subparsers(dest=f"{kind}_cmd", required=True)
        handlers = _commands(kind)
        create = _with_json(
            sub.add_parser("create", help=f"store version 1 of a new {kind} (role rule-admin)"),
            handlers["create"],
        )
        create.add_argument(
            "file", help=f"the {kind} as a YAML or JSON file, with its id; - for stdin"
        )
        update = _with_json(
            sub.add_parser("update", help=f"store the next version of a {kind}"),
            handlers["update"],
        )
        update.add_argument("id")
        update.add_argument("file", help="the new document (YAML or JSON); - for stdin")
        for name, what in (
            ("disable", f"stop running a {kind}"),
            ("enable", f"run a {kind} again"),
        ):
            toggle = _with_json(
                sub.add_parser(name, help=f"{what} (a new version)"), handlers[name]
            )
            toggle.add_argument("id")
        listing = _with_json(
            sub.add_parser("list", help=f"the latest version of each {kind}"), handlers["list"]
        )
        _paged(listing)
        show = _with_json(
            sub.add_parser("show", help=f"print a {kind}'s document (the latest version)"),
            handlers["show"],
        )
        show.add_argument("id")
        show.add_argument("--version", type=int, default=0, help="this version, not the latest")
    results = _with_json(
        sub.add_parser("results", help="a window's results, by window start"), cmd_results
    )
    results.add_argument("id", help="the window id; - for every window's")
    _filter_argument(results, 'group = "eu" AND revision = 0 AND values.orders > 10')
    _paged(results)
    alerts = _with_json(
        commands.add_parser("alerts", help="your tenant's alerts, newest first"), cmd_alerts
    )
    _filter_argument(alerts, 'rule_version >= 2 AND key = "sensor-1"')
    alerts.add_argument("--rule", default="", help="only this rule's alerts")
    _paged(alerts)
    late = _with_json(
        commands.add_parser(
            "late-events",
            help="events a window or rule did not count (too late), newest first",
        ),
        cmd_late_events,
    )
    _filter_argument(late, 'source = "window" AND definition_id = "orders-per-minute"')
    _paged(late)
