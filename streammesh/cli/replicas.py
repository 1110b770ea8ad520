"""How many processes of each service `streammesh up` runs, and where each one listens.

Replica 1 of a service is the stack's own process: label `<name>`, the service's configured port
(`STREAMMESH_<NAME>_PORT`), pid file `run/<name>.pid`. Replica k >= 2 is the extra instance `k`:
label `<name>@k`, pid file `run/<name>@k.pid`, log `logs/<name>@k.log`, and a port the kernel
gave it on its first start, recorded in `run/<name>@k.port` and reused by later starts, because
the services that call it were given that address. Every label's port is recorded the same way
(`run/<label>.port`), so `status` can show it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from streammesh.cli.stack_config import START_ORDER

__all__ = [
    "MAX_REPLICAS",
    "Replica",
    "format_counts",
    "label",
    "parse_replicas",
    "port_file",
    "read_port",
    "replica_instance",
    "replica_numbers",
]

MAX_REPLICAS = 16
"""Processes per service at most: a local stack on one machine, not a cluster."""

_INSTANCE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def label(name: str, instance: str | None) -> str:
    """`name` for the stack's own process, `name@instance` for an extra one."""
    if name not in START_ORDER:
        raise ValueError(f"unknown service {name!r}; expected one of {', '.join(START_ORDER)}")
    if instance is None:
        return name
    if not _INSTANCE.match(instance):
        raise ValueError(f"instance {instance!r}: use [a-z0-9][a-z0-9_-]*, at most 32 characters")
    return f"{name}@{instance}"


def replica_instance(number: int) -> str | None:
    """The instance name of replica `number` (1-based): None for the first."""
    return None if number == 1 else str(number)


@dataclass(frozen=True)
class Replica:
    """One process of a service in the stack's plan."""

    service: str
    number: int
    """1-based; replica 1 is the stack's own process."""
    port: int

    @property
    def instance(self) -> str | None:
        return replica_instance(self.number)

    @property
    def label(self) -> str:
        return label(self.service, self.instance)


def parse_replicas(spec: str) -> dict[str, int]:
    """`gateway=2,storage=3` -> counts for every service (1 for those not named).

    Raises ValueError naming the offending part: an unknown service, a count that is not a
    whole number from 1 to MAX_REPLICAS, a service named twice."""
    counts = dict.fromkeys(START_ORDER, 1)
    seen: set[str] = set()
    for part in (piece.strip() for piece in spec.split(",")):
        if not part:
            continue
        name, sep, value = (token.strip() for token in part.partition("="))
        if not sep:
            raise ValueError(f"{part!r}: write <service>=<count>, e.g. storage=2")
        if name not in START_ORDER:
            raise ValueError(f"{part!r}: unknown service; expected one of {', '.join(START_ORDER)}")
        if name in seen:
            raise ValueError(f"{part!r}: {name} is named twice")
        if not value.isdigit() or not 1 <= int(value) <= MAX_REPLICAS:
            raise ValueError(f"{part!r}: the count must be a whole number from 1 to {MAX_REPLICAS}")
        seen.add(name)
        counts[name] = int(value)
    return counts


def format_counts(counts: Mapping[str, int]) -> str:
    """The inverse of `parse_replicas`, for messages: `storage=1,auth=2,...`."""
    return ",".join(f"{name}={counts[name]}" for name in START_ORDER if name in counts)


def port_file(run_dir: Path, name: str, instance: str | None) -> Path:
    """Where the port of one process is recorded."""
    return run_dir / f"{label(name, instance)}.port"


def read_port(run_dir: Path, name: str, instance: str | None) -> int | None:
    """The recorded port of one process, or None."""
    try:
        return int(port_file(run_dir, name, instance).read_text().strip())
    except (OSError, ValueError):
        return None


def replica_numbers(instances: Iterable[str]) -> list[int]:
    """The replica numbers (>= 2) among extra instance names; others (a test's "b") are not
    replicas of the plan."""
    return sorted(int(each) for each in instances if each.isdigit() and int(each) >= 2)
