"""`streammesh`: the operator's command line.

streammesh pki init [--force]   make the dev CA and certificates
streammesh pki rotate [--ca]    re-issue them (or the CA) while the stack runs
streammesh up [--replicas S=N]  start the stack as local processes, wait for SERVING
streammesh status               every replica, with pid, port and health
streammesh down                 drain and stop what `up` started
streammesh demo                 push one real session through the stack
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
from functools import partial

import grpc

from streammesh.cli.accounts import add_account_commands
from streammesh.cli.admin import add_admin_commands, create_user_as_operator
from streammesh.cli.bench import add_bench_command
from streammesh.cli.demo import run_demo
from streammesh.cli.errors import describe_rpc_error
from streammesh.cli.pki import add_pki_commands
from streammesh.cli.query import add_query_commands
from streammesh.cli.report import add_report_command
from streammesh.cli.rules import add_rule_commands
from streammesh.cli.schemas import add_schema_commands
from streammesh.cli.session import NotLoggedIn
from streammesh.cli.stack import (
    StackConfig,
    StartError,
    bring_up,
    shut_down,
    stack_status,
)
from streammesh.cli.stack_commands import add_stack_commands
from streammesh.cli.tail import add_tail_command
from streammesh.cli.tenants import add_tenant_commands
from streammesh.client import GatewayClient

__all__ = ["main"]


async def _demo(config: StackConfig, args: argparse.Namespace) -> int:
    states = await stack_status(config)
    started_here = not all(s.health == "SERVING" for s in states)
    if started_here:
        print("no running stack found; bringing one up for the demo")
        await bring_up(config)
    try:
        async with GatewayClient(config.address("gateway"), config.pki_dir / "ca.pem") as client:
            report = await run_demo(
                client,
                create_user=partial(create_user_as_operator, config),
                events=args.events,
                batch_size=args.batch_size,
            )
    except grpc.aio.AioRpcError as error:
        print(f"demo failed: {describe_rpc_error(error)}", file=sys.stderr)
        return 1
    finally:
        if started_here and not args.keep_up:
            print("stopping the stack the demo started (use --keep-up to keep it)")
            shut_down(config)
    print("\n".join(report.lines()))
    return 0 if report.order_kept else 1


def cmd_demo(config: StackConfig, args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_demo(config, args))
    except (StartError, RuntimeError) as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streammesh", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    add_pki_commands(commands)
    add_stack_commands(commands)

    demo = commands.add_parser("demo", help="push one real session through the stack")
    demo.add_argument("--events", type=int, default=5000)
    demo.add_argument("--batch-size", type=int, default=500)
    demo.add_argument(
        "--keep-up", action="store_true", help="leave a stack the demo started running"
    )
    demo.set_defaults(handler=cmd_demo)

    add_account_commands(commands)
    add_admin_commands(commands)
    add_tenant_commands(commands)
    add_schema_commands(commands)
    add_rule_commands(commands)
    add_query_commands(commands)
    add_tail_command(commands)
    add_bench_command(commands)
    add_report_command(commands)
    return parser


EXIT_BROKEN_PIPE = 128 + 13
"""What a shell reports for a writer that SIGPIPE ended (`cat big | head -1`): the reader left
before all was written. Standard tools end that way; a script under `set -o pipefail` sees the
same status from us as from them, and no status pretends the whole listing was written."""


def main(argv: list[str] | None = None) -> int:
    """Run one command; refusals print their status with every detail, exit status 1."""
    try:
        try:
            code = _run(argv)
        finally:
            # Flush here, inside the try: a pipe closed by the reader (`| head -1`) fails at
            # the flush, which would otherwise happen at interpreter exit, with a traceback.
            # In `finally` so that argparse's output before its SystemExit (--help) is covered.
            sys.stdout.flush()
    except BrokenPipeError:
        # The recipe of the Python docs (signal module, "Note on SIGPIPE"): point stdout at
        # /dev/null so the interpreter's own final flush cannot fail again, and exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    config = StackConfig()
    try:
        if inspect.iscoroutinefunction(args.handler):
            code: int = asyncio.run(args.handler(config, args))
        else:
            code = args.handler(config, args)
    except grpc.RpcError as error:
        print(describe_rpc_error(error), file=sys.stderr)
        return 1
    except NotLoggedIn as error:
        print(error, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C ends a long-running command (tail) without a traceback
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
