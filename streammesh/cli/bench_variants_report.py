"""What `streammesh bench --variants` computes from its loops and prints beside the base figures:
each variant's stored rate, its ratio to the reference loop and mesh/raw, CPU per event per
service; the costs of validation, metrics and tracing against the targets of issues 9 and 12;
and the insert cost of today's table against the pre-issue-9 one. Speed never sets the exit
code; an acknowledged event not stored (or refused by the schema) does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from streammesh.cli.bench_phases import MEASURED

__all__ = [
    "PATH",
    "VARIANT_TARGETS",
    "loop_cpu",
    "render_variants",
    "variant_costs",
    "variant_problems",
]

SPEED_ISSUE_MESH_OVER_RAW = (0.61, 0.68)
"""mesh/raw of the speed issue's two runs (README), before validation was measured."""
VARIANT_TARGETS = {
    "validation_us_per_event_max": 3.0,
    "metrics_cost_max": 0.03,
    "tracing_1pct_cost_max": 0.05,
    # Issue 9: tenants + partitioning + validation lower mesh/raw by at most 10%.
    "mesh_over_raw_validation_min": round(0.9 * SPEED_ISSUE_MESH_OVER_RAW[0], 3),
}
ON_THE_BASE_STACK = ("base", "json", "validation")
"""Loops run on the stack as the base phases left it; the others on a restarted one, compared
with the reference loop run on it (base_restarted)."""
LABELS = {
    "base": "reference (base settings)",
    "base_restarted": "reference, restarted",
    "json": "order JSON, no schema",
    "validation": "order JSON, validated",
    "metrics_off": "metrics off",
    "tracing_1pct": "tracing 1% (file)",
    "tracing_100pct": "tracing 100% (file)",
}
PATH = (*MEASURED, "redis", "pg_own")
"""The event path's own CPU: the four services, Redis (the bench's: only they use it) and
storage's own Postgres backends. Unlike the whole machine's (or the postgres row: every process
of the server), it leaves other work on a shared machine out, so a feature's cost shows in it
where the rates drift with the neighbours' load."""
ROWS = (*PATH, "path", "machine")
HEADINGS = {"pg_own": "pg own", "path": "path"}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b or math.isnan(a) or math.isnan(b) else a / b


def loop_cpu(loop: Mapping[str, Any] | None, row: str) -> float | None:
    """CPU us/event of one row: a process, `pg_own` (storage's own Postgres backends) or
    `path` (the sum of PATH, None when one is unknown)."""
    if loop is None:
        return None
    if row == "path":
        parts = [loop_cpu(loop, name) for name in PATH]
        return None if None in parts else sum(part for part in parts if part is not None)
    if row == "pg_own":
        value = loop.get("storage_backends_cpu_us_per_event")
    else:
        value = loop["cpu_us_per_event"].get(row)
    return None if value is None or math.isnan(value) else float(value)


def _less(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _share(on: float | None, off: float | None) -> float | None:
    """What a feature adds, as a share of the figure with it on."""
    added = _less(on, off)
    return None if added is None or not on else added / on


def variant_costs(variants: Mapping[str, Any], raw: Mapping[str, Any]) -> dict[str, Any]:
    """The figures the targets speak of. Rate costs are the share of the stored rate a feature
    takes: metrics 1 - on/off (the reference has them on), tracing 1 - traced/reference; CPU
    costs the event path's own us/event the feature adds, and that as a share of the path's
    CPU with the feature on."""
    loops, legacy = variants["loops"], variants.get("legacy")
    ref = loops.get("base_restarted", loops.get("base"))  # the restarted variants' reference

    def rate(name: str) -> float | None:
        loop = loops.get(name)
        return None if loop is None else float(loop["stored_eps"])

    def rate_cost(on: str, off: str) -> float | None:
        share = _ratio(rate(on), rate(off))
        return None if share is None else 1 - share

    reference = "base_restarted" if "base_restarted" in loops else "base"
    costs: dict[str, Any] = {
        "validation_us_per_event": _less(
            loop_cpu(loops.get("validation"), "ingest"), loop_cpu(loops.get("json"), "ingest")
        ),
        "metrics_cost": rate_cost(reference, "metrics_off"),
        "metrics_path_us_per_event": _less(
            loop_cpu(ref, "path"), loop_cpu(loops.get("metrics_off"), "path")
        ),
        "metrics_path_share": _share(
            loop_cpu(ref, "path"), loop_cpu(loops.get("metrics_off"), "path")
        ),
        "mesh_over_raw_validation": _ratio(rate("validation"), raw["stored_eps"]),
        "mesh_over_legacy_raw_validation": _ratio(
            rate("validation"), None if legacy is None else legacy["stored_eps"]
        ),
    }
    for key in ("tracing_1pct", "tracing_100pct"):
        costs[f"{key}_cost"] = rate_cost(key, reference)
        on, off = loop_cpu(loops.get(key), "path"), loop_cpu(ref, "path")
        costs[f"{key}_path_us_per_event"] = _less(on, off)
        costs[f"{key}_path_share"] = _share(on, off)
    for name, loop in loops.items():
        own = "base" if name in ON_THE_BASE_STACK else reference
        loop["over_reference"] = _ratio(rate(name), rate(own))
        loop["mesh_over_raw"] = _ratio(rate(name), raw["stored_eps"])
    figures = {
        "validation_us_per_event_max": costs["validation_us_per_event"],
        "metrics_cost_max": costs["metrics_cost"],
        "tracing_1pct_cost_max": costs["tracing_1pct_cost"],
        "mesh_over_raw_validation_min": costs["mesh_over_raw_validation"],
    }
    costs["targets_met"] = {
        name: None if value is None else
        value >= VARIANT_TARGETS[name] if name.endswith("_min") else value <= VARIANT_TARGETS[name]
        for name, value in figures.items()
    }  # fmt: skip
    return costs


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:{spec}}"


def _met(costs: Mapping[str, Any], name: str) -> str:
    ok = costs["targets_met"].get(name)
    return "" if ok is None else "(met)" if ok else "(MISSED)"


def render_variants(variants: Mapping[str, Any], raw: Mapping[str, Any]) -> list[str]:
    loops, costs, t = variants["loops"], variants["costs"], VARIANT_TARGETS
    lines = [
        "",
        f"variants: closed loops of {variants['duration_s']:g}s each (streams, window and batches "
        "as the closed loop's); x ref: stored rate over the reference loop's of the same stack "
        "(the first, or the restarted one below it); mesh/raw over the raw path's",
    ]
    if loops:
        lines.append(
            f"  {'':<27}{'stored/s':>9}{'x ref':>7}{'mesh/raw':>9}  CPU us/event "
            + " ".join(f"{HEADINGS.get(row, row)[:9]:>9}" for row in ROWS)
        )
    for name, loop in loops.items():
        lines.append(
            f"  {LABELS.get(name, name):<27}{_num(loop['stored_eps'], ',.0f'):>9}"
            f"{_num(loop['over_reference'], '.3f'):>7}{_num(loop['mesh_over_raw'], '.2f'):>9}"
            f"  {'':12} " + " ".join(f"{_num(loop_cpu(loop, row), '.1f'):>9}" for row in ROWS)
        )
    if "validation" in loops:
        lines.append(
            f"  validation: {_num(costs['validation_us_per_event'], '.2f')} us/event in ingest "
            f"(validated minus unvalidated, same payloads; schema version "
            f"{variants.get('schema_version', '-')})   target <= "
            f"{t['validation_us_per_event_max']:g} {_met(costs, 'validation_us_per_event_max')}"
        )
        lines.append(
            f"  mesh/raw validated: {_num(costs['mesh_over_raw_validation'], '.2f')} (over the "
            f"pre-issue-9 raw path: {_num(costs['mesh_over_legacy_raw_validation'], '.2f')})   "
            f"issue 9: >= {t['mesh_over_raw_validation_min']:g} (10% below "
            f"{SPEED_ISSUE_MESH_OVER_RAW[0]}) {_met(costs, 'mesh_over_raw_validation_min')}"
        )
    if "metrics_off" in loops:
        lines.append(
            f"  metrics cost: {_pct(costs['metrics_cost'])} of the stored rate; "
            f"{_num(costs['metrics_path_us_per_event'], '+.1f')} us/event, "
            f"{_pct(costs['metrics_path_share'])} of the path's CPU   "
            f"target <= {t['metrics_cost_max']:.0%} {_met(costs, 'metrics_cost_max')}"
        )
    for key, target in (("tracing_1pct", "tracing_1pct_cost_max"), ("tracing_100pct", None)):
        if key in loops:
            spans = sum(loops[key].get("spans_written", {}).values())
            aim = f"   target <= {t[target]:.0%} {_met(costs, target)}" if target else ""
            lines.append(
                f"  {LABELS[key]} cost: {_pct(costs[f'{key}_cost'])} of the stored rate; "
                f"{_num(costs[f'{key}_path_us_per_event'], '+.1f')} us/event, "
                f"{_pct(costs[f'{key}_path_share'])} of the path's CPU ({spans:,} spans "
                f"written){aim}"
            )
    if loops:
        lines.append(
            "  (path: the event path's own CPU, the sum of the columns before it (pg own: "
            "storage's own Postgres backends); machine: other tenants' work too)"
        )
    if variants.get("legacy"):
        lines += _legacy_lines(raw, variants["legacy"])
    if variants.get("error"):
        lines.append(f"  variants stopped early: {variants['error']}")
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _legacy_lines(raw: Mapping[str, Any], legacy: Mapping[str, Any]) -> list[str]:
    def row(label: str, phase: Mapping[str, Any]) -> str:
        return (
            f"    {label:<52}{_num(phase['stored_eps'], ',.0f'):>10}"
            f"{_num(phase['own_backends_cpu_us_per_event'], '.1f'):>14}"
            f"{phase['stored']:>12,}"
        )

    return [
        f"  insert cost, raw path (issue 9) {'':<26}rows/s  backend us/ev      events",
        row("today: tenants, day partitions, event_ids", raw),
        row("pre-issue-9: one table keyed by id, no tenant", legacy),
    ]


def variant_problems(variants: Mapping[str, Any] | None) -> list[str]:
    """Acknowledged events not stored exactly once (or refused) in a variant, and a variant run
    that stopped early; each worded for `correctness` to print."""
    if variants is None:
        return []
    problems = []
    for name, loop in variants["loops"].items():
        if loop["acked"] != loop["stored"]:
            problems.append(
                f"NOT STORED EXACTLY ONCE: variant {name}: {loop['acked']} acknowledged, "
                f"{loop['stored']} stored"
            )
        if loop.get("refused_events"):
            problems.append(f"variant {name}: {loop['refused_events']} events refused by ingest")
    legacy = variants.get("legacy")
    if legacy and not legacy["events"] == legacy["stored"] == legacy["counted"]:
        problems.append(
            f"NOT STORED EXACTLY ONCE: legacy raw path: {legacy['events']} written, "
            f"{legacy['stored']} stored"
        )
    if variants.get("error"):
        problems.append(f"variants stopped early: {variants['error']}")
    return problems
