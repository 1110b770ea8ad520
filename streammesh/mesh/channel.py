"""The channel factory: mTLS with this service's own certificate, the peer pinned by name, and
load balancing, health checking, retries and timeouts declared in the gRPC service config.

New callers use `streammesh.mesh.client.MeshClient`, which derives the service config from the
protos. `service_config` (methods to retry listed by the caller, timeouts in the service config,
which grpcio shortens: see streammesh.mesh.derived_config) stays only for the processor's
storage client until it moves to MeshClient."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from streammesh.mesh.pki import TlsMaterial

__all__ = [
    "channel_options",
    "create_channel",
    "normalize_target",
    "service_config",
    "unary_methods",
]

DEFAULT_RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 4,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def unary_methods(descriptor: ServiceDescriptor) -> list[str]:
    """Names of a service's unary methods (the ones a default timeout may apply to)."""
    return [m.name for m in descriptor.methods if not (m.client_streaming or m.server_streaming)]


def service_config(
    service: str,
    *,
    retry_methods: Iterable[str] = (),
    unary_methods: Iterable[str] = (),
    timeout_seconds: float | None = None,
    health_checked: bool = True,
) -> dict[str, Any]:
    """Round-robin over every address of the target, skipping replicas whose health says
    NOT_SERVING; retry only the methods named (they must be idempotent); a default deadline
    for the unary methods named (retried ones included) but never for streams, which live as
    long as their caller wants; and retry throttling so retries stop when most calls fail."""
    retried = list(retry_methods)
    timed = [m for m in unary_methods if m not in retried]
    method_configs: list[dict[str, Any]] = []
    if retried:
        config_: dict[str, Any] = {
            "name": [{"service": service, "method": m} for m in retried],
            "retryPolicy": DEFAULT_RETRY_POLICY,
        }
        if timeout_seconds is not None:
            config_["timeout"] = f"{timeout_seconds}s"
        method_configs.append(config_)
    if timed and timeout_seconds is not None:
        method_configs.append(
            {
                "name": [{"service": service, "method": m} for m in timed],
                "timeout": f"{timeout_seconds}s",
            }
        )
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": method_configs,
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
    if health_checked:
        config["healthCheckConfig"] = {"serviceName": service}
    return config


def normalize_target(target: str) -> str:
    """Accept `host:port` or a comma-separated list of IPv4 `ip:port` replicas."""
    target = target.strip()
    if "," in target and not target.startswith(("ipv4:", "ipv6:", "dns:", "unix:")):
        return "ipv4:" + ",".join(part.strip() for part in target.split(","))
    return target


def create_channel(
    target: str,
    tls: TlsMaterial,
    *,
    server_name: str,
    config: dict[str, Any],
    max_message_bytes: int = 16 * 1024 * 1024,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """Open a channel to `target` that only trusts a server presenting `server_name` as a DNS
    SAN signed by our CA: the dev PKI puts each service's name in its own certificate only.
    `interceptors` are grpc.aio client interceptors, such as
    `streammesh.mesh.metrics.client_interceptors(metrics.grpc_client)`."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca,
        private_key=tls.private_key,
        certificate_chain=tls.certificate_chain,
    )
    options = channel_options(server_name, config, max_message_bytes=max_message_bytes)
    return grpc.aio.secure_channel(
        normalize_target(target),
        credentials,
        options=options,
        interceptors=list(interceptors) or None,
    )


def channel_options(
    server_name: str, config: dict[str, Any], *, max_message_bytes: int
) -> list[tuple[str, Any]]:
    """The channel arguments every mesh channel has: the server pinned by name, the service
    config, retries on, message limits, keepalive and a short reconnect backoff."""
    return [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.default_authority", server_name),
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # gRPC's default reconnect backoff grows to 120 s: after an upstream outage of a few
        # minutes calls would keep failing long after it is back. Cap it at a few seconds.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 3_000),
    ]
