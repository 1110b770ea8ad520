"""Local processes the CLI starts and stops: identity by command line, reaping, ports, signals.

Only PIDs the CLI recorded are ever signalled, and only while their command line is still the
service they were started as (PIDs get reused).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "exited",
    "free_ports",
    "is_our_process",
    "port_is_free",
    "process_alive",
    "reap",
    "stop_processes",
    "tail",
]


def is_our_process(pid: int, name: str) -> bool:
    """True only if `pid` is alive and is still `python -m services.<name>` (PIDs get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"services.{name}".encode() in cmdline


def reap(pid: int) -> None:
    """Collect the exit status if `pid` is our own child (the CLI in a test); else a no-op."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def exited(pid: int, name: str) -> bool:
    """Whether the process `pid`, just started as `name`, has exited. A child of ours is asked
    with waitpid (which also reaps it): its /proc/<pid>/cmdline reads empty for a moment while
    it is still in execve, which `is_our_process` would take for an exit. A process started
    elsewhere (an earlier `up`) is checked by its command line."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not is_our_process(pid, name)
    return done == pid


def port_is_free(host: str, port: int) -> bool:
    """Whether a service could listen on `port`. SO_REUSEADDR, as gRPC servers set it: a
    listener makes the bind fail, while connections in TIME_WAIT left by a process that just
    exited (a restart, `down` then `up`) do not."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(host: str, count: int = 1) -> list[int]:
    """`count` distinct ports free on `host` now. Every probe stays bound until all are chosen,
    so the kernel cannot hand out the same port twice."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as probes:
        ports = []
        for _ in range(count):
            probe = probes.enter_context(socket.socket(family))
            probe.bind((host, 0))
            ports.append(int(probe.getsockname()[1]))
    return ports


def process_alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_processes(pids: Mapping[int, str], grace: float) -> dict[int, bool]:
    """SIGTERM every `pid` (running service `name`) at once, wait up to `grace` for all, then
    SIGKILL the rest; True for each that exited on SIGTERM. All at once, so that replicas of one
    service drain side by side instead of one drain delay after another. SIGCONT follows the
    SIGTERM so that a stopped process (SIGSTOP, a debugger) drains too instead of waiting out
    the grace period."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)
    waiting = dict(pids)
    deadline = time.monotonic() + grace
    while waiting and time.monotonic() < deadline:
        for pid, name in list(waiting.items()):
            reap(pid)
            if not is_our_process(pid, name):  # a zombie has no command line: it has exited
                del waiting[pid]
        if waiting:
            time.sleep(0.05)
    for pid in waiting:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if waiting:
        time.sleep(0.1)
        for pid in waiting:
            reap(pid)
    return {pid: pid not in waiting for pid in pids}


def tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
