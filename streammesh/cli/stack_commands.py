"""`streammesh up`, `status` and `down`: the stack's processes, every replica of each service.

streammesh up [--replicas gateway=2,storage=3,...]   start what does not run, wait for SERVING
streammesh status [--window S] [--watch [S]] [--json] every replica: pid, port, health, and
                                                     req/s, errors, p99, partitions, lag from /metrics
streammesh down [--grace S]                          drain and stop what `up` started
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from streammesh.cli.replicas import MAX_REPLICAS, parse_replicas
from streammesh.cli.stack import (
    ServiceState,
    StackConfig,
    StartError,
    bring_up,
    shut_down,
    write_stack_file,
)
from streammesh.cli.status_view import run_status

__all__ = ["add_stack_commands", "print_states", "replicas_type"]


def print_states(config: StackConfig, states: list[ServiceState]) -> None:
    """One line per process: the replica's label, pid, port, health of its service, address."""
    print(f"{'replica':<14} {'pid':>8} {'port':>6}  {'health':<12} endpoint")
    for state in states:
        print(
            f"{state.name:<14} {state.pid or '-':>8} {state.port:>6}  {state.health:<12} "
            f"{state.address}"
        )
    print(f"state folder: {config.state_dir}  (logs in {config.state_dir / 'logs'})")


def replicas_type(spec: str) -> dict[str, int]:
    """argparse type of --replicas: a clear usage error for a bad spec."""
    try:
        return parse_replicas(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cmd_up(config: StackConfig, args: argparse.Namespace) -> int:
    try:
        states = asyncio.run(bring_up(config, replicas=args.replicas, timeout=args.timeout))
    except StartError as error:
        print(f"streammesh up failed: {error}", file=sys.stderr)
        return 1
    write_stack_file(config)
    print_states(config, states)
    gateways = [s.address for s in states if s.service == "gateway"]
    print(f"public endpoint: {', '.join(gateways)} (TLS, CA {config.pki_dir / 'ca.pem'})")
    return 0


def cmd_status(config: StackConfig, args: argparse.Namespace) -> int:
    try:
        return asyncio.run(
            run_status(config, window=args.window, watch=args.watch, as_json=args.json)
        )
    except KeyboardInterrupt:
        return 0


def _seconds(text: str) -> float:
    """argparse type of --window/--watch: a positive number of seconds, at most an hour."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be 0.1 to 3600 seconds: {text}")
    return value


def cmd_down(config: StackConfig, args: argparse.Namespace) -> int:
    for name, outcome in shut_down(config, grace=args.grace).items():
        print(f"{name:<14} {outcome}")
    return 0


def add_stack_commands(commands: Any) -> None:
    """Add `up`, `status` and `down` to the CLI's subcommands."""
    up = commands.add_parser("up", help="start the stack as local processes")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for SERVING")
    up.add_argument(
        "--replicas",
        type=replicas_type,
        default=None,
        metavar="SERVICE=N,...",
        help=f"processes per service (1 to {MAX_REPLICAS}; 1 for a service not named; default: "
        "what runs already, else 1 each), e.g. gateway=2,ingest=2,processor=3,storage=2,auth=2",
    )
    up.set_defaults(handler=cmd_up)

    status = commands.add_parser(
        "status", help="every replica: health, request rate, errors, p99, partitions, lag"
    )
    status.add_argument(
        "--window", type=_seconds, default=1.0, help="seconds between the two metric scrapes"
    )
    status.add_argument(
        "--watch",
        type=_seconds,
        nargs="?",
        const=2.0,
        default=None,
        metavar="S",
        help="print again every S seconds (default 2) until Ctrl-C",
    )
    status.add_argument("--json", action="store_true", help="one JSON object per replica")
    status.set_defaults(handler=cmd_status)

    down = commands.add_parser("down", help="drain and stop the stack")
    down.add_argument("--grace", type=float, default=15.0, help="seconds before SIGKILL")
    down.set_defaults(handler=cmd_down)
