"""The whole stack as local processes: start, watch, stop.

Each service runs as `python -m services.<name>` in its own session (so a terminal's Ctrl-C does not
reach it), logs to `<state>/logs/<name>.log` and is recorded in `<state>/run/<name>.pid`. Stopping
signals only PIDs recorded here whose command line is still that service.

Fault tests and operators can also start one service on its own (`start_service`), with extra
`STREAMMESH_*` variables (a failpoint, a lower limit) or as an extra instance beside the stack's
own (`instance="b"`: its own port, pid file `run/<name>@b.pid` and log `logs/<name>@b.log`), and
signal it (`signal_service`, `stop_service`). `shut_down` stops extra instances too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streammesh.mesh import default_state_dir, init_pki
from streammesh.mesh.client import MeshClient, MeshClientConfig, TlsFiles, parse_targets
from streammesh.mesh.identity import DEFAULT_TRUST_DOMAIN
from streammesh.mesh.settings import write_secret_file

__all__ = [
    "START_ORDER",
    "ServiceState",
    "StackConfig",
    "StartError",
    "bring_up",
    "free_ports",
    "log_file",
    "process_alive",
    "running_pid",
    "shut_down",
    "signal_service",
    "stack_status",
    "start_service",
    "stop_service",
]

START_ORDER = ("storage", "auth", "ingest", "processor", "gateway")
GRPC_SERVICE = {
    "gateway": "streammesh.gateway.v1.GatewayService",
    "auth": "streammesh.auth.v1.AuthService",
    "ingest": "streammesh.ingest.v1.IngestService",
    "processor": "streammesh.processor.v1.ProcessorService",
    "storage": "streammesh.storage.v1.StorageService",
}


class StackConfig(BaseSettings):
    """What the CLI starts, stops and calls: `streammesh up`, `status`, `down` and every
    command that talks to the stack (env prefix STREAMMESH_)."""

    model_config = SettingsConfigDict(env_prefix="STREAMMESH_", frozen=True, extra="ignore")

    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="the CLI's folder: pki/, secrets/, logs/, run/, stack.json, session.json; "
        "default $XDG_STATE_HOME/streammesh, else ~/.local/state/streammesh",
    )
    host: str = Field(
        "127.0.0.1", description="the address every service listens on and the CLI calls"
    )
    gateway_port: int = Field(50051, description="the gateway's port (the public endpoint)")
    auth_port: int = Field(50052, description="auth's port")
    ingest_port: int = Field(50053, description="ingest's port")
    processor_port: int = Field(50054, description="the processor's port")
    storage_port: int = Field(50055, description="storage's port")
    gateway_metrics_port: int = Field(
        9551, description="the gateway's Prometheus /metrics port (HTTP, on host); 0: none"
    )
    auth_metrics_port: int = Field(9552, description="auth's /metrics port; 0: none")
    ingest_metrics_port: int = Field(9553, description="ingest's /metrics port; 0: none")
    processor_metrics_port: int = Field(9554, description="the processor's /metrics port; 0: none")
    storage_metrics_port: int = Field(9555, description="storage's /metrics port; 0: none")
    database_url: str = Field(
        "postgresql+asyncpg://postgres@127.0.0.1:5432/streammesh",
        description="the PostgreSQL database of storage and auth (created if missing)",
    )
    db_schema_prefix: str = Field(
        "",
        description="storage and auth use the schemas <prefix>storage and <prefix>auth, so "
        "several stacks can share one database",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="the Redis of ingest, processor and auth"
    )
    trust_domain: str = Field(
        DEFAULT_TRUST_DOMAIN, description="the SPIFFE trust domain of the certificates"
    )
    stream_prefix: str = Field(
        "streammesh:events",
        description="Redis keys of the event streams: <prefix>:p<n>, one per partition",
    )
    auth_redis_prefix: str = Field(
        "streammesh:auth:",
        description="the start of every Redis key auth writes (throttle, challenges)",
    )
    partitions: int = Field(
        8, description="stream partitions; ingest and processor must agree, so set it here"
    )
    log_level: str = Field("INFO", description="every service's log level")

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def secret_key_file(self) -> Path:
        return self.state_dir / "secrets" / "auth-secret-key"

    def port(self, name: str) -> int:
        return int(getattr(self, f"{name}_port"))

    def address(self, name: str) -> str:
        return f"{self.host}:{self.port(name)}"

    def metrics_port(self, name: str) -> int:
        """`name`'s /metrics port; 0 when it has none."""
        return int(getattr(self, f"{name}_metrics_port"))

    def service_env(self, name: str) -> dict[str, str]:
        """The STREAMMESH_<SERVICE>_* variables one service process gets."""
        prefix = f"STREAMMESH_{name.upper()}_"
        env = {
            "HOST": self.host,
            "PORT": str(self.port(name)),
            "TLS_DIR": str(self.pki_dir),
            "TRUST_DOMAIN": self.trust_domain,
            "LOG_LEVEL": self.log_level,
            # On the services' own host, as the gRPC port: loopback for a local stack. A port
            # another stack holds only costs this one its /metrics (a warning in its log).
            "METRICS_HOST": self.host,
            "METRICS_PORT": str(self.metrics_port(name)),
        }
        if name in ("storage", "auth"):
            env["DATABASE_URL"] = self.database_url
            env["DB_SCHEMA"] = f"{self.db_schema_prefix}{name}"
        if name == "auth":
            env |= {
                "SECRET_KEY_FILE": str(self.secret_key_file),
                "REDIS_URL": self.redis_url,
                "REDIS_PREFIX": self.auth_redis_prefix,
            }
        if name in ("ingest", "processor"):
            env |= {
                "REDIS_URL": self.redis_url,
                "STREAM_PREFIX": self.stream_prefix,
                "PARTITIONS": str(self.partitions),
            }
        if name in ("processor", "ingest"):
            env["STORAGE_TARGET"] = self.address("storage")
        if name == "gateway":
            env |= {
                "AUTH_TARGET": self.address("auth"),
                "INGEST_TARGET": self.address("ingest"),
                "STORAGE_TARGET": self.address("storage"),
            }
        return {prefix + key: value for key, value in env.items()}


@dataclass(frozen=True)
class ServiceState:
    name: str
    pid: int | None
    running: bool
    health: str
    address: str


def prepare_state(config: StackConfig, *, force_pki: bool = False) -> list[str]:
    """PKI and the auth secret key, created once and kept (`force_pki` makes a new PKI, which
    invalidates every certificate issued before); returns what was made."""
    made = init_pki(config.pki_dir, trust_domain=config.trust_domain, force=force_pki)
    if write_secret_file(config.secret_key_file):
        made.append(str(config.secret_key_file.relative_to(config.state_dir)))
    return made


_INSTANCE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def _label(name: str, instance: str | None) -> str:
    """`name` for the stack's own process, `name@instance` for an extra one."""
    if name not in GRPC_SERVICE:
        raise ValueError(f"unknown service {name!r}; expected one of {', '.join(START_ORDER)}")
    if instance is None:
        return name
    if not _INSTANCE.match(instance):
        raise ValueError(f"instance {instance!r}: use [a-z0-9][a-z0-9_-]*, at most 32 characters")
    return f"{name}@{instance}"


def _pid_file(config: StackConfig, name: str, instance: str | None = None) -> Path:
    return config.state_dir / "run" / f"{_label(name, instance)}.pid"


def log_file(config: StackConfig, name: str, instance: str | None = None) -> Path:
    """Where a service (or one of its instances) writes its log."""
    return config.state_dir / "logs" / f"{_label(name, instance)}.log"


def _instances(config: StackConfig, name: str) -> list[str]:
    """Extra instances of `name` with a pid file (running or not)."""
    run = config.state_dir / "run"
    return sorted(path.stem.split("@", 1)[1] for path in run.glob(f"{name}@*.pid"))


def _is_our_process(pid: int, name: str) -> bool:
    """True only if `pid` is alive and is still `python -m services.<name>` (PIDs get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"services.{name}".encode() in cmdline


def recorded_pid(config: StackConfig, name: str, *, instance: str | None = None) -> int | None:
    try:
        return int(_pid_file(config, name, instance).read_text().strip())
    except (OSError, ValueError):
        return None


def running_pid(config: StackConfig, name: str, *, instance: str | None = None) -> int | None:
    """The recorded PID if that process is still running this service, else None. An exited
    child of ours (a test that started it) is reaped first, so it does not linger as a zombie."""
    pid = recorded_pid(config, name, instance=instance)
    if pid is None:
        return None
    _reap(pid)
    return pid if _is_our_process(pid, name) else None


def _port_is_free(host: str, port: int) -> bool:
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


async def check_health(config: StackConfig, name: str, timeout: float = 2.0) -> str:
    """SERVING / NOT_SERVING / UNREACHABLE, asked over mTLS with the admin certificate."""
    mesh = MeshClient(
        MeshClientConfig(
            server_name=name,
            targets=parse_targets(config.address(name)),
            tls=TlsFiles.of(config.pki_dir, "admin"),
            services=(health_pb2.DESCRIPTOR.services_by_name["Health"],),
            # The question is the health itself: a NOT_SERVING replica must answer it.
            health_service=None,
        )
    )
    try:
        reply = await mesh.stub(health_pb2_grpc.HealthStub).Check(
            health_pb2.HealthCheckRequest(service=GRPC_SERVICE[name]), timeout=timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.aio.AioRpcError:
        return "UNREACHABLE"
    finally:
        await mesh.close()


async def stack_status(config: StackConfig) -> list[ServiceState]:
    states = []
    for name in START_ORDER:
        pid = running_pid(config, name)
        health = await check_health(config, name) if pid is not None else "STOPPED"
        states.append(ServiceState(name, pid, pid is not None, health, config.address(name)))
    return states


class StartError(RuntimeError):
    """A service did not come up; the message says which and shows its log's tail."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _spawn(
    config: StackConfig,
    name: str,
    *,
    extra_env: Mapping[str, str] | None = None,
    instance: str | None = None,
) -> int:
    """Start one service detached (own session, stdin from /dev/null, output to its log).

    posix_spawn rather than Popen: the process outlives the CLI, and no Popen object is left
    behind to be waited on (or warned about) in a caller that keeps running, such as a test.
    `extra_env` comes last, so it overrides both the caller's environment and `service_env`.
    """
    log_path = log_file(config, name, instance)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _pid_file(config, name, instance).parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **config.service_env(name), **(extra_env or {})}
    pid = os.posix_spawn(
        sys.executable,
        [sys.executable, "-m", f"services.{name}"],
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )
    _pid_file(config, name, instance).write_text(f"{pid}\n")
    return pid


def _reap(pid: int) -> None:
    """Collect the exit status if `pid` is our own child (the CLI in a test); else a no-op."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _exited(pid: int, name: str) -> bool:
    """Whether the process `pid`, just started as `name`, has exited. A child of ours is asked
    with waitpid (which also reaps it): its /proc/<pid>/cmdline reads empty for a moment while
    it is still in execve, which `_is_our_process` would take for an exit. A process started
    elsewhere (an earlier `up`) is checked by its command line."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not _is_our_process(pid, name)
    return done == pid


async def _wait_serving(config: StackConfig, names: Iterable[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(names)
    while waiting:
        for name in list(waiting):
            pid = recorded_pid(config, name)
            if pid is None or _exited(pid, name):
                raise StartError(
                    f"{name} exited during start-up; last lines of {log_file(config, name)}:\n"
                    + _tail(log_file(config, name))
                )
            if await check_health(config, name, timeout=1.0) == "SERVING":
                waiting.remove(name)
        if waiting and time.monotonic() > deadline:
            raise StartError(f"not SERVING after {timeout:.0f}s: {', '.join(waiting)}")
        if waiting:
            await asyncio.sleep(0.2)


async def bring_up(
    config: StackConfig,
    *,
    timeout: float = 60.0,
    extra_env: Mapping[str, Mapping[str, str]] | None = None,
) -> list[ServiceState]:
    """Start every service that is not already running and wait until all report SERVING.

    `extra_env` maps a service name to variables added to that service's environment only
    (tests use it for short lease timings, for example)."""
    from streammesh.mesh.postgres import ensure_database

    prepare_state(config)
    await ensure_database(config.database_url)
    to_start = []
    for name in START_ORDER:
        if running_pid(config, name) is not None:
            continue
        if not _port_is_free(config.host, config.port(name)):
            raise StartError(
                f"port {config.port(name)} for {name} is taken by another process; "
                f"choose another with STREAMMESH_{name.upper()}_PORT"
            )
        to_start.append(name)
    for name in to_start:
        _spawn(config, name, extra_env=(extra_env or {}).get(name))
    try:
        await _wait_serving(config, START_ORDER, timeout)
    except StartError:
        shut_down(config, names=to_start)
        raise
    return await stack_status(config)


def _signal_and_wait(pid: int, name: str, grace: float) -> bool:
    """SIGTERM, wait up to `grace`, then SIGKILL; True if it exited on SIGTERM. SIGCONT follows
    the SIGTERM so that a stopped process (SIGSTOP, a debugger) drains too instead of waiting
    out the grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pid)
        if not _is_our_process(pid, name):  # a zombie has no command line: it has exited
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    _reap(pid)
    return False


def shut_down(
    config: StackConfig, *, names: Iterable[str] | None = None, grace: float = 15.0
) -> dict[str, str]:
    """Drain and stop services, edge first so no new work arrives while the rest finish."""
    chosen = set(names) if names is not None else set(START_ORDER)
    outcome = {}
    for name in reversed(START_ORDER):
        if name not in chosen:
            continue
        for instance in _instances(config, name):
            outcome[_label(name, instance)] = stop_service(
                config, name, instance=instance, grace=grace
            )
        outcome[name] = stop_service(config, name, grace=grace)
    stack_file = config.state_dir / "stack.json"
    if names is None:
        stack_file.unlink(missing_ok=True)
    return outcome


def stop_service(
    config: StackConfig, name: str, *, instance: str | None = None, grace: float = 15.0
) -> str:
    """Drain and stop one service process (SIGTERM, SIGKILL after `grace`) and forget its pid
    file; returns "stopped", "killed" or "not running"."""
    pid = running_pid(config, name, instance=instance)
    if pid is None:
        outcome = "not running"
    else:
        outcome = "stopped" if _signal_and_wait(pid, name, grace) else "killed"
    _pid_file(config, name, instance).unlink(missing_ok=True)
    return outcome


def signal_service(
    config: StackConfig, name: str, sig: signal.Signals, *, instance: str | None = None
) -> int | None:
    """Send `sig` to the service's recorded process if it is still that service; returns the
    PID signalled, or None when it is not running. The pid file is kept, so `running_pid`
    tells afterwards whether the signal ended it."""
    pid = running_pid(config, name, instance=instance)
    if pid is None:
        return None
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return None
    return pid


async def start_service(
    config: StackConfig,
    name: str,
    *,
    extra_env: Mapping[str, str] | None = None,
    instance: str | None = None,
    timeout: float = 30.0,
) -> ServiceState:
    """Start one service process and wait until it reports SERVING.

    Without `instance` it is the stack's own `name` (refused while that one runs); with one it
    is an extra process beside it, on a free port unless `extra_env` sets
    `STREAMMESH_<NAME>_PORT`. `extra_env` overrides `service_env` (a failpoint, a limit, a
    processor's consumer name). A process that exits or is not SERVING in time is stopped, and
    StartError shows its log's tail.
    """
    label = _label(name, instance)
    running = running_pid(config, name, instance=instance)
    if running is not None:
        raise StartError(f"{label} is already running (pid {running})")
    env = dict(extra_env or {})
    port_variable = f"STREAMMESH_{name.upper()}_PORT"
    if port_variable in env:
        port = int(env[port_variable])
    elif instance is None:
        port = config.port(name)
    else:
        port = free_ports(config.host)[0]
        env[port_variable] = str(port)
    if not _port_is_free(config.host, port):
        raise StartError(f"port {port} for {label} is taken by another process")
    pid = _spawn(config, name, extra_env=env, instance=instance)
    probe = config.model_copy(update={f"{name}_port": port})
    deadline = time.monotonic() + timeout
    while True:
        if _exited(pid, name):
            _pid_file(config, name, instance).unlink(missing_ok=True)
            raise StartError(
                f"{label} exited during start-up; last lines of "
                f"{log_file(config, name, instance)}:\n" + _tail(log_file(config, name, instance))
            )
        if await check_health(probe, name, timeout=1.0) == "SERVING":
            return ServiceState(label, pid, True, "SERVING", probe.address(name))
        if time.monotonic() > deadline:
            stop_service(config, name, instance=instance, grace=5.0)
            raise StartError(f"{label} not SERVING after {timeout:.0f}s")
        await asyncio.sleep(0.1)


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


def write_stack_file(config: StackConfig) -> Path:
    """Endpoints for tools and people: `<state>/stack.json`."""
    path = config.state_dir / "stack.json"
    path.write_text(
        json.dumps(
            {
                "services": {name: config.address(name) for name in START_ORDER},
                "metrics": {
                    name: f"http://{config.host}:{config.metrics_port(name)}/metrics"
                    for name in START_ORDER
                    if config.metrics_port(name)
                },
                "pki_dir": str(config.pki_dir),
                "logs_dir": str(config.state_dir / "logs"),
            },
            indent=2,
        )
    )
    return path
