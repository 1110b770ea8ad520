"""The report's analysis: figures per topic and findings ranked by impact, computed from one
Observation only (pure: no I/O), so that every statement can be traced to a measured figure.

Sections: throughput, latency, clustering, persistence, security. A finding names its figure;
severities rank as critical (acknowledged data can be lost, or an open door), high, medium, low.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from streammesh.cli.report.observe import Observation
from streammesh.cli.status_metrics import Reading, figures
from streammesh.mesh.policy_file import HOSTED, PolicyFile

__all__ = ["SEVERITIES", "Analysis", "Finding", "analyse"]

SEVERITIES = ("critical", "high", "medium", "low")
CERT_WARNING = dt.timedelta(hours=6)  # as the shipped TLSCertificateExpiresSoon alert
KEY_AGE_WARNING = dt.timedelta(days=90)
PIPELINE = ("gateway", "ingest", "processor", "storage")


@dataclass(frozen=True)
class Finding:
    severity: str
    title: str
    figure: str
    """The measured figure the finding rests on, as shown to the reader."""
    recommendation: str


@dataclass
class Analysis:
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """Per topic, (figure, value) lines in reading order."""
    findings: list[Finding] = field(default_factory=list)
    cpu_us_per_event: dict[str, float] = field(default_factory=dict)
    ack_to_stored_ms: dict[str, float] = field(default_factory=dict)
    partitions_by_replica: dict[str, int] = field(default_factory=dict)
    events_in_per_second: float | None = None
    stored_per_second: float | None = None

    def ranked(self) -> list[Finding]:
        return sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity))


def _delta(seen: Observation, replica: str, metric: str) -> float | None:
    before, after = seen.before.get(replica), seen.after.get(replica)
    if before is None or after is None:
        return None
    end, start = after.total(metric), before.total(metric)
    return None if end is None else end - (start or 0.0)


def _sum_delta(seen: Observation, metric: str) -> float | None:
    values = [_delta(seen, s.name, metric) for s in seen.replicas]
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _throughput(seen: Observation, out: Analysis) -> None:
    window = seen.window_seconds
    accepted = _sum_delta(seen, "streammesh_ingest_events_accepted_total")
    stored = _sum_delta(seen, "streammesh_storage_events_stored_total")
    lines = out.sections.setdefault("throughput", [])
    lines.append(("window", f"{window:.1f} s"))
    if accepted is None or stored is None:
        lines.append(("events/s", "not measured: ingest's or storage's /metrics did not answer"))
        return
    out.events_in_per_second, out.stored_per_second = accepted / window, stored / window
    lines.append(
        (
            "events/s acknowledged (in)",
            f"{accepted / window:,.0f}/s ({accepted:,.0f} in the window)",
        )
    )
    lines.append(("events/s stored", f"{stored / window:,.0f}"))
    refused = _sum_delta(seen, "streammesh_ingest_events_refused_total") or 0.0
    busy = _sum_delta(seen, "streammesh_ingest_backpressure_refusals_total") or 0.0
    lines.append(
        ("events refused (schema) / batches refused (busy)", f"{refused:,.0f} / {busy:,.0f}")
    )
    cpu_by_service: dict[str, float] = defaultdict(float)
    busiest: tuple[float, str] = (0.0, "")
    for state in seen.replicas:
        cpu = _delta(seen, state.name, "process_cpu_seconds_total")
        if cpu is None:
            continue
        cpu_by_service[state.service] += cpu
        busiest = max(busiest, (cpu / window, state.name))
    if stored > 0:
        # Auth is not a stage of the event path: its CPU is logins and token work.
        out.cpu_us_per_event = {
            s: c / stored * 1e6 for s, c in cpu_by_service.items() if s in PIPELINE
        }
        for service, us in sorted(out.cpu_us_per_event.items(), key=lambda kv: -kv[1]):
            lines.append((f"CPU per stored event: {service}", f"{us:.1f} us"))
        bottleneck = max(out.cpu_us_per_event, key=out.cpu_us_per_event.__getitem__)
        lines.append(("bottleneck stage (most CPU per event)", bottleneck))
    if busiest[1]:
        share, name = busiest
        # One Python process runs its event loop on one core: that core is its ceiling.
        headroom = (1.0 / share) if share > 0 else float("inf")
        lines.append(
            ("busiest process", f"{name} at {share:.0%} of a core (headroom x{headroom:.1f})")
        )
        cores = os.cpu_count() or 1
        total = sum(cpu_by_service.values()) / window
        lines.append(
            ("stack's services", f"{total:.2f} of {cores} cores (Redis/PostgreSQL not counted)")
        )
        if share > 0.8:
            out.findings.append(
                Finding(
                    "high",
                    f"{name} is near its one-core ceiling",
                    f"{share:.0%} of a core over the window, {stored / window:,.0f} events/s stored",
                    f"add replicas of {name.split('@')[0]} (`streammesh up --replicas ...`)",
                )
            )
    if accepted > 0 and stored < 0.9 * accepted:
        out.findings.append(
            Finding(
                "medium",
                "storage falls behind ingest",
                f"{stored / window:,.0f} stored/s against {accepted / window:,.0f} acknowledged/s",
                "look at the processor's lag and storage's CPU; add processor/storage replicas",
            )
        )


def _latency(seen: Observation, out: Analysis) -> None:
    lines = out.sections.setdefault("latency", [])
    out.ack_to_stored_ms = dict(seen.ack_to_stored_ms)
    if seen.ack_to_stored_ms:
        text = ", ".join(f"{q} {ms:.1f}" for q, ms in seen.ack_to_stored_ms.items())
        lines.append((f"ack-to-stored ms ({seen.stored_in_window:,} events stored)", text))
        p99 = seen.ack_to_stored_ms.get("p99", 0.0)
        if p99 > 1000:
            out.findings.append(
                Finding(
                    "medium",
                    "events take over a second from acknowledgement to storage",
                    f"ack-to-stored p99 {p99:,.0f} ms",
                    "check the processor's lag and storage's insert time; add replicas",
                )
            )
    else:
        lines.append(("ack-to-stored", seen.gaps.get("postgres", "no event stored in the window")))
    for state in seen.replicas:
        if state.service != "gateway":
            continue
        measured = figures(seen.before.get(state.name), seen.after.get(state.name))
        if measured.p99_seconds is not None:
            lines.append((f"{state.name} unary p99", f"{measured.p99_seconds * 1000:.1f} ms"))
    lines.append(
        (
            "per-hop split",
            "not measured by the report yet: use the traces (streammesh.mesh.tracing)",
        )
    )


def _clustering(seen: Observation, out: Analysis) -> None:
    lines = out.sections.setdefault("clustering", [])
    by_service: dict[str, list[str]] = defaultdict(list)
    for state in seen.replicas:
        by_service[state.service].append(f"{state.name} {state.health}")
    for service, members in by_service.items():
        lines.append((f"{service} replicas", ", ".join(members)))
    for state in seen.replicas:
        reading: Reading | None = seen.after.get(state.name)
        owned = reading.total("streammesh_processor_partitions_owned") if reading else None
        if state.service == "processor" and owned is not None:
            out.partitions_by_replica[state.name] = int(owned)
    if out.partitions_by_replica:
        counts = list(out.partitions_by_replica.values())
        lines.append(
            (
                "partitions owned",
                ", ".join(f"{r} {n}" for r, n in out.partitions_by_replica.items()),
            )
        )
        lines.append(("ownership balance (max - min)", str(max(counts) - min(counts))))
        if max(counts) - min(counts) > 1:
            out.findings.append(
                Finding(
                    "low",
                    "partitions are unevenly owned",
                    f"owned per processor: {counts}",
                    "the leases rebalance on their own within a lease time; if it lasts, check "
                    "the processor replicas' logs",
                )
            )
    takeovers = _sum_delta(seen, "streammesh_processor_takeovers_total")
    if takeovers is not None:
        lines.append(("takeovers in the window (rebalances)", f"{takeovers:.0f}"))
    unhealthy = [s.name for s in seen.replicas if s.health != "SERVING"]
    if unhealthy:
        out.findings.append(
            Finding(
                "high",
                "replicas are not serving",
                ", ".join(unhealthy),
                "read their logs (`<state>/logs/<replica>.log`); `streammesh up` restarts them",
            )
        )


def _backlog(seen: Observation) -> int | None:
    """Unacknowledged events in the queue now: the max per partition over ingest replicas."""
    per_partition: dict[str, float] = {}
    for reading in seen.after.values():
        if reading is None:
            continue
        for labels, value in reading.samples.get("streammesh_queue_unacked_events", ()):
            key = labels.get("partition", "")
            per_partition[key] = max(per_partition.get(key, 0.0), value)
    return int(sum(per_partition.values())) if per_partition else None


def _persistence(seen: Observation, out: Analysis) -> None:
    lines = out.sections.setdefault("persistence", [])
    backlog = _backlog(seen)
    rate = out.events_in_per_second or 0.0
    lines.append(
        (
            "backlog (queued, not yet stored)",
            "not measured" if backlog is None else f"{backlog:,} events",
        )
    )
    redis = seen.redis
    if not redis:
        lines.append(("Redis", seen.gaps.get("redis", "not measured")))
    else:
        aof, fsync = redis["appendonly"], redis["appendfsync"]
        lines.append(
            (
                "Redis appendonly / appendfsync / save",
                f"{aof} / {fsync} / {redis['save'] or '(none)'}",
            )
        )
        if aof != "yes":
            queued = "the whole backlog" if backlog is None else f"{backlog:,} events"
            out.findings.append(
                Finding(
                    "critical",
                    "Redis keeps the queue in memory only: a Redis restart loses acknowledged events",
                    f"appendonly {aof}; backlog now {queued}",
                    "CONFIG SET appendonly yes (and appendfsync everysec) and put it in redis.conf",
                )
            )
            lines.append(
                (
                    "a Redis crash or restart would lose",
                    f"every queued event ({'?' if backlog is None else f'{backlog:,}'})",
                )
            )
        else:
            at_risk = {"always": 0.0, "everysec": 1.0}.get(fsync, 30.0)
            lines.append(
                (
                    "a Redis process crash would lose",
                    "nothing (the AOF is written on every command)",
                )
            )
            lines.append(
                (
                    "a power loss would lose",
                    f"up to ~{at_risk:g} s of acknowledged events (~{rate * at_risk:,.0f} at the measured rate)",
                )
            )
            if fsync == "no":
                out.findings.append(
                    Finding(
                        "high",
                        "Redis leaves fsync to the OS: a power loss can lose ~30 s of acknowledged events",
                        f"appendfsync no; ~{rate * 30:,.0f} events at the measured rate",
                        "CONFIG SET appendfsync everysec",
                    )
                )
    pg = seen.postgres
    if not pg:
        lines.append(("PostgreSQL", seen.gaps.get("postgres", "not measured")))
        return
    lines.append(
        (
            "PostgreSQL fsync / synchronous_commit / full_page_writes",
            f"{pg['fsync']} / {pg['synchronous_commit']} / {pg['full_page_writes']}",
        )
    )
    if pg["fsync"] != "on":
        out.findings.append(
            Finding(
                "critical",
                "PostgreSQL runs without fsync: a power loss can corrupt or lose stored events",
                "fsync off",
                "set fsync = on in postgresql.conf",
            )
        )
    if pg["synchronous_commit"] == "off":
        out.findings.append(
            Finding(
                "high",
                "PostgreSQL acknowledges commits before they are durable",
                f"synchronous_commit off: up to ~0.6 s of stored events (~{(out.stored_per_second or 0) * 0.6:,.0f}) on a power loss, already removed from the queue",
                "set synchronous_commit = on",
            )
        )


def _security(seen: Observation, out: Analysis, policy: PolicyFile | None) -> None:
    lines = out.sections.setdefault("security", [])
    open_doors = [p.replica for p in seen.listeners if not p.plaintext_refused]
    anonymous = [
        p.replica
        for p in seen.listeners
        if not p.anonymous_tls_refused and not p.replica.startswith("gateway")
    ]
    lines.append(
        (
            "listeners probed",
            f"{len(seen.listeners)} ({len(open_doors)} accept plaintext, {len(anonymous)} internal ones accept a peer without a certificate)",
        )
    )
    for replica in open_doors + anonymous:
        out.findings.append(
            Finding(
                "critical",
                f"{replica} accepts a peer it should refuse",
                "plaintext accepted"
                if replica in open_doors
                else "TLS without a client certificate accepted",
                "run every internal service with mTLS only (the default); check its settings",
            )
        )
    now = seen.taken_at
    for cert in seen.certificates:
        left = cert.not_after - now
        lines.append(
            (
                f"certificate {cert.name}",
                f"age {(now - cert.not_before).days} d, expires in {left.total_seconds() / 3600:,.1f} h",
            )
        )
        if left < CERT_WARNING:
            out.findings.append(
                Finding(
                    "critical" if left.total_seconds() <= 0 else "high",
                    f"certificate {cert.name} {'has expired' if left.total_seconds() <= 0 else 'expires soon'}",
                    f"not after {cert.not_after:%Y-%m-%d %H:%M}Z",
                    "re-issue the certificates (`streammesh pki init --force` on a stopped stack)",
                )
            )
    if policy is not None:
        total = sum(len(policy.uncovered(name)) for name in HOSTED)
        lines.append(
            ("peer policy", f"{policy.path}: {total} internal methods without a written decision")
        )
    if seen.users is None:
        lines.append(("accounts", seen.gaps.get("accounts", "not read")))
    else:
        _accounts(seen, out, lines)
    for metric, label in (
        ("streammesh_gateway_token_refusals_total", "token refusals"),
        ("streammesh_policy_denials_total", "policy denials"),
        ("streammesh_auth_failures_total", "failed logins"),
    ):
        value = _sum_delta(seen, metric)
        if value is not None:
            lines.append((f"{label} in the window", f"{value:,.0f}"))


def _accounts(seen: Observation, out: Analysis, lines: list[tuple[str, str]]) -> None:
    users: list[dict[str, Any]] = seen.users or []
    active = [u for u in users if not u["disabled"]]
    without_mfa = [u for u in active if not u["mfa_enabled"]]
    locked = [u for u in active if u["locked_until"] and u["locked_until"] > seen.taken_at]
    lines.append(
        (
            "accounts (active)",
            f"{len(active)}, {len(without_mfa)} without MFA, {len(locked)} locked",
        )
    )
    if without_mfa:
        names = ", ".join(f"{u['tenant']}/{u['username']}" for u in without_mfa[:10])
        privileged = [u for u in without_mfa if set(u["roles"]) & {"admin", "tenant-admin"}]
        out.findings.append(
            Finding(
                "high" if privileged else "medium",
                f"{len(without_mfa)} active account(s) without a second factor",
                names + (" ..." if len(without_mfa) > 10 else ""),
                "have them enrol TOTP (`streammesh mfa enroll`); they cannot log in until they do",
            )
        )
    for key in seen.signing_keys or []:
        if key["active"] and key["created_at"]:
            age = seen.taken_at - key["created_at"]
            lines.append(("active signing key", f"{key['kid']}, {age.days} d old"))
            if age > KEY_AGE_WARNING:
                out.findings.append(
                    Finding(
                        "medium",
                        "the token-signing key is old",
                        f"{key['kid']} is {age.days} days old",
                        "rotate it: `streammesh admin rotate-key`",
                    )
                )


def analyse(seen: Observation, policy: PolicyFile | None = None) -> Analysis:
    out = Analysis()
    _throughput(seen, out)
    _latency(seen, out)
    _clustering(seen, out)
    _persistence(seen, out)
    _security(seen, out, policy)
    return out
