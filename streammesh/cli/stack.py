"""The whole stack as local processes: start, watch, stop.

Each service runs as `python -m services.<name>` in its own session (so a terminal's Ctrl-C does not
reach it), logs to `<state>/logs/<name>.log` and is recorded in `<state>/run/<name>.pid` (and its
port in `run/<name>.port`). Stopping signals only PIDs recorded here whose command line is still
that service.

`bring_up(replicas={"storage": 2, ...})` runs several processes of a service: replica k >= 2 is
the extra instance `k` (`run/<name>@k.pid`, `logs/<name>@k.log`, a port of its own recorded in
`run/<name>@k.port`; see streammesh.cli.replicas), and every service that calls it is given the
addresses of all its replicas as one comma-separated target (round_robin, health-checked).

Fault tests and operators can also start one service on its own (`start_service`), with extra
`STREAMMESH_*` variables (a failpoint, a lower limit) or as an extra instance beside the stack's
own (`instance="b"`: its own port, pid file `run/<name>@b.pid` and log `logs/<name>@b.log`), and
signal it (`signal_service`, `stop_service`). `shut_down` stops extra instances too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streammesh.cli.processes import (
    exited,
    free_ports,
    is_our_process,
    port_is_free,
    process_alive,
    reap,
    stop_processes,
    tail,
)
from streammesh.cli.replicas import (
    Replica,
    label,
    port_file,
    read_port,
    replica_instance,
    replica_numbers,
)
from streammesh.cli.stack_config import GRPC_SERVICE, START_ORDER, StackConfig
from streammesh.mesh import init_pki
from streammesh.mesh.client import MeshClient, MeshClientConfig, TlsFiles, parse_targets
from streammesh.mesh.pki_rotation import renew_due
from streammesh.mesh.settings import write_secret_file

__all__ = [
    "GRPC_SERVICE",
    "START_ORDER",
    "ServiceState",
    "StackConfig",
    "StartError",
    "bring_up",
    "check_health",
    "free_ports",
    "log_file",
    "plan_replicas",
    "prepare_state",
    "process_alive",
    "recorded_pid",
    "recorded_replicas",
    "replica_addresses",
    "running_pid",
    "shut_down",
    "signal_service",
    "stack_status",
    "start_service",
    "stop_service",
    "write_stack_file",
]


@dataclass(frozen=True)
class ServiceState:
    """One process of the stack as `status` shows it."""

    name: str
    """The label: `storage` for replica 1, `storage@2` for replica 2 (or a test's instance)."""
    pid: int | None
    running: bool
    health: str
    address: str

    @property
    def service(self) -> str:
        return self.name.split("@", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


def prepare_state(config: StackConfig, *, force_pki: bool = False) -> list[str]:
    """PKI, the auth secret key and storage's page-token secret, created once and kept
    (`force_pki` makes a new PKI, which invalidates every certificate issued before); returns
    what was made."""
    lifetime = dt.timedelta(seconds=config.leaf_lifetime_seconds)
    made = init_pki(
        config.pki_dir, trust_domain=config.trust_domain, force=force_pki, leaf_lifetime=lifetime
    )
    made += [name for name in renew_due(config.pki_dir, lifetime=lifetime) if name not in made]
    for secret in (config.secret_key_file, config.page_token_secret_file):
        if write_secret_file(secret):
            made.append(str(secret.relative_to(config.state_dir)))
    return made


def _pid_file(config: StackConfig, name: str, instance: str | None = None) -> Path:
    return config.state_dir / "run" / f"{label(name, instance)}.pid"


def log_file(config: StackConfig, name: str, instance: str | None = None) -> Path:
    """Where a service (or one of its instances) writes its log."""
    return config.state_dir / "logs" / f"{label(name, instance)}.log"


def _instances(config: StackConfig, name: str) -> list[str]:
    """Extra instances of `name` with a pid file (running or not): replicas in number order,
    then a test's named instances."""
    run = config.state_dir / "run"
    found = [path.stem.split("@", 1)[1] for path in run.glob(f"{name}@*.pid")]
    numbered = [str(number) for number in replica_numbers(found)]
    return numbered + sorted(set(found) - set(numbered))


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
    reap(pid)
    return pid if is_our_process(pid, name) else None


def _port(config: StackConfig, name: str, instance: str | None) -> int:
    """Where one process listens: its recorded port, else the service's configured one."""
    recorded = read_port(config.state_dir / "run", name, instance)
    return recorded if recorded is not None else config.port(name)


def recorded_replicas(config: StackConfig) -> dict[str, int]:
    """Replicas per service as the pid files record them (1 where there is no extra)."""
    counts = {}
    for name in START_ORDER:
        numbers = replica_numbers(_instances(config, name))
        counts[name] = max(numbers, default=1)
    return counts


def plan_replicas(config: StackConfig, counts: Mapping[str, int]) -> dict[str, list[Replica]]:
    """Where every replica listens: replica 1 on the configured port, the others on their
    recorded ports (the callers already running know those), else on fresh free ports."""
    run = config.state_dir / "run"

    def known_port(name: str, number: int) -> int:
        if number == 1:
            return config.port(name)
        return read_port(run, name, replica_instance(number)) or 0

    plan = {
        name: [
            Replica(name, number, known_port(name, number))
            for number in range(1, counts.get(name, 1) + 1)
        ]
        for name in START_ORDER
    }
    unplaced = [replica for replicas in plan.values() for replica in replicas if not replica.port]
    fresh = iter(free_ports(config.host, len(unplaced)))
    return {
        name: [replica if replica.port else replace(replica, port=next(fresh)) for replica in rs]
        for name, rs in plan.items()
    }


async def check_health(
    config: StackConfig, name: str, timeout: float = 2.0, *, address: str | None = None
) -> str:
    """SERVING / NOT_SERVING / UNREACHABLE, asked over mTLS with the admin certificate, of the
    process at `address` (default: the service's configured port)."""
    mesh = MeshClient(
        MeshClientConfig(
            server_name=name,
            targets=parse_targets(address or config.address(name)),
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


async def _state(config: StackConfig, name: str, instance: str | None) -> ServiceState:
    pid = running_pid(config, name, instance=instance)
    address = f"{config.host}:{_port(config, name, instance)}"
    health = await check_health(config, name, address=address) if pid is not None else "STOPPED"
    return ServiceState(label(name, instance), pid, pid is not None, health, address)


async def stack_status(config: StackConfig) -> list[ServiceState]:
    """Every process of the stack (each replica and extra instance), with its health; asked
    all at once, so a stack of many replicas answers as fast as one."""
    members = [
        (name, instance) for name in START_ORDER for instance in (None, *_instances(config, name))
    ]
    return list(await asyncio.gather(*(_state(config, *member) for member in members)))


class StartError(RuntimeError):
    """A service did not come up; the message says which and shows its log's tail."""


def _spawn(
    config: StackConfig,
    name: str,
    *,
    port: int,
    extra_env: Mapping[str, str] | None = None,
    instance: str | None = None,
    targets: Mapping[str, Sequence[str]] | None = None,
) -> int:
    """Start one service detached (own session, stdin from /dev/null, output to its log),
    listening on `port`; `targets` as in `StackConfig.service_env`.

    posix_spawn rather than Popen: the process outlives the CLI, and no Popen object is left
    behind to be waited on (or warned about) in a caller that keeps running, such as a test.
    `extra_env` comes last, so it overrides both the caller's environment and `service_env`.
    """
    log_path = log_file(config, name, instance)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _pid_file(config, name, instance).parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **config.service_env(name, targets),
        f"STREAMMESH_{name.upper()}_PORT": str(port),
        f"STREAMMESH_{name.upper()}_METRICS_PORT": str(
            config.metrics_port(name, int(instance) if instance and instance.isdigit() else 1)
        ),
        **(extra_env or {}),
    }
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
    port_file(config.state_dir / "run", name, instance).write_text(f"{port}\n")
    return pid


async def _wait_serving(config: StackConfig, replicas: Iterable[Replica], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(replicas)
    while waiting:
        for replica in list(waiting):
            name, instance = replica.service, replica.instance
            pid = recorded_pid(config, name, instance=instance)
            if pid is None or exited(pid, name):
                raise StartError(
                    f"{replica.label} exited during start-up; last lines of "
                    f"{log_file(config, name, instance)}:\n"
                    + tail(log_file(config, name, instance))
                )
            address = f"{config.host}:{replica.port}"
            if await check_health(config, name, timeout=1.0, address=address) == "SERVING":
                waiting.remove(replica)
        if waiting and time.monotonic() > deadline:
            labels = ", ".join(replica.label for replica in waiting)
            raise StartError(f"not SERVING after {timeout:.0f}s: {labels}")
        if waiting:
            await asyncio.sleep(0.2)


def _replica_counts(config: StackConfig, replicas: Mapping[str, int] | None) -> dict[str, int]:
    """The counts to run: those asked for (1 for a service not named), else the recorded ones.
    A running service keeps its count: its callers were given its replicas' addresses."""
    recorded = recorded_replicas(config)
    if replicas is None:
        return recorded
    wanted = {name: replicas.get(name, 1) for name in START_ORDER}
    for name in START_ORDER:
        members = (None, *_instances(config, name))
        running = any(running_pid(config, name, instance=each) is not None for each in members)
        if running and wanted[name] != recorded[name]:
            raise StartError(
                f"{name} runs with {recorded[name]} replica(s), not {wanted[name]}: the services "
                "that call it know only those; run `streammesh down` first to change the count"
            )
    return wanted


async def bring_up(
    config: StackConfig,
    *,
    replicas: Mapping[str, int] | None = None,
    timeout: float = 60.0,
    extra_env: Mapping[str, Mapping[str, str]] | None = None,
) -> list[ServiceState]:
    """Start every replica that is not already running and wait until all report SERVING.

    `replicas` maps a service to its number of processes (default: what runs already, else 1
    each). `extra_env` maps a service name to variables added to that service's environment
    only (tests use it for short lease timings, for example)."""
    from streammesh.mesh.postgres import ensure_database

    prepare_state(config)
    await ensure_database(config.database_url)
    plan = plan_replicas(config, _replica_counts(config, replicas))
    _forget_stale(config, plan)
    targets = {
        name: [f"{config.host}:{replica.port}" for replica in members]
        for name, members in plan.items()
    }
    to_start = []
    for name in START_ORDER:
        for replica in plan[name]:
            if running_pid(config, name, instance=replica.instance) is not None:
                continue
            if not port_is_free(config.host, replica.port):
                hint = f"; choose another with STREAMMESH_{name.upper()}_PORT"
                raise StartError(
                    f"port {replica.port} for {replica.label} is taken by another process"
                    + (hint if replica.number == 1 else "")
                )
            to_start.append(replica)
    for replica in to_start:
        _spawn(
            config,
            replica.service,
            port=replica.port,
            instance=replica.instance,
            extra_env=(extra_env or {}).get(replica.service),
            targets=targets,
        )
    try:
        await _wait_serving(config, [r for members in plan.values() for r in members], timeout)
    except StartError:
        _stop_members(config, [(r.service, r.instance) for r in to_start], grace=15.0)
        raise
    return await stack_status(config)


def _forget_stale(config: StackConfig, plan: Mapping[str, list[Replica]]) -> None:
    """Drop the files of replicas beyond the plan that no longer run (a stack that crashed
    with more replicas than it is now started with), so `status` does not list them."""
    for name, members in plan.items():
        for number in replica_numbers(_instances(config, name)):
            instance = replica_instance(number)
            if number > len(members) and running_pid(config, name, instance=instance) is None:
                _pid_file(config, name, instance).unlink(missing_ok=True)
                port_file(config.state_dir / "run", name, instance).unlink(missing_ok=True)


def _stop_members(
    config: StackConfig, members: Sequence[tuple[str, str | None]], grace: float
) -> dict[str, str]:
    """Drain and stop these processes side by side; forget their pid and port files. Returns
    "stopped", "killed" or "not running" per label."""
    pids = {}
    for name, instance in members:
        pid = running_pid(config, name, instance=instance)
        if pid is not None:
            pids[pid] = (name, instance)
    drained = stop_processes({pid: name for pid, (name, _) in pids.items()}, grace)
    outcome = dict.fromkeys((label(*member) for member in members), "not running")
    for pid, member in pids.items():
        outcome[label(*member)] = "stopped" if drained[pid] else "killed"
    for name, instance in members:
        _pid_file(config, name, instance).unlink(missing_ok=True)
        port_file(config.state_dir / "run", name, instance).unlink(missing_ok=True)
    return outcome


def shut_down(
    config: StackConfig, *, names: Iterable[str] | None = None, grace: float = 15.0
) -> dict[str, str]:
    """Drain and stop services, edge first so no new work arrives while the rest finish; the
    replicas (and extra instances) of one service drain side by side."""
    chosen = set(names) if names is not None else set(START_ORDER)
    outcome: dict[str, str] = {}
    for name in reversed(START_ORDER):
        if name in chosen:
            members = [(name, instance) for instance in (None, *_instances(config, name))]
            outcome |= _stop_members(config, members, grace)
    stack_file = config.state_dir / "stack.json"
    if names is None:
        stack_file.unlink(missing_ok=True)
    return outcome


def stop_service(
    config: StackConfig, name: str, *, instance: str | None = None, grace: float = 15.0
) -> str:
    """Drain and stop one service process (SIGTERM, SIGKILL after `grace`) and forget its pid
    file; returns "stopped", "killed" or "not running"."""
    return _stop_members(config, [(name, instance)], grace)[label(name, instance)]


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
    label_ = label(name, instance)
    running = running_pid(config, name, instance=instance)
    if running is not None:
        raise StartError(f"{label_} is already running (pid {running})")
    env = dict(extra_env or {})
    port_variable = f"STREAMMESH_{name.upper()}_PORT"
    if port_variable in env:
        port = int(env.pop(port_variable))
    elif instance is None:
        port = config.port(name)
    else:
        port = free_ports(config.host)[0]
    if not port_is_free(config.host, port):
        raise StartError(f"port {port} for {label_} is taken by another process")
    pid = _spawn(config, name, port=port, extra_env=env, instance=instance)
    address = f"{config.host}:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if exited(pid, name):
            _pid_file(config, name, instance).unlink(missing_ok=True)
            raise StartError(
                f"{label_} exited during start-up; last lines of "
                f"{log_file(config, name, instance)}:\n" + tail(log_file(config, name, instance))
            )
        if await check_health(config, name, timeout=1.0, address=address) == "SERVING":
            return ServiceState(label_, pid, True, "SERVING", address)
        if time.monotonic() > deadline:
            stop_service(config, name, instance=instance, grace=5.0)
            raise StartError(f"{label_} not SERVING after {timeout:.0f}s")
        await asyncio.sleep(0.1)


def replica_addresses(config: StackConfig, name: str) -> list[str]:
    """Every numbered replica of `name` as this state folder records it (replica 1 first);
    just the configured address when none is recorded."""
    return [
        f"{config.host}:{_port(config, name, instance)}"
        for instance in (None, *_instances(config, name))
        if instance is None or instance.isdigit()
    ]


def write_stack_file(config: StackConfig) -> Path:
    """Endpoints for tools and people: `<state>/stack.json` (`services`: replica 1 of each;
    `replicas`: every replica's address)."""
    path = config.state_dir / "stack.json"
    replicas = {name: replica_addresses(config, name) for name in START_ORDER}
    path.write_text(
        json.dumps(
            {
                "services": {name: config.address(name) for name in START_ORDER},
                "replicas": replicas,
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
