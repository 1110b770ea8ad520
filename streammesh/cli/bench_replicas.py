"""The bench on a replicated stack (`streammesh bench --replicas gateway=2,storage=2,...`): which
processes it measures, where its load goes, and CPU per replica.

Every replica of a service is sampled by its own pid under its label (`storage`, `storage@2`;
streammesh.cli.replicas); a service's row in the CPU table is the sum of its replicas
(bench_load.cpu_per_event), and `per_replica_cpu` keeps each replica's share, so the table can
say whether round_robin spread the work. The load and the bench's own client go to every
gateway replica as one comma-separated target (round_robin over them, as callers of a
replicated service are given it), so each Publish stream lands on one of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from streammesh.cli import bench_load as load
from streammesh.cli.replicas import label, replica_instance
from streammesh.cli.stack import StackConfig, recorded_pid, recorded_replicas, replica_addresses

__all__ = [
    "gateway_target",
    "per_replica_cpu",
    "replica_pids",
    "replicated",
    "service_of",
]


def service_of(name: str) -> str:
    """The service of a replica's label: `storage@2` -> `storage`."""
    return name.split("@", 1)[0]


def replica_pids(bench: StackConfig, names: Iterable[str]) -> dict[str, int | None]:
    """Label -> recorded pid of every replica of the services `names`, replica 1 first."""
    counts = recorded_replicas(bench)
    pids: dict[str, int | None] = {}
    for name in names:
        for number in range(1, counts.get(name, 1) + 1):
            instance = replica_instance(number)
            pids[label(name, instance)] = recorded_pid(bench, name, instance=instance)
    return pids


def gateway_target(bench: StackConfig) -> str:
    """Every gateway replica as one target (just the gateway's address with one replica)."""
    return ",".join(replica_addresses(bench, "gateway"))


def replicated(pids: Mapping[str, Any]) -> list[str]:
    """The services among `pids`' labels that run more than one replica."""
    services = [service_of(name) for name in pids]
    return [name for name in dict.fromkeys(services) if services.count(name) > 1]


def per_replica_cpu(
    before: load.CpuSample, after: load.CpuSample, events: int
) -> dict[str, float | None] | None:
    """CPU us per event of each replica of the replicated services, labelled `storage@1`,
    `storage@2`, ... (None when no service has several: the bench's default stack)."""
    spent = load.cpu_seconds_between(before, after)
    several = set(replicated(spent))
    if not several:
        return None
    out: dict[str, float | None] = {}
    for name, seconds in spent.items():
        service = service_of(name)
        if service in several:
            key = name if "@" in name else f"{service}@1"
            out[key] = None if seconds is None or events <= 0 else seconds * 1e6 / events
    return out
