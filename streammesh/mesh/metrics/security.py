"""Security metrics, read at scrape time from the tallies the code keeps anyway (a
`collections.Counter` bumped where the refusal is decided and audited; nothing per call here).
No label carries a user name, a token or a secret: reasons and methods are fixed sets, and a
peer is named by its kind and service name from its SPIFFE id (a bounded set the PKI issues).

    streammesh_policy_denials_total{method,caller,reason}   calls the peer policy refused
    streammesh_auth_failures_total{action,reason}           failed auth attempts (login, ...)
    streammesh_auth_lockouts_total                          accounts locked by failures
    streammesh_auth_mfa_enrolments_total                    TOTP enrolments confirmed
    streammesh_gateway_token_refusals_total{reason}         access tokens the gateway refused
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "AuthEventsCollector",
    "PolicyDenialCollector",
    "TokenRefusalCollector",
    "caller_label",
    "snapshot",
]

K = TypeVar("K")

LOCKOUT_ACTION = "lockout"
"""The audit action of an account locked by repeated failures (services/auth/accounts.py)."""
MFA_ENROL_ACTION = "totp_enroll_confirm"
"""The audit action of a confirmed TOTP enrolment."""


def snapshot(counts: Mapping[K, int]) -> list[tuple[K, int]]:
    """The tally's items, copied in one step: the event loop adds keys while the /metrics
    thread reads, and `dict.copy` runs in C without releasing the GIL (iterating the live dict
    could see it change size)."""
    return list(dict.copy(counts).items())  # type: ignore[arg-type]


def caller_label(identity: str) -> str:
    """`spiffe://td/service/ingest` -> "service/ingest" (kind and name only; "" when the
    certificate was refused, so no identity was read)."""
    return identity.split("://", 1)[-1].partition("/")[2] if identity else ""


class PolicyDenialCollector(Collector):
    """A `DenialCounter`'s tally of (method, identity, reason) as a counter family."""

    def __init__(self, counts: Mapping[tuple[str, str, str], int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "streammesh_policy_denials",
            "Calls refused by the peer policy (default deny), by method, caller and reason.",
            labels=("method", "caller", "reason"),
        )
        merged: dict[tuple[str, str, str], int] = {}
        for (method, identity, reason), count in snapshot(self._counts):
            key = (method, caller_label(identity), reason)
            merged[key] = merged.get(key, 0) + count
        for labels, count in sorted(merged.items()):
            family.add_metric(labels, count)
        yield family


class AuthEventsCollector(Collector):
    """Auth's tally of audited account events, (action, outcome, reason) -> count, as failures
    by action and reason, lockouts and MFA enrolments."""

    def __init__(self, counts: Mapping[tuple[str, str, str], int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        failures = CounterMetricFamily(
            "streammesh_auth_failures",
            "Failed account attempts (login steps, enrolment, registration) by action and reason.",
            labels=("action", "reason"),
        )
        lockouts = enrolments = 0
        for (action, outcome, reason), count in sorted(snapshot(self._counts)):
            if action == LOCKOUT_ACTION:
                lockouts += count
            elif action == MFA_ENROL_ACTION and outcome == "success":
                enrolments += count
            elif outcome == "failure":
                failures.add_metric((action, reason), count)
        yield failures
        yield CounterMetricFamily(
            "streammesh_auth_lockouts",
            "Accounts locked after repeated failed attempts.",
            value=lockouts,
        )
        yield CounterMetricFamily(
            "streammesh_auth_mfa_enrolments",
            "TOTP enrolments confirmed (MFA turned on for a user).",
            value=enrolments,
        )


class TokenRefusalCollector(Collector):
    """The gateway's tally of refused access tokens by reason; every reason in `reasons` is
    reported from 0 on, so that a rate() sees the first refusal."""

    def __init__(self, counts: Mapping[str, int], reasons: Iterable[str] = ()) -> None:
        self._counts = counts
        self._reasons = tuple(reasons)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "streammesh_gateway_token_refusals",
            "Access tokens the gateway refused (UNAUTHENTICATED), by reason.",
            labels=("reason",),
        )
        counts = dict.fromkeys(self._reasons, 0) | dict(snapshot(self._counts))
        for reason, count in sorted(counts.items()):
            family.add_metric((reason,), count)
        yield family
