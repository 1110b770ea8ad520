"""The processing workload of `streammesh bench`: 3 windows, 5 rules, the events they run over,
and the reference counts of what they must produce.

Pure data and arithmetic (no I/O, no service import), shared by the end-to-end phases
(bench_processing) and the engine measured alone in process (services/processor/engine_speed).

Every batch is background events (keys `key-<n % keys>`, a reading of 20-29.7, a site) plus one
scenario block on keys of its own that makes each rule fire exactly once per batch, whatever the
batch's timing: a reading of 5000 (threshold, level), 3 bursts (rate: 3 within 1 s, it starts over
after an alert), login then buy (relaxed sequence), an order never paid (absence, 1 s), and cart,
checkout, buy (strict sequence). An order followed by its payment must give no alert. So the
alerts are 5 per acknowledged batch, one per rule. The windows count every event, and their
results are counted by `expected_results` from the events' keys, sites and times.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from streammesh.streams import jump_hash

__all__ = [
    "ALERTS_PER_BATCH",
    "HORIZON_NANOS",
    "RULE_IDS",
    "SCENARIO_EVENTS",
    "WINDOW_IDS",
    "TimedEvent",
    "batch_payloads",
    "expected_results",
    "flush_keys",
    "rules",
    "windows",
]

SECOND = 1_000_000_000
TUMBLING = SECOND
HOP_SIZE, HOP_STEP = 5 * SECOND, SECOND
SESSION_GAP = 2 * SECOND
ABSENCE_WITHIN = SECOND
HORIZON_NANOS = HOP_SIZE + SECOND
"""How far past an event time the watermark must go (plus out-of-orderness) for every window
holding it to close and every absence waiting on it to fire."""
WINDOW_IDS = ("bench-tumbling", "bench-hopping", "bench-session")
RULE_IDS = ("bench-threshold", "bench-rate", "bench-sequence", "bench-absence", "bench-strict")
ALERTS_PER_BATCH = {rule: 1 for rule in RULE_IDS}
SITES = 7


def windows(event_type: str) -> list[dict[str, Any]]:
    """The 3 window documents (the gateway sets tenant and version)."""
    reading = "payload.reading"
    return [
        {"id": WINDOW_IDS[0], "event_type": event_type, "kind": "tumbling", "size": "1s",
         "aggregates": [{"name": "n", "fn": "count"},
                        {"name": "total", "fn": "sum", "field": reading}]},
        {"id": WINDOW_IDS[1], "event_type": event_type, "kind": "hopping", "size": "5s",
         "step": "1s", "group_by": "payload.site",
         "aggregates": [{"name": "n", "fn": "count"},
                        {"name": "avg", "fn": "mean", "field": reading},
                        {"name": "p99", "fn": "p99", "field": reading}]},
        {"id": WINDOW_IDS[2], "event_type": event_type, "kind": "session", "gap": "2s",
         "aggregates": [{"name": "n", "fn": "count"},
                        {"name": "high", "fn": "max", "field": reading}]},
    ]  # fmt: skip


def rules(event_type: str) -> list[dict[str, Any]]:
    """The 5 rule documents, one per kind and a strict sequence."""

    def kind(name: str) -> dict[str, Any]:
        return {"type": event_type, "where": [{"field": "payload.kind", "op": "eq", "value": name}]}

    return [
        {"id": RULE_IDS[0], "kind": "threshold", "mode": "level", "match": {"type": event_type},
         "field": "payload.reading", "op": "gt", "value": 1000},
        {"id": RULE_IDS[1], "kind": "rate", "match": kind("burst"), "count": 3, "within": "1s"},
        {"id": RULE_IDS[2], "kind": "sequence", "steps": [kind("login"), kind("buy")],
         "within": "10s"},
        {"id": RULE_IDS[3], "kind": "absence", "first": kind("order"), "absent": kind("pay"),
         "within": "1s"},
        {"id": RULE_IDS[4], "kind": "sequence", "contiguity": "strict",
         "steps": [kind("cart"), kind("checkout"), kind("buy")], "within": "10s",
         "scope": {"type": [event_type]}},
    ]  # fmt: skip


_SCENARIO: list[tuple[str, dict[str, Any]]] = [
    ("bench-thr", {"kind": "reading", "reading": 5000}),
    *[("bench-rate", {"kind": "burst"})] * 3,
    ("bench-seq", {"kind": "login"}),
    ("bench-seq", {"kind": "buy"}),
    ("bench-abs", {"kind": "order"}),
    ("bench-paid", {"kind": "order"}),
    ("bench-paid", {"kind": "pay"}),
    ("bench-str", {"kind": "cart"}),
    ("bench-str", {"kind": "checkout"}),
    ("bench-str", {"kind": "buy"}),
]
SCENARIO_EVENTS = len(_SCENARIO)


def batch_payloads(
    size: int, *, keys: int, offset: int, payload_bytes: int
) -> list[tuple[str, dict[str, Any], bytes]]:
    """(key, payload, payload as JSON of `payload_bytes` bytes) for one batch of `size` events:
    background events, the scenario block last (in id order, so in match order)."""
    if size < SCENARIO_EVENTS + 1:
        raise ValueError(f"a processing batch needs at least {SCENARIO_EVENTS + 1} events")
    rows: list[tuple[str, dict[str, Any]]] = []
    for index in range(size - SCENARIO_EVENTS):
        n = offset + index
        rows.append((f"key-{n % keys}", {"kind": "view", "reading": 20 + (n % 97) / 10}))
    rows += [(key, dict(payload)) for key, payload in _SCENARIO]
    out = []
    for index, (key, payload) in enumerate(rows):
        payload["site"] = f"site-{(offset + index) % SITES}"
        body = _json(payload)
        pad = max(0, payload_bytes - len(body) - len(',"pad":""'))
        out.append((key, payload, (body[:-1] + ',"pad":"' + "x" * pad + '"}').encode()))
    return out


def _json(payload: dict[str, Any]) -> str:
    parts = [f'"{k}":"{v}"' if isinstance(v, str) else f'"{k}":{v}' for k, v in payload.items()]
    return "{" + ",".join(parts) + "}"


@dataclass(frozen=True, slots=True)
class TimedEvent:
    key: str
    site: str
    event_time_nanos: int


def expected_results(events: Iterable[TimedEvent], partitions: int) -> dict[str, int]:
    """Final results (revision 0) each window emits over `events` once the watermark passed
    them all, counted straight from the definitions: tumbling per (key, second), hopping per
    (partition, site, start) for the 5 starts covering an event, a session per run of a key's
    events less than the gap apart."""
    tumbling: set[tuple[str, int]] = set()
    hopping: set[tuple[int, str, int]] = set()
    times: dict[str, list[int]] = defaultdict(list)
    partition_of: dict[str, int] = {}
    for e in events:
        t = e.event_time_nanos
        tumbling.add((e.key, t // TUMBLING))
        if (p := partition_of.get(e.key)) is None:
            p = partition_of[e.key] = jump_hash(e.key.encode(), partitions)
        last_start = t // HOP_STEP * HOP_STEP
        for start in range(last_start - HOP_SIZE + HOP_STEP, last_start + 1, HOP_STEP):
            hopping.add((p, e.site, start))
        times[e.key].append(t)
    sessions = 0
    for ts in times.values():
        ts.sort()
        sessions += 1 + sum(1 for a, b in itertools.pairwise(ts) if b - a >= SESSION_GAP)
    return {WINDOW_IDS[0]: len(tumbling), WINDOW_IDS[1]: len(hopping), WINDOW_IDS[2]: sessions}


def flush_keys(partitions: int) -> list[str]:
    """One key per partition (none of the workload's), for the events that move every
    partition's watermark past the workload's horizon."""
    found: dict[int, str] = {}
    for n in range(100_000):
        key = f"bench-flush-{n}"
        found.setdefault(jump_hash(key.encode(), partitions), key)
        if len(found) == partitions:
            return [found[p] for p in range(partitions)]
    raise ValueError(f"no key found for each of {partitions} partitions")
