"""The peer policy file: which mTLS identity may call which method of which internal service.

The file (TOML, read with the standard library's tomllib) ships in the package as
`streammesh/mesh/policy.toml`; the `policy_file` setting points a service at another one. Its
shape, per destination service (`auth`, `ingest`, `processor`, `storage`, and `all` for rules
every internal listener shares):

    [storage.allow]
    "service/processor" = ["streammesh.storage.v1.StorageService/StoreEvents", ...]
    [storage.deny]
    "streammesh.storage.v1.StorageService/Foo" = "why nobody may call it"

An identity is `service/<name>`, `operator/<name>` (resolved against the trust domain), a full
SPIFFE id, or `*` (any peer holding a valid leaf certificate of our CA). A method is
`package.Service/Method` or `package.Service/*`. Everything is checked against the protos'
descriptors when a service starts: an unknown identity kind or service name, a method or
service that does not exist or that the destination does not host, a method both allowed and
denied, or a deny without a reason make `load_policy_file` raise PolicyFileError naming the
entry and its line. Nothing is implied: the operator gets exactly what a rule names.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from streammesh.api.auth.v1 import auth_pb2
from streammesh.api.ingest.v1 import ingest_pb2
from streammesh.api.processor.v1 import processor_pb2
from streammesh.api.storage.v1 import definitions_pb2, schema_registry_pb2, storage_pb2
from streammesh.mesh.identity import IDENTITY_KINDS, operator_id, parse_spiffe_id, service_id
from streammesh.mesh.pki import SERVICE_NAMES

__all__ = [
    "ANY_PEER",
    "EVERY_SERVICE",
    "HOSTED",
    "INFRASTRUCTURE",
    "PolicyFile",
    "PolicyFileError",
    "default_policy_path",
    "load_policy_file",
    "resolve_rules",
]

ANY_PEER = "*"
"""Any peer whose leaf certificate our CA issued and that passed the identity checks."""

EVERY_SERVICE = "all"
"""The table whose rules apply on every internal listener (health, reflection)."""

INFRASTRUCTURE: tuple[ServiceDescriptor, ...] = (
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
)
"""The gRPC services every mesh server hosts besides its own (see streammesh.mesh.server)."""

HOSTED: Mapping[str, tuple[ServiceDescriptor, ...]] = {
    "auth": (auth_pb2.DESCRIPTOR.services_by_name["AuthService"],),
    "ingest": (ingest_pb2.DESCRIPTOR.services_by_name["IngestService"],),
    "processor": (processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"],),
    "storage": (
        storage_pb2.DESCRIPTOR.services_by_name["StorageService"],
        schema_registry_pb2.DESCRIPTOR.services_by_name["SchemaRegistryService"],
        definitions_pb2.DESCRIPTOR.services_by_name["DefinitionService"],
    ),
}
"""The internal services (mTLS listeners guarded by this file) and the gRPC services each hosts,
besides INFRASTRUCTURE. The gateway's public listener guards with tokens and is not here."""

_TABLE_KEYS = {"allow", "deny"}


class PolicyFileError(ValueError):
    """The policy file is not valid; the message names the file, the entry and its line."""


@dataclass(frozen=True)
class PolicyFile:
    """A validated policy file: per destination, method pattern -> allowed SPIFFE ids (or
    ANY_PEER), and the methods it denies explicitly with the reason."""

    path: str
    allow: Mapping[str, Mapping[str, frozenset[str]]]
    deny: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def rules_for(self, destination: str) -> dict[str, frozenset[str]]:
        """The rules of `destination`, the `all` table's included."""
        rules = dict(self.allow.get(EVERY_SERVICE, {}))
        for pattern, peers in self.allow.get(destination, {}).items():
            rules[pattern] = rules.get(pattern, frozenset()) | peers
        return rules

    def uncovered(self, destination: str) -> list[str]:
        """Methods `destination` hosts that no rule allows and no deny entry names: refused by
        default, but by accident rather than by a written decision."""
        rules = self.rules_for(destination)
        denied = {**self.deny.get(EVERY_SERVICE, {}), **self.deny.get(destination, {})}
        return [
            method
            for method in _methods(destination)
            if not _matches(method, rules) and not _matches(method, denied)
        ]


def default_policy_path() -> Path:
    """The policy file shipped in the package."""
    return Path(str(resources.files("streammesh.mesh") / "policy.toml"))


def _hosted(destination: str) -> tuple[ServiceDescriptor, ...]:
    if destination == EVERY_SERVICE:
        return INFRASTRUCTURE
    return (*HOSTED[destination], *INFRASTRUCTURE)


def _methods(destination: str) -> list[str]:
    return [
        f"{service.full_name}/{method.name}"
        for service in _hosted(destination)
        for method in service.methods
    ]


def _matches(method: str, patterns: Mapping[str, object]) -> bool:
    service = method.partition("/")[0]
    return method in patterns or f"{service}/*" in patterns


def _line_of(text: str, table: str, needle: str) -> int | None:
    """The line of `needle` (an entry's key or value, quoted) within `[table]`, for messages:
    tomllib keeps no positions."""
    header = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]")
    current = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = header.match(line)
        if match:
            current = match.group(1).replace('"', "").replace(" ", "")
            continue
        if current == table and needle in line:
            return number
    return None


class _Reader:
    """Validates one file's parsed tables, keeping the text to name lines in errors."""

    def __init__(self, path: str, text: str, trust_domain: str) -> None:
        self.path = path
        self.text = text
        self.trust_domain = trust_domain

    def error(self, table: str, needle: str, problem: str) -> PolicyFileError:
        line = _line_of(self.text, table, f'"{needle}"') if needle else None
        where = f"{self.path}:{line}" if line else self.path
        entry = f' "{needle}"' if needle else ""
        return PolicyFileError(f"{where}: [{table}]{entry}: {problem}")

    def identity(self, table: str, peer: str) -> str:
        if peer == ANY_PEER:
            return peer
        if peer.startswith("spiffe://"):
            try:
                domain, kind, name = parse_spiffe_id(peer)
            except ValueError as error:
                raise self.error(table, peer, str(error)) from None
            if domain != self.trust_domain:
                raise self.error(
                    table, peer, f"not in this mesh's trust domain {self.trust_domain}"
                )
        else:
            kind, _, name = peer.partition("/")
            if kind not in IDENTITY_KINDS:
                raise self.error(
                    table,
                    peer,
                    f"unknown identity kind {kind!r}: write service/<name>, operator/<name>, "
                    "a SPIFFE id or *",
                )
        if kind == "service" and name not in SERVICE_NAMES:
            raise self.error(
                table, peer, f"no service is named {name!r} (known: {', '.join(SERVICE_NAMES)})"
            )
        if kind == "operator" and not re.fullmatch(r"[A-Za-z0-9._-]{1,63}", name):
            raise self.error(table, peer, f"{name!r} is not an operator name")
        make = service_id if kind == "service" else operator_id
        return make(self.trust_domain, name)

    def method(self, table: str, destination: str, pattern: object) -> str:
        if not isinstance(pattern, str):
            raise self.error(table, "", f"{pattern!r} is not a string package.Service/Method")
        service_name, slash, method_name = pattern.partition("/")
        services = {service.full_name: service for service in _hosted(destination)}
        if not slash or not method_name:
            raise self.error(table, pattern, "write package.Service/Method or package.Service/*")
        service = services.get(service_name)
        if service is None:
            raise self.error(
                table,
                pattern,
                f"{destination} hosts no service {service_name!r} "
                f"(it hosts {', '.join(sorted(services))})",
            )
        if method_name != "*" and method_name not in service.methods_by_name:
            raise self.error(
                table,
                pattern,
                f"{service_name} has no method {method_name!r} "
                f"(it has {', '.join(m.name for m in service.methods)})",
            )
        return pattern

    def allow(self, destination: str, entries: object) -> dict[str, frozenset[str]]:
        table = f"{destination}.allow"
        if not isinstance(entries, dict):
            raise self.error(table, "", "must be a table of identity = [methods]")
        rules: dict[str, set[str]] = {}
        for peer, methods in entries.items():
            identity = self.identity(table, peer)
            if not isinstance(methods, list) or not methods:
                raise self.error(table, peer, "must be a non-empty list of methods")
            for pattern in methods:
                rules.setdefault(self.method(table, destination, pattern), set()).add(identity)
        return {pattern: frozenset(peers) for pattern, peers in rules.items()}

    def deny(self, destination: str, entries: object) -> dict[str, str]:
        table = f"{destination}.deny"
        if not isinstance(entries, dict):
            raise self.error(table, "", 'must be a table of "package.Service/Method" = "reason"')
        for pattern, reason in entries.items():
            self.method(table, destination, pattern)
            if not isinstance(reason, str) or not reason.strip():
                raise self.error(table, pattern, "an explicit deny needs its reason as a string")
        return dict(entries)

    def read(self, data: Mapping[str, Any]) -> PolicyFile:
        if data.get("version") != 1:
            raise PolicyFileError(f"{self.path}: version = 1 is required")
        known = {EVERY_SERVICE, *HOSTED}
        allow: dict[str, dict[str, frozenset[str]]] = {}
        deny: dict[str, dict[str, str]] = {}
        for destination, tables in data.items():
            if destination == "version":
                continue
            if destination not in known:
                raise self.error(
                    destination,
                    "",
                    f"no internal service is named {destination!r} "
                    f"(known: {', '.join(sorted(known))}; the gateway guards with tokens)",
                )
            if not isinstance(tables, dict) or not set(tables) <= _TABLE_KEYS or not tables:
                raise self.error(destination, "", "holds only [<service>.allow] and .deny tables")
            allow[destination] = self.allow(destination, tables.get("allow", {}))
            deny[destination] = self.deny(destination, tables.get("deny", {}))
        policy = PolicyFile(self.path, allow, deny)
        for destination in HOSTED:
            rules = policy.rules_for(destination)
            for table in (EVERY_SERVICE, destination):
                for pattern in deny.get(table, {}):
                    overlap = [
                        method
                        for method in _methods(destination)
                        if _matches(method, rules) and _matches(method, {pattern: None})
                    ]
                    if overlap:
                        raise self.error(
                            f"{table}.deny",
                            pattern,
                            f"denied here but allowed on {destination} ({', '.join(overlap)})",
                        )
        return policy


def load_policy_file(path: Path | None, *, trust_domain: str) -> PolicyFile:
    """Read and validate the policy file at `path` (None: the shipped one)."""
    path = path or default_policy_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PolicyFileError(f"cannot read the policy file {path}: {error.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PolicyFileError(f"{path}: not valid TOML: {error}") from None
    return _Reader(str(path), text, trust_domain).read(data)


def resolve_rules(
    trust_domain: str, rules: Mapping[str, Iterable[str]]
) -> dict[str, frozenset[str]]:
    """Rules written in code (tests, tools): the same identity forms as the file, no checks of
    the methods against a destination."""
    reader = _Reader("<rules>", "", trust_domain)
    return {
        pattern: frozenset(reader.identity("rules", peer) for peer in peers)
        for pattern, peers in rules.items()
    }
