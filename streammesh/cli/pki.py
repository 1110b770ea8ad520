"""`streammesh pki`: the dev PKI, made and rotated while the stack runs.

streammesh pki init [--force]         make the CA, service and admin certificates
streammesh pki rotate                 re-issue every leaf certificate (services, admin)
streammesh pki rotate --ca            a new CA trusted beside the old, then every leaf under it
streammesh pki rotate --ca --finish   drop the old CA once every service took its new leaf
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time

from streammesh.cli.stack import StackConfig, prepare_state
from streammesh.mesh.channel_reload import READY_TIMEOUT_SECONDS
from streammesh.mesh.pki import CA_FILE
from streammesh.mesh.pki_rotation import (
    CaRotationError,
    begin_ca_rotation,
    finish_ca_rotation,
    leaf_names,
    rotate_leaves,
)

__all__ = ["add_pki_commands", "settle_seconds"]


def settle_seconds(config: StackConfig) -> float:
    """How long every running service needs to take up changed files: its mesh clients'
    poll interval plus the time new channels get to connect (servers take them at once)."""
    return config.tls_reload_seconds + READY_TIMEOUT_SECONDS + 1.0


def cmd_pki_init(config: StackConfig, args: argparse.Namespace) -> int:
    written = prepare_state(config, force_pki=args.force)
    if written:
        print(f"wrote {', '.join(written)} in {config.state_dir}")
    else:
        print(f"PKI already present in {config.pki_dir} (use --force to replace it)")
    return 0


def _wait(seconds: float, why: str) -> None:
    if seconds > 0:
        print(f"waiting {seconds:.1f}s {why}", flush=True)
        time.sleep(seconds)


def _rotate_leaves(config: StackConfig) -> None:
    lifetime = dt.timedelta(seconds=config.leaf_lifetime_seconds)
    for leaf in rotate_leaves(config.pki_dir, lifetime=lifetime):
        print(
            f"{leaf.name}.pem: serial {leaf.serial:x}, valid until "
            f"{leaf.not_after:%Y-%m-%dT%H:%M:%SZ}"
        )


def _newest_leaf_age(config: StackConfig) -> float:
    mtimes = [
        (config.pki_dir / f"{name}.pem").stat().st_mtime for name in leaf_names(config.pki_dir)
    ]
    return time.time() - max(mtimes, default=0.0)


def cmd_pki_rotate(config: StackConfig, args: argparse.Namespace) -> int:
    if not (config.pki_dir / CA_FILE).exists():
        print(f"no PKI in {config.pki_dir}; run `streammesh pki init`", file=sys.stderr)
        return 1
    if args.finish and not args.ca:
        print("--finish ends a CA rotation: `streammesh pki rotate --ca --finish`", file=sys.stderr)
        return 1
    settle = settle_seconds(config) if args.wait is None else args.wait
    try:
        if args.finish:
            # A service still presenting its old leaf must have taken the new one before the
            # old CA stops being trusted: new connections would be refused.
            _wait(settle - _newest_leaf_age(config), "for every service to take its new leaf")
            cert = finish_ca_rotation(config.pki_dir)
            print(f"{CA_FILE} now holds only the new CA (serial {cert.serial_number:x})")
            return 0
        if args.ca:
            cert = begin_ca_rotation(config.pki_dir, trust_domain=config.trust_domain)
            print(f"new CA (serial {cert.serial_number:x}); {CA_FILE} holds the old and the new")
            _wait(settle, "for every service to trust the new CA")
        _rotate_leaves(config)
    except CaRotationError as error:
        print(error, file=sys.stderr)
        return 1
    if args.ca:
        print("then, to drop the old CA: streammesh pki rotate --ca --finish")
    return 0


def add_pki_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pki = commands.add_parser("pki", help="dev PKI").add_subparsers(
        dest="pki_command", required=True
    )
    init = pki.add_parser("init", help="create the CA, service and admin certificates")
    init.add_argument("--force", action="store_true", help="replace an existing PKI")
    init.set_defaults(handler=cmd_pki_init)
    rotate = pki.add_parser(
        "rotate",
        help="re-issue every leaf certificate while the stack runs (services take them without "
        "a restart)",
    )
    rotate.add_argument(
        "--ca",
        action="store_true",
        help="first make a new CA, trusted beside the old one, and issue the leaves under it",
    )
    rotate.add_argument(
        "--finish",
        action="store_true",
        help="with --ca: drop the old CA (refused while a leaf still chains to it)",
    )
    rotate.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long services get to take up each step (default: STREAMMESH_TLS_RELOAD_SECONDS "
        f"+ {READY_TIMEOUT_SECONDS + 1:.0f}s; 0 when the stack is down)",
    )
    rotate.set_defaults(handler=cmd_pki_rotate)
