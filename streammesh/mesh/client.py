"""The mesh client: one object per upstream service, built from a typed frozen config.

    client = MeshClient(MeshClientConfig(
        server_name="storage",
        targets=parse_targets("10.0.0.5:50055,10.0.0.6:50055"),
        tls=TlsFiles.of(tls_dir, "processor"),
        services=(storage_pb2.DESCRIPTOR.services_by_name["StorageService"],),
        timeout_seconds=10,
    ))
    stub = client.stub(storage_pb2_grpc.StorageServiceStub)
    ...
    await client.close()

The client owns a channel to every replica of the service (health-checked; one channel per
replica when several are listed, so that it can eject a failing one: streammesh.mesh.replicas
and streammesh.mesh.ejection), the service config derived from the protos' idempotency options
(streammesh.mesh.derived_config), per-method timeouts bounded by the deadline of the call being
handled (streammesh.mesh.deadlines), a limit on calls in flight (streammesh.mesh.limits) and
the client interceptors, and the reload of its TLS material (streammesh.mesh.channel_reload:
new channels swapped in when the files change). Callers hold stubs, never channels or
retry lists. A caller that sends pre-serialized bytes takes `client.channel` for its own
multi-callable (the processor's StoreEvents does).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from streammesh.mesh.channel import channel_options
from streammesh.mesh.channel_reload import ChannelReloader, channel_credentials
from streammesh.mesh.derived_config import RetryPolicy, derive_service_config, retryable_codes
from streammesh.mesh.ejection import EjectionPolicy, Ejector
from streammesh.mesh.limits import ConcurrencyLimit
from streammesh.mesh.pki import CA_FILE
from streammesh.mesh.replicas import ReplicaChannel
from streammesh.mesh.tls_reload import MaterialSnapshot, read_snapshot
from streammesh.mesh.tracing_client import default_tracing_interceptors

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TIMEOUT_SECONDS",
    "DEFAULT_TLS_RELOAD_SECONDS",
    "MeshClient",
    "MeshClientConfig",
    "TlsFiles",
    "parse_targets",
]

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_TLS_RELOAD_SECONDS = 10.0

_Stub = TypeVar("_Stub")


@dataclass(frozen=True)
class TlsFiles:
    """Where a channel's TLS material lives. Read when a channel is built, so that a channel
    built after a certificate rotation presents the new certificate."""

    ca_file: Path
    """The CA bundle the server's certificate must chain to."""
    certificate_file: Path | None = None
    """This process's certificate chain (None: no client certificate, as for the gateway's
    public listener)."""
    key_file: Path | None = None
    """The private key of `certificate_file`."""

    def __post_init__(self) -> None:
        if (self.certificate_file is None) != (self.key_file is None):
            raise ValueError("certificate_file and key_file go together")

    @classmethod
    def of(cls, tls_dir: Path, identity: str) -> TlsFiles:
        """`<dir>/ca.pem`, `<dir>/<identity>.pem` and `<dir>/<identity>-key.pem` (the PKI
        layout of streammesh.mesh.pki)."""
        return cls(tls_dir / CA_FILE, tls_dir / f"{identity}.pem", tls_dir / f"{identity}-key.pem")

    @property
    def paths(self) -> tuple[Path, ...]:
        """The files: the CA bundle, then the certificate and key when there are some."""
        return tuple(
            path
            for path in (self.ca_file, self.certificate_file, self.key_file)
            if path is not None
        )

    def snapshot(self) -> MaterialSnapshot:
        """The files as they are now (read again if a rotation was between its renames);
        FileNotFoundError names a missing file, ValueError a key that is not the
        certificate's."""
        try:
            for _ in range(3):
                snapshot = read_snapshot(self.ca_file, self.certificate_file, self.key_file)
                if snapshot is not None:
                    return snapshot
        except FileNotFoundError as missing:
            raise FileNotFoundError(
                f"TLS material missing ({missing.filename}); run `streammesh pki init`"
            ) from missing
        raise ValueError(f"{self.key_file} is not the key of {self.certificate_file}")

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files as they are now (see `snapshot`)."""
        return channel_credentials(self.snapshot())


def parse_targets(text: str) -> tuple[str, ...]:
    """`host:port`, `dns:///name:port` or a comma-separated list of replicas as a tuple. A
    gRPC address list (`ipv4:a:1,b:2`) is kept whole: it is one target already."""
    text = text.strip()
    if text.startswith(("ipv4:", "ipv6:")):
        return (text,)
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _grpc_target(targets: Sequence[str]) -> str:
    """One gRPC target string: a single target as it is (gRPC resolves `host:port` and
    `dns:///` names itself), several replicas as an `ipv4:` or `ipv6:` address list."""
    if not targets:
        raise ValueError("no target: name a host:port, a dns:/// target or replica addresses")
    if len(targets) == 1:
        return targets[0]
    families = set()
    for target in targets:
        host, sep, port = target.rpartition(":")
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            address = None
        if address is None or not sep or not port.isdigit():
            raise ValueError(
                f"replica {target!r}: a list of replicas takes ip:port addresses (or [ipv6]:port);"
                " for a name that resolves to the replicas use one dns:///name:port target"
            )
        families.add(address.version)
    if len(families) > 1:
        raise ValueError("a list of replicas is either all IPv4 or all IPv6")
    return f"ipv{families.pop()}:" + ",".join(targets)


def _method_paths(services: Sequence[ServiceDescriptor]) -> dict[str, bool]:
    """`pkg.Service/Method` of every method of `services`, mapped to whether it is unary."""
    return {
        f"{service.full_name}/{method.name}": not (
            method.client_streaming or method.server_streaming
        )
        for service in services
        for method in service.methods
    }


@dataclass(frozen=True)
class MeshClientConfig:
    """Everything one mesh client needs: where the replicas are, how to trust them, what is
    called and how long a call may take."""

    server_name: str
    """The name the server's certificate must carry as a DNS SAN (the service's name, e.g.
    "storage"); it is also the channel's authority."""
    targets: tuple[str, ...]
    """One `host:port` or `dns:///name:port`, or several `ip:port` replicas."""
    tls: TlsFiles
    """The trust anchor and, on the internal listeners, this process's certificate."""
    services: tuple[ServiceDescriptor, ...]
    """The services called through this client; their protos say what is retried."""
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    """Deadline of a unary call that sets none: every unary call has one. Streams live as long
    as their caller wants and get none of their own (but never outlive the deadline of the
    call being handled: streammesh.mesh.deadlines)."""
    method_timeouts: Mapping[str, float] = field(default_factory=dict, hash=False)
    """Deadlines per method (`pkg.Service/Method`) that differ from `timeout_seconds`."""
    health_service: str | None = ""
    """The health service name replicas are checked for ("": the first of `services`; None:
    no health checking, every connected replica takes calls)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retry pacing and budget for the methods the protos declare safe to retry."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest message sent or received."""
    interceptors: tuple[grpc.aio.ClientInterceptor, ...] = ()
    """Client interceptors, outermost first; with several replicas they run per attempt."""
    ejection: EjectionPolicy = field(default_factory=EjectionPolicy)
    """When a replica of several is taken out of rotation (streammesh.mesh.ejection)."""
    max_in_flight: int | None = None
    """Unary calls in flight to this service at most; past it a call fails at once with
    UNAVAILABLE (streammesh.mesh.limits). None: no limit."""
    tls_reload_seconds: float | None = DEFAULT_TLS_RELOAD_SECONDS
    """How often the TLS files are checked for new material (new channels are swapped in
    when they changed: streammesh.mesh.channel_reload). None: never."""

    def __post_init__(self) -> None:
        _grpc_target(self.targets)
        paths = _method_paths(self.services)
        for path, seconds in self.method_timeouts.items():
            if path not in paths:
                raise ValueError(f"method_timeouts: {path!r} is not a method of this client")
            if not paths[path]:
                raise ValueError(f"method_timeouts: {path!r} is a stream (streams get none)")
            if seconds <= 0:
                raise ValueError(f"method_timeouts: {path!r} must be positive")
        if self.timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1 (None: no limit)")
        if self.tls_reload_seconds is not None and self.tls_reload_seconds <= 0:
            raise ValueError("tls_reload_seconds must be positive (None: no reload)")
        # Frozen all the way down: the mapping cannot change under a running client.
        object.__setattr__(self, "method_timeouts", MappingProxyType(dict(self.method_timeouts)))

    @property
    def target(self) -> str:
        """The gRPC target string of the replicas."""
        return _grpc_target(self.targets)

    @property
    def per_replica(self) -> bool:
        """Whether each replica gets a channel of its own (several replicas listed), so that
        the mesh client picks, ejects and retries across them; else one channel, which gRPC
        balances and retries over the addresses it resolves."""
        return len(self.targets) > 1

    def service_config(self) -> dict[str, Any]:
        """The service config of each channel (derived from the protos; see derived_config.py).
        A replica's own channel leaves unary retries to the mesh client."""
        health = self.health_service
        if health == "":
            health = self.services[0].full_name if self.services else None
        return derive_service_config(
            self.services,
            retry=self.retry,
            health_service=health,
            unary_retries=not self.per_replica,
        )

    def retried_codes(self) -> dict[str, frozenset[grpc.StatusCode]]:
        """The codes each unary method (`/pkg.Service/Method`) is retried on (the protos say)."""
        out = {}
        for service in self.services:
            for method in service.methods:
                codes = retryable_codes(method)
                if codes and not (method.client_streaming or method.server_streaming):
                    out[f"/{service.full_name}/{method.name}"] = frozenset(
                        grpc.StatusCode[code] for code in codes
                    )
        return out

    def timeouts(self) -> dict[str, float]:
        """The deadline of each unary method (`/pkg.Service/Method`, as gRPC names calls)."""
        out = {}
        for path, unary in _method_paths(self.services).items():
            if unary:
                out[f"/{path}"] = self.method_timeouts.get(path, self.timeout_seconds)
        return out


class MeshClient:
    """The channels to every replica of one service, with their service config, the picker
    that ejects and retries across replicas, the concurrency limit, deadlines and the
    interceptors. Close it (or use `async with`) when done."""

    def __init__(self, config: MeshClientConfig) -> None:
        self.config = config
        self.service_config = config.service_config()
        """The service config each channel was built with."""
        snapshot = config.tls.snapshot()
        options = channel_options(
            config.server_name, self.service_config, max_message_bytes=config.max_message_bytes
        )
        targets = config.targets if config.per_replica else (config.target,)
        # Tracing outermost (when on): its client span covers the attempt, the caller's
        # interceptors inside it. With several replicas each attempt is its own span.
        interceptors = [*default_tracing_interceptors(), *config.interceptors]

        def build(credentials: grpc.ChannelCredentials) -> list[grpc.aio.Channel]:
            return [
                grpc.aio.secure_channel(
                    target, credentials, options=options, interceptors=interceptors or None
                )
                for target in targets
            ]

        channels = build(channel_credentials(snapshot))
        self._channel = ReplicaChannel(
            channels,
            ejector=Ejector(len(channels), config.ejection),
            limit=ConcurrencyLimit(config.server_name, config.max_in_flight),
            retry=config.retry,
            retried_codes=config.retried_codes(),
            timeouts=config.timeouts(),
            retry_across_replicas=config.per_replica,
        )
        self.reloader: ChannelReloader | None = None
        """The watch over the TLS files (None: no reload configured, or no running loop
        when the client was made)."""
        if config.tls_reload_seconds is not None and _loop_running():
            self.reloader = ChannelReloader(
                config.server_name,
                config.tls.paths,
                self._channel,
                build,
                stamp=snapshot.stamp,
                interval=config.tls_reload_seconds,
            )
            self.reloader.start()

    @property
    def channel(self) -> ReplicaChannel:
        """The channel over every replica, for a caller that builds its own multi-callable
        (its calls are picked, retried, limited and timed as a stub's are)."""
        return self._channel

    def stub(self, stub_type: Callable[[grpc.aio.Channel], _Stub]) -> _Stub:
        """A generated stub (`XServiceStub`) over this client's channel."""
        return stub_type(self._channel)

    async def reload_tls(self) -> bool:
        """Check the TLS files now (as the poll does); whether new channels were swapped in."""
        if self.reloader is None:
            return False
        return await self.reloader.check()

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; calls still running get `grace` seconds (None: cancelled now)."""
        if self.reloader is not None:
            await self.reloader.close()
        await self._channel.close(grace)

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
