"""`streammesh tail`: follow your tenant's matching events live through the gateway's
SubscribeEvents (role analyst), with the saved session.

    streammesh tail 'payload.amount > 10' --key k1
    streammesh tail --from-now --json > events.jsonl
    streammesh tail --resume <resume_token> 'payload.amount > 10'
    streammesh tail --alerts [--rule hot-sensor]          # alerts, in record order
    streammesh tail --windows [--window orders-per-minute]  # window results, in record order


First the matching events already stored (none with --from-now), a line when the tail is
current, then each event as it is stored, and a rate line on stderr every --rate-every seconds.
On exit (Ctrl-C, --max-events reached) the last resume token goes to stderr: pass it to --resume
with the same filter to continue with no event missed or repeated. An UNAVAILABLE stream (a
gateway or storage replica going away) is resumed from that token on its own, a few times in a
row at most. --json prints every message (heartbeats included) as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from streammesh.api.gateway.v1 import gateway_pb2, rules_pb2
from streammesh.cli.errors import describe_rpc_error
from streammesh.cli.output import print_reply, reply_to_dict
from streammesh.cli.query import add_selection_options, event_filter, filter_pointer
from streammesh.cli.session import with_session
from streammesh.cli.stack import StackConfig
from streammesh.client import GatewayClient

__all__ = ["add_tail_command"]

Subscribed = (
    gateway_pb2.SubscribeEventsResponse
    | rules_pb2.SubscribeAlertsResponse
    | rules_pb2.SubscribeWindowResultsResponse
)
"""A message of any of the subscriptions (they share resume_token and current)."""
_RESUMES_IN_A_ROW = 5
"""UNAVAILABLE endings resumed without a message received in between, at most."""


class _Follower:
    """Prints one subscription's messages and keeps its last resume token."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.what = "alerts" if args.alerts else "window_results" if args.windows else "events"
        """The field of the messages that holds the items followed."""
        self.token: str = args.resume
        self.events = 0
        self._rate_count, self._rate_since = 0, time.monotonic()

    def show(self, message: Subscribed) -> None:
        items: Any = getattr(message, self.what)
        self.token = message.resume_token or self.token
        self.events += len(items)
        self._rate_count += len(items)
        if self.args.json:
            print(json.dumps(reply_to_dict(message), separators=(",", ":")), flush=True)
        else:
            if items and self.args.alerts:
                print_reply(rules_pb2.ListAlertsResponse(alerts=items), as_json=False)
            elif items and self.args.windows:
                reply = rules_pb2.ListWindowResultsResponse(window_results=items)
                print_reply(reply, as_json=False)
            elif items:
                print_reply(gateway_pb2.QueryEventsResponse(events=items), as_json=False)
            if message.current:
                print("-- current: live from here --", file=sys.stderr, flush=True)
        elapsed = time.monotonic() - self._rate_since
        if not self.args.json and elapsed >= self.args.rate_every:
            rate = self._rate_count / elapsed
            what = self.what.replace("_", " ")
            print(f"-- {rate:.1f} {what}/s, {self.events} in all --", file=sys.stderr, flush=True)
            self._rate_count, self._rate_since = 0, time.monotonic()

    def messages(self, client: GatewayClient) -> AsyncIterator[Subscribed]:
        """The subscription's messages from the last token on."""
        token, at_end = self.token, bool(self.args.from_now and not self.token)
        if self.args.windows:
            request = rules_pb2.SubscribeWindowResultsRequest(
                window_id=self.args.window, resume_token=token, start_at_end=at_end
            )
            return client.subscribe_window_results(request)
        if self.args.alerts:
            alerts = rules_pb2.SubscribeAlertsRequest(
                rule_id=self.args.rule, resume_token=token, start_at_end=at_end
            )
            return client.subscribe_alerts(alerts)
        return client.subscribe(self.request())

    def request(self) -> gateway_pb2.SubscribeEventsRequest:
        return gateway_pb2.SubscribeEventsRequest(
            filter=event_filter(self.args),
            filter_expression=self.args.filter,
            resume_token=self.token,
            start_at_end=self.args.from_now and not self.token,
        )


async def _follow(client: GatewayClient, follower: _Follower) -> None:
    resumes = 0
    while True:
        try:
            async for message in follower.messages(client):
                resumes = 0
                follower.show(message)
                if follower.args.max_events and follower.events >= follower.args.max_events:
                    return
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or resumes >= _RESUMES_IN_A_ROW:
                raise
            resumes += 1
            print(f"-- {describe_rpc_error(error)}; resuming --", file=sys.stderr)
            await asyncio.sleep(min(2**resumes / 4, 5))
        else:
            return  # the server ended the stream (it does not on its own)


async def _tail(config: StackConfig, args: argparse.Namespace) -> int:
    follower = _Follower(args)
    try:
        await with_session(config, lambda client: _follow(client, follower))
    except grpc.RpcError as error:
        print(describe_rpc_error(error), file=sys.stderr)
        for line in filter_pointer(args.filter, error.details() or ""):
            print(line, file=sys.stderr)
        return 1
    finally:  # also on Ctrl-C (the run is cancelled), so the token is never lost
        if follower.token:
            print(f"resume token: {follower.token}", file=sys.stderr)
    return 0


def add_tail_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`streammesh tail`."""
    tail = commands.add_parser("tail", help="follow your tenant's matching events live")
    add_selection_options(tail)
    tail.add_argument("--resume", default="", help="continue after this resume token")
    kind = tail.add_mutually_exclusive_group()
    kind.add_argument(
        "--alerts", action="store_true", help="follow your tenant's alerts instead of events"
    )
    kind.add_argument(
        "--windows",
        action="store_true",
        help="follow your tenant's window results (finals, revisions) instead of events",
    )
    tail.add_argument("--rule", default="", help="with --alerts: only this rule's alerts")
    tail.add_argument("--window", default="", help="with --windows: only this window's results")
    tail.add_argument(
        "--from-now", action="store_true", help="skip the events stored before (no --resume)"
    )
    tail.add_argument(
        "--max-events", type=int, default=0, help="stop after this many events (0: never)"
    )
    tail.add_argument(
        "--rate-every", type=float, default=5.0, help="seconds between rate lines on stderr"
    )
    tail.set_defaults(handler=_tail)
