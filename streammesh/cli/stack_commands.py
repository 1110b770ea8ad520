"""`streammesh up`, `status` and `down`: the stack's processes, every replica of each service.

streammesh up [--replicas gateway=2,storage=3,...]   start what does not run, wait for SERVING
streammesh status                                    every replica: pid, port, health
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
    stack_status,
    write_stack_file,
)

__all__ = ["add_stack_commands", "print_states"]


def print_states(config: StackConfig, states: list[ServiceState]) -> None:
    """One line per process: the replica's label, pid, port, health of its service, address."""
    print(f"{'replica':<14} {'pid':>8} {'port':>6}  {'health':<12} endpoint")
    for state in states:
        print(
            f"{state.name:<14} {state.pid or '-':>8} {state.port:>6}  {state.health:<12} "
            f"{state.address}"
        )
    print(f"state folder: {config.state_dir}  (logs in {config.state_dir / 'logs'})")


def _replicas(spec: str) -> dict[str, int]:
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
    states = asyncio.run(stack_status(config))
    print_states(config, states)
    return 0 if all(s.health == "SERVING" for s in states) else 1


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
        type=_replicas,
        default=None,
        metavar="SERVICE=N,...",
        help=f"processes per service (1 to {MAX_REPLICAS}; 1 for a service not named; default: "
        "what runs already, else 1 each), e.g. gateway=2,ingest=2,processor=3,storage=2,auth=2",
    )
    up.set_defaults(handler=cmd_up)

    status = commands.add_parser("status", help="show every replica: pid, port, health")
    status.set_defaults(handler=cmd_status)

    down = commands.add_parser("down", help="drain and stop the stack")
    down.add_argument("--grace", type=float, default=15.0, help="seconds before SIGKILL")
    down.set_defaults(handler=cmd_down)
