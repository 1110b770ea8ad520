"""`streammesh ... | head -1`: a reader that leaves early ends the CLI quietly, status 141."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streammesh.cli.main import EXIT_BROKEN_PIPE
from tests.environment import clean_environ


def run_into_closed_pipe(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the CLI with stdout a pipe whose reader has already gone, as `| head -1` leaves it
    once head has its line (deterministic: every write fails with EPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "streammesh.cli.main", *args],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
    finally:
        os.close(write_end)


def test_closed_stdout_exits_quietly_with_141(tmp_path: Path) -> None:
    env = clean_environ() | {"STREAMMESH_STATE_DIR": str(tmp_path)}
    result = run_into_closed_pipe(["status"], env)
    assert (result.returncode, result.stderr) == (EXIT_BROKEN_PIPE, "")


@pytest.mark.parametrize("args", [["--help"], ["admin", "users", "--help"]])
def test_help_into_a_closed_pipe_is_quiet(args: list[str], tmp_path: Path) -> None:
    # argparse itself ignores a failed write of its help text and exits 0.
    env = clean_environ() | {"STREAMMESH_STATE_DIR": str(tmp_path)}
    result = run_into_closed_pipe(args, env)
    assert (result.returncode, result.stderr) == (0, "")
