"""`streammesh report`: the running system's own analysis of itself, measured live.

streammesh report [--window 30] [--load RATE] [--output-dir DIR] [--no-accounts]

It measures the stack over the window (optionally while driving RATE events/s through the gateway
with the saved session), prints the analysis (throughput, latency, clustering, persistence,
security posture, findings ranked by impact), and writes `report.md` and a self-contained
`report.html` with plots into DIR (default: the current folder).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from streammesh.cli.report.accounts import read_accounts
from streammesh.cli.report.analyse import Analysis, analyse
from streammesh.cli.report.load import drive_load
from streammesh.cli.report.observe import observe_window
from streammesh.cli.report.render import to_html, to_markdown, to_text
from streammesh.cli.stack import StackConfig
from streammesh.mesh.policy_file import PolicyFileError, load_policy_file

__all__ = ["add_report_command", "run_report"]


async def run_report(
    config: StackConfig,
    *,
    window: float,
    load_rate: float | None,
    output_dir: Path,
    accounts: bool = True,
) -> tuple[str, int | None]:
    """Measure, analyse, write the files; returns the text and what the load acknowledged."""
    measuring = asyncio.create_task(observe_window(config, window))
    load = None
    if load_rate:
        await asyncio.sleep(0.2)  # the first scrape first
        load = await drive_load(config, load_rate, max(0.5, window - 0.5))
    seen = await measuring
    if accounts:
        seen.users, seen.signing_keys, gap = await read_accounts(config)
        if gap:
            seen.gaps["accounts"] = gap
    else:
        seen.gaps["accounts"] = "not read (--no-accounts)"
    try:
        policy = load_policy_file(None, trust_domain=config.trust_domain)
    except PolicyFileError:
        policy = None
    analysis = analyse(seen, policy)
    if load is not None:
        analysis.sections["throughput"].insert(
            0,
            (
                "load driven by the report",
                f"{load.acknowledged:,} events acknowledged in {load.seconds:.1f} s "
                f"({load.acknowledged / load.seconds:,.0f}/s)",
            ),
        )
    taken = f"{seen.taken_at:%Y-%m-%d %H:%M:%S}Z"
    await asyncio.to_thread(_write, output_dir, analysis, taken, seen.window_seconds)
    return to_text(
        analysis, taken, seen.window_seconds
    ), None if load is None else load.acknowledged


def _write(output_dir: Path, analysis: Analysis, taken: str, window: float) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.md").write_text(to_markdown(analysis, taken, window))
    (output_dir / "report.html").write_text(to_html(analysis, taken, window))


def _window(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be 1 to 3600 seconds: {text}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r}") from None
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"must be 1 to 100000 events/s: {text}")
    return value


def cmd_report(config: StackConfig, args: argparse.Namespace) -> int:
    text, _ = asyncio.run(
        run_report(
            config,
            window=args.window,
            load_rate=args.load,
            output_dir=args.output_dir,
            accounts=not args.no_accounts,
        )
    )
    print(text, end="")
    print(f"written: {args.output_dir / 'report.md'}, {args.output_dir / 'report.html'}")
    return 0


def add_report_command(commands: Any) -> None:
    report = commands.add_parser(
        "report", help="measure the running stack and write its analysis (Markdown and HTML)"
    )
    report.add_argument("--window", type=_window, default=30.0, help="seconds to measure over")
    report.add_argument(
        "--load",
        type=_rate,
        default=None,
        metavar="RATE",
        help="drive RATE events/s through the gateway meanwhile (the saved session needs the "
        "producer role)",
    )
    report.add_argument(
        "--output-dir", type=Path, default=Path("."), help="where report.md and report.html go"
    )
    report.add_argument(
        "--no-accounts", action="store_true", help="skip the account checks (no admin session)"
    )
    report.set_defaults(handler=cmd_report)
