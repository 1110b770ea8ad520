"""Run one service as a real process (`python -m services.<name>`) until it exits, in an
environment of the test's own: none of the caller's STREAMMESH_* variables leak in."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Exited", "run_until_exit"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Exited:
    """How a service process ended: its status and everything it wrote (stdout and stderr)."""

    status: int
    output: str

    def critical_lines(self) -> list[str]:
        """The messages of the CRITICAL records of its JSON log lines."""
        messages = []
        for line in self.output.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("level") == "CRITICAL":
                    messages.append(str(record["msg"]))
        return messages


async def run_until_exit(service: str, env: dict[str, str], *, timeout: float = 90) -> Exited:
    """Start `service` with `env` added to a clean environment; wait (at most `timeout`) for
    it to exit. A process still running then is killed and the test fails."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMMESH_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        f"services.{service}",
        env={**clean, **env},
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"{service} was still running after {timeout:.0f}s")
    assert process.returncode is not None
    return Exited(process.returncode, output.decode(errors="replace"))
