"""Account commands for people: `user create`, `mfa enroll`, `login`, `logout`, `whoami`.

Passwords are read without echo from the terminal, or one line from stdin with
`--password-stdin` for scripts. Nothing secret is printed except what the person must keep
(the TOTP secret during enrolment and the recovery codes, once).
"""

from __future__ import annotations

import argparse
import getpass
import io
import sys
from pathlib import Path

import segno

from streammesh.cli.session import NotLoggedIn, Session, gateway_client, logged_in_client
from streammesh.cli.stack import StackConfig

__all__ = ["add_account_commands", "read_password"]


def read_password(args: argparse.Namespace, *, confirm: bool = False) -> str:
    if getattr(args, "password_stdin", False):
        return sys.stdin.readline().rstrip("\n")
    password = getpass.getpass("password: ")
    if confirm and getpass.getpass("repeat password: ") != password:
        raise SystemExit("passwords differ")
    return password


def _read_code(prompt: str, instead: str) -> str:
    """One code from the prompt: the terminal, or the next line of stdin after the password.

    A stdin that has ended (`--password-stdin` fed one line) leaves nothing to read: say so
    and what to pass `instead`, rather than end in an EOFError traceback.
    """
    try:
        return input(prompt).strip().replace(" ", "")
    except EOFError:
        raise SystemExit(f"\nno code to read: stdin ended; pass {instead}") from None


def terminal_qr(uri: str) -> str:
    """The otpauth URI as a QR code drawn with block characters, for scanning off the screen."""
    out = io.StringIO()
    segno.make(uri, error="m").terminal(out=out, compact=True)
    return out.getvalue()


async def cmd_user_create(config: StackConfig, args: argparse.Namespace) -> int:
    password = read_password(args, confirm=True)
    async with gateway_client(config) as client:
        user_id = await client.register(args.username, password)
    print(f"created {args.username} ({user_id}); next: streammesh mfa enroll {args.username}")
    return 0


async def cmd_mfa_enroll(config: StackConfig, args: argparse.Namespace) -> int:
    password = read_password(args)
    async with gateway_client(config) as client:
        enrolment = await client.begin_totp(args.username, password, tenant=args.tenant)
        print("Scan this with an authenticator app (or enter the secret by hand):\n")
        print(terminal_qr(enrolment.otpauth_uri))
        print(f"secret: {enrolment.secret}")
        if args.png:
            segno.make(enrolment.otpauth_uri, error="m").save(str(args.png), scale=8)
            args.png.chmod(0o600)
            print(f"QR code saved to {args.png} (it holds the secret: delete it after scanning)")
        code = args.code or _read_code("first code from the app: ", "--code CODE")
        recovery_codes = await client.confirm_totp(
            args.username, password, code, tenant=args.tenant
        )
    print("\nTOTP is on. Recovery codes (each works once; store them somewhere safe):")
    for recovery_code in recovery_codes:
        print(f"  {recovery_code}")
    return 0


async def cmd_login(config: StackConfig, args: argparse.Namespace) -> int:
    password = read_password(args)
    async with gateway_client(config) as client:
        challenge = await client.start_login(args.username, password, tenant=args.tenant)
        if args.recovery_code:
            tokens = await client.complete_login(challenge, recovery_code=args.recovery_code)
        else:
            code = args.code or _read_code(
                "code from your authenticator: ", "--code CODE or --recovery-code CODE"
            )
            tokens = await client.complete_login(challenge, totp_code=code)
    Session.from_tokens(args.username, tokens).save(config)
    print(
        f"logged in as {args.username} in tenant {tokens.tenant or 'default'}"
        f" (roles: {', '.join(tokens.roles) or 'none'})"
    )
    return 0


async def cmd_logout(config: StackConfig, args: argparse.Namespace) -> int:
    try:
        session = Session.load(config)
    except NotLoggedIn:
        print("not logged in")
        return 0
    async with gateway_client(config) as client:
        client.refresh_token = session.refresh_token
        await client.logout()
    Session.forget(config)
    print(f"logged out {session.username}")
    return 0


async def cmd_whoami(config: StackConfig, args: argparse.Namespace) -> int:
    async with logged_in_client(config):
        session = Session.load(config)
    print(
        f"{session.username} in tenant {session.tenant}"
        f" (roles: {', '.join(session.roles) or 'none'})"
    )
    return 0


def add_account_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def password_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--password-stdin", action="store_true", help="read the password from stdin"
        )

    def tenant_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--tenant", default="", help='the account\'s tenant (default: "default")'
        )

    user = commands.add_parser("user", help="accounts").add_subparsers(
        dest="user_cmd", required=True
    )
    create = user.add_parser(
        "create", help="sign up a new user (no roles until an admin grants them)"
    )
    create.add_argument("username")
    password_option(create)
    create.set_defaults(handler=cmd_user_create)

    mfa = commands.add_parser("mfa", help="second factor").add_subparsers(
        dest="mfa_cmd", required=True
    )
    enroll = mfa.add_parser("enroll", help="enrol TOTP: QR code, first code, recovery codes")
    enroll.add_argument("username")
    enroll.add_argument("--png", type=Path, help="also save the QR code as a PNG file")
    enroll.add_argument("--code", help="the first code (otherwise prompted)")
    password_option(enroll)
    tenant_option(enroll)
    enroll.set_defaults(handler=cmd_mfa_enroll)

    login = commands.add_parser("login", help="log in (password + TOTP or recovery code)")
    login.add_argument("username")
    login.add_argument("--code", help="TOTP code (otherwise prompted)")
    login.add_argument("--recovery-code", help="use a recovery code instead of TOTP")
    password_option(login)
    tenant_option(login)
    login.set_defaults(handler=cmd_login)

    commands.add_parser("logout", help="end the saved session").set_defaults(handler=cmd_logout)
    commands.add_parser("whoami", help="show the saved session").set_defaults(handler=cmd_whoami)
