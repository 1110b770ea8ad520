"""The fault tests' own Redis and PostgreSQL servers, so they can be killed and restarted.

Each runs from a private temporary directory on a free loopback port, is started and stopped by
PID (a Popen for redis-server; `pg_ctl` with the cluster's own postmaster.pid for PostgreSQL),
and is removed with its directory afterwards. Nothing here touches a server someone else runs.

Redis runs with `--appendonly yes --appendfsync always`: every write is fsynced before Redis
replies, so an event ingest acknowledged is on disk before the acknowledgement, whatever kills
Redis. (`everysec` would also survive the process kills done here, because Redis write()s the
AOF buffer to the kernel before it answers; what it can lose, up to about a second, is only lost
to a power or kernel failure, which a test cannot cause. `always` makes the test's claim hold
without relying on that detail.)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.exceptions import RedisError

__all__ = ["PostgresCluster", "RedisServer", "find_postgres_bin", "free_port"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A redis-server of the test's own, with AOF, restartable on the same port and directory."""

    def __init__(self, directory: Path, *, port: int | None = None, fsync: str = "always") -> None:
        self.directory = directory
        self.port = port or free_port()
        self.fsync = fsync
        self._process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """Start (replaying the AOF left in the directory) and wait until it answers PING."""
        if self.running():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not on PATH")
        # Output goes to the log file Redis opens itself; nothing is piped to us.
        self._process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                self.fsync,
                "--save",
                "",
                "--protected-mode",
                "no",
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"redis-server not ready after {timeout}s: {self.log_tail()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())  # LOADING (AOF replay) raises: not ready yet
        except (RedisError, OSError):
            return False
        finally:
            client.close()

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Signal our redis-server (by PID) and wait for it; SIGKILL if it outlives `timeout`."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self._process = None

    def wipe(self) -> None:
        """Delete the data (AOF, RDB) of a stopped server, keeping its log."""
        if self.running():
            raise RuntimeError("stop redis-server before wiping its data")
        for path in self.directory.iterdir():
            if path.name == "redis.log":
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = (self.directory / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def find_postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb, pg_ctl and postgres."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: [int(p) if p.isdigit() else 0 for p in Path(path).parent.name.split(".")],
    )
    for directory in reversed(candidates):
        path = Path(directory)
        if all((path / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return path
    return None


class PostgresCluster:
    """A throw-away cluster: initdb into a temporary directory, trust auth, loopback only.

    PostgreSQL refuses to run as root, so under root the cluster belongs to the `postgres`
    system user and its tools run as that user (the directory is created for it).
    """

    def __init__(self, bin_dir: Path, *, port: int | None = None) -> None:
        self.bin_dir = bin_dir
        self.port = port or free_port()
        self._user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError as error:
                raise RuntimeError("running as root and there is no `postgres` user") from error
            self._user = "postgres"
        # Not under pytest's tmp folder: that one is private to root (0700).
        self.directory = Path(tempfile.mkdtemp(prefix="streammesh-faults-pg-"))
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.stops = 0

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        runuser = shutil.which("runuser")
        user = self._user
        if user is not None and runuser is not None:
            # Through runuser rather than subprocess's user=, which forks instead of vforking
            # and so runs gRPC's fork handlers in a process full of gRPC threads.
            command, user = [runuser, "-u", user, "--", *command], None
        result = subprocess.run(
            command,
            user=user,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.directory,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{args[0]} {' '.join(args[1:3])} failed ({result.returncode}): "
                f"{result.stderr.strip()} {result.stdout.strip()} {self.log_tail()}"
            )

    def init(self) -> None:
        # --no-sync: a crash during set-up only means a new cluster; the server itself syncs.
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--no-sync", "--no-instructions",
        )  # fmt: skip

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.directory} -c max_connections=200"
        )
        self._run(
            "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
            "-o", options,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop` of this cluster (it signals the PID in our data directory only).
        `immediate` is a crash: no checkpoint, recovery from the WAL at the next start."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "30")
        self.stops += 1

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def remove(self) -> None:
        """Stop if still running (our postmaster.pid only), then delete the directory."""
        if self.running():
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
                    os.kill(pid, signal.SIGKILL)
                    time.sleep(0.5)
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
