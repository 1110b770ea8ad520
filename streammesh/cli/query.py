"""`streammesh query` and `streammesh aggregate`: the query API through the gateway, with the
saved session (role analyst).

    streammesh query 'payload.amount > 10 AND attributes.region = "eu"'
    streammesh query 'type:"order.*"' --key k1 --key k2 --since 2026-01-01T00:00:00Z --all
    streammesh query --page-size 50 --page-token <next_page_token> 'payload.amount > 10'
    streammesh query --count 'payload.paid = true'
    streammesh aggregate --by key --field payload.amount --since 2026-01-01T00:00:00Z

The filter is AIP-160 (README "Querying events"); a filter the service refuses is printed again
with a caret under the column it names. Without --all one page is printed and the next page's
token goes to stderr; --all follows the pages (up to --max-events), waiting up to --settle-wait
seconds on pages that come back empty with a token (the newest events are not settled while a
write that started before them is in flight). Every command takes --json.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.cli.errors import describe_rpc_error
from streammesh.cli.output import print_reply
from streammesh.cli.paging import page_size_option
from streammesh.cli.session import with_session
from streammesh.cli.stack import StackConfig
from streammesh.client import GatewayClient, SettlingWait

__all__ = ["add_query_commands", "add_selection_options", "event_filter", "filter_pointer"]

_GROUP_BY = {
    "none": event_pb2.AGGREGATE_GROUP_BY_UNSPECIFIED,
    "key": event_pb2.AGGREGATE_GROUP_BY_KEY,
    "type": event_pb2.AGGREGATE_GROUP_BY_TYPE,
}
_COLUMN = re.compile(r"at column (\d+)")


class _UsageError(ValueError):
    """A command-line value the CLI refuses before calling (exit status 2)."""


def filter_pointer(expression: str, message: str) -> list[str]:
    """The filter and a caret under the column a refusal names ("... at column 17"), or
    nothing when the message names no column."""
    match = _COLUMN.search(message)
    if match is None or not expression:
        return []
    column = min(int(match[1]), len(expression) + 1)
    return [f"  {expression}", f"  {' ' * (column - 1)}^"]


def _instant(text: str, option: str) -> Timestamp:
    stamp = Timestamp()
    try:
        stamp.FromJsonString(text)
    except ValueError:
        raise _UsageError(
            f"{option}: {text!r} is not an RFC 3339 time, such as 2026-01-31T12:00:00Z"
        ) from None
    return stamp


def event_filter(args: argparse.Namespace) -> event_pb2.EventFilter:
    """The EventFilter of the --key, --type, --since and --until options."""
    selected = event_pb2.EventFilter(keys=args.key, types=args.type)
    if args.since:
        selected.start_time.CopyFrom(_instant(args.since, "--since"))
    if args.until:
        selected.end_time.CopyFrom(_instant(args.until, "--until"))
    return selected


async def _query(client: GatewayClient, args: argparse.Namespace) -> Any:
    selected = event_filter(args)
    if args.count:
        count = await client.count(selected, filter_expression=args.filter)
        return gateway_pb2.CountEventsResponse(count=count)
    page = await client.query(
        selected,
        page_size=args.page_size,
        page_token=args.page_token,
        filter_expression=args.filter,
    )
    if not args.all:
        return page
    # Follow the pages into one reply (one table, one JSON document), up to --max-events,
    # waiting a little on empty pages (events not settled yet); past that wait the reply keeps
    # the token, which is printed for --page-token.
    wait, following = SettlingWait(budget=args.settle_wait), page
    while len(page.events) < args.max_events and await wait.next(following):
        following = await client.query(
            selected,
            page_size=args.page_size,
            page_token=following.next_page_token,
            filter_expression=args.filter,
        )
        page.events.extend(following.events)
        page.next_page_token = following.next_page_token
    if wait.gave_up:
        print(
            f"the newest events did not settle within {args.settle_wait:g} s (a write is still"
            " in flight); continue later with --page-token",
            file=sys.stderr,
        )
    return page


async def _aggregate(client: GatewayClient, args: argparse.Namespace) -> Any:
    return await client.aggregate(
        gateway_pb2.AggregateEventsRequest(
            filter=event_filter(args),
            filter_expression=args.filter,
            group_by=_GROUP_BY[args.by],
            field=args.field,
            max_groups=args.max_groups,
        )
    )


def _run(call: Any) -> Any:
    async def handler(config: StackConfig, args: argparse.Namespace) -> int:
        try:
            reply = await with_session(config, lambda client: call(client, args))
        except _UsageError as error:
            print(error, file=sys.stderr)
            return 2
        except grpc.RpcError as error:
            print(describe_rpc_error(error), file=sys.stderr)
            for line in filter_pointer(args.filter, error.details() or ""):
                print(line, file=sys.stderr)
            return 1
        print_reply(reply, as_json=args.json)
        return 0

    return handler


def add_selection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "filter",
        nargs="?",
        default="",
        help="an AIP-160 filter, e.g. 'payload.amount > 10 AND type:\"order.*\"' (quote it)",
    )
    parser.add_argument("--key", action="append", default=[], help="only this key (repeatable)")
    parser.add_argument("--type", action="append", default=[], help="only this type (repeatable)")
    parser.add_argument("--since", default="", help="event_time at or after (RFC 3339)")
    parser.add_argument("--until", default="", help="event_time before (RFC 3339)")
    parser.add_argument(
        "--json", action="store_true", help="print the whole reply as JSON (for scripts)"
    )


def add_query_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`streammesh query` and `streammesh aggregate`."""
    query = commands.add_parser("query", help="stored events of your tenant, filtered")
    add_selection_options(query)
    query.add_argument(
        "--page-size",
        type=page_size_option,
        default=100,
        help="events a page (default 100); above 1000 is lowered to 1000",
    )
    query.add_argument(
        "--page-token", default="", help="continue after a page (its next_page_token)"
    )
    query.add_argument("--all", action="store_true", help="follow the pages to the end")
    query.add_argument(
        "--max-events", type=int, default=10_000, help="with --all, stop after about this many"
    )
    query.add_argument(
        "--settle-wait",
        type=float,
        default=10.0,
        help="with --all, seconds to wait in a row on empty pages (events not settled yet)",
    )
    query.add_argument("--count", action="store_true", help="only count the matching events")
    query.set_defaults(handler=_run(_query))

    aggregate = commands.add_parser(
        "aggregate", help="count, sum, min, max, avg of a payload field per key or type"
    )
    add_selection_options(aggregate)
    aggregate.add_argument("--by", choices=sorted(_GROUP_BY), default="none", help="group by")
    aggregate.add_argument(
        "--field", default="", help="a numeric payload field, e.g. payload.amount"
    )
    aggregate.add_argument(
        "--max-groups", type=int, default=0, help="groups at most (default 100, up to 1000)"
    )
    aggregate.set_defaults(handler=_run(_aggregate))
