"""The gRPC service config of a mesh channel, derived from the protos.

Which methods are safe to retry is declared once, in proto/: `option idempotency_level =
IDEMPOTENT` (a repeat leaves the state as one call would, perhaps with a side effect such as an
audit row) or `NO_SIDE_EFFECTS` (a plain read) on each such rpc, nothing on the others. This
module turns those options into the retry part of the service config (gRFC A6), so no call site
lists methods:

- A method is retried only when its level says it is safe, and only on the codes that are safe
  for its level (`RETRYABLE_CODES`): UNAVAILABLE, the one code that says "try another time or
  replica". Not DEADLINE_EXCEEDED (the deadline covers every attempt, there is no time left),
  not RESOURCE_EXHAUSTED (back-pressure: retrying it would defeat it), not ABORTED (no service
  answers it; a conflict is retried by whoever reads and writes again), not INTERNAL or UNKNOWN
  (a bug answers the same again).
- At most 5 attempts (gRPC's own cap), exponential backoff; gRPC jitters every backoff itself
  (each wait is uniformly random in [0, current backoff]), so no hand-written jitter is needed.
- `retryThrottling`: every failure costs a token, every success gives back `token_ratio`;
  below half of `max_tokens` no retries are made, so a backend that fails every call sees about
  the offered load, not `max_attempts` times it.
- Streams get a retry policy too when their level allows: gRPC retries a stream only until its
  first response arrives (the call is then committed), resending the messages it buffered.
- When a mesh client names several replicas, each gets a channel of its own and the unary
  retries leave the service config (`unary_retries=False`): gRPC would retry on the replica
  that just failed. The mesh client retries them on another replica with the same policy and
  one budget (streammesh.mesh.replicas); `retryable_codes` is the one source for both.

Timeouts are not put in the service config: grpcio (seen on 1.85.1, and reported as
grpc/grpc#34547 and #40633) cuts a service-config timeout by about 1.2-1.4 s, so a timeout of
1.2 s or less fails every call at once with DEADLINE_EXCEEDED and longer ones end early. The
mesh client applies per-method timeouts per call instead (streammesh.mesh.client), where
grpcio honours them exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.descriptor_pb2 import MethodOptions

__all__ = [
    "RETRYABLE_CODES",
    "RetryPolicy",
    "derive_service_config",
    "idempotency_level",
    "retryable_codes",
]

IDEMPOTENT = MethodOptions.IDEMPOTENT
NO_SIDE_EFFECTS = MethodOptions.NO_SIDE_EFFECTS

RETRYABLE_CODES: dict[int, tuple[str, ...]] = {
    NO_SIDE_EFFECTS: ("UNAVAILABLE",),
    IDEMPOTENT: ("UNAVAILABLE",),
}
"""The status codes retried for each idempotency level; a level not named is never retried."""

_MAX_ATTEMPTS_CAP = 5  # gRPC clamps larger values to 5 (gRFC A6)


@dataclass(frozen=True)
class RetryPolicy:
    """How retries are paced and budgeted (the same for every retried method of a channel)."""

    max_attempts: int = 4
    """Attempts per call, the first included (2..5)."""
    initial_backoff_seconds: float = 0.05
    """Upper bound of the first wait; each wait is random in [0, bound]."""
    max_backoff_seconds: float = 1.0
    """The bound stops growing here."""
    backoff_multiplier: float = 2.0
    """The bound grows by this factor per attempt."""
    throttle_max_tokens: int = 10
    """retryThrottling bucket size: retries stop below half of it."""
    throttle_token_ratio: float = 0.1
    """Tokens a success gives back (a failure costs one)."""
    attempt_timeout_seconds: float | None = None
    """Longest one attempt of a retried method may take when the mesh client retries across
    replicas (several listed); an attempt cut short by it is retried on another replica like
    an UNAVAILABLE one, within the call's deadline. Without it a replica that went silent (a
    partition: no reset, nothing until keepalive gives up) costs each call sent to it its
    whole deadline. gRPC's own retries have no such timeout: one channel ignores it. None: an
    attempt may use the call's whole deadline."""

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= _MAX_ATTEMPTS_CAP:
            raise ValueError(f"max_attempts must be 2..{_MAX_ATTEMPTS_CAP}: {self.max_attempts}")
        if not 0 < self.initial_backoff_seconds <= self.max_backoff_seconds:
            raise ValueError("backoffs must satisfy 0 < initial <= max")
        if self.backoff_multiplier <= 0:
            raise ValueError("backoff_multiplier must be positive")
        if not 0 < self.throttle_max_tokens <= 1000 or not self.throttle_token_ratio > 0:
            raise ValueError("throttle_max_tokens must be 1..1000, throttle_token_ratio > 0")
        if self.attempt_timeout_seconds is not None and not self.attempt_timeout_seconds > 0:
            raise ValueError("attempt_timeout_seconds must be positive (None: no limit)")

    def policy(self, codes: Sequence[str]) -> dict[str, Any]:
        """The `retryPolicy` object of a method config retrying `codes`."""
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": _duration(self.initial_backoff_seconds),
            "maxBackoff": _duration(self.max_backoff_seconds),
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(codes),
        }

    def throttling(self) -> dict[str, Any]:
        """The channel's `retryThrottling` object."""
        return {"maxTokens": self.throttle_max_tokens, "tokenRatio": self.throttle_token_ratio}


def _duration(seconds: float) -> str:
    # The JSON form of google.protobuf.Duration; at most 9 decimals, no exponent.
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def idempotency_level(method: MethodDescriptor) -> int:
    """The method's `idempotency_level` option (MethodOptions.IDEMPOTENCY_UNKNOWN when unset)."""
    level: int = method.GetOptions().idempotency_level
    return level


def retryable_codes(method: MethodDescriptor) -> tuple[str, ...]:
    """The codes a call of `method` is retried on; empty when it must not be retried."""
    return RETRYABLE_CODES.get(idempotency_level(method), ())


def derive_service_config(
    services: Iterable[ServiceDescriptor],
    *,
    retry: RetryPolicy | None = None,
    health_service: str | None = None,
    load_balancing: str = "round_robin",
    unary_retries: bool = True,
) -> dict[str, Any]:
    """The service config of a channel calling `services`: `load_balancing` over every address
    of the target, skipping replicas whose health for `health_service` is not SERVING (None:
    no health checking), a retry policy for each method its proto declares safe to retry (one
    method config per set of codes, every method named: never a whole service), and retry
    throttling. `unary_retries=False` leaves unary methods out of the retry policy: the channel
    of one replica of several, whose unary calls the mesh client retries on another replica
    (streammesh.mesh.replicas)."""
    retry = retry or RetryPolicy()
    by_codes: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for service in services:
        for method in service.methods:
            codes = retryable_codes(method)
            unary = not (method.client_streaming or method.server_streaming)
            if codes and (unary_retries or not unary):
                name = {"service": service.full_name, "method": method.name}
                by_codes.setdefault(codes, []).append(name)
    config: dict[str, Any] = {
        "loadBalancingConfig": [{load_balancing: {}}],
        "methodConfig": [
            {"name": names, "retryPolicy": retry.policy(codes)}
            for codes, names in sorted(by_codes.items())
        ],
        "retryThrottling": retry.throttling(),
    }
    if health_service is not None:
        config["healthCheckConfig"] = {"serviceName": health_service}
    return config
