"""`streammesh bench --variants`: the order payloads and the flag (fast), the cost arithmetic
on given loops (fast), and one tiny run of every variant on the bench's own stack (slow): the
figures are there and every acknowledged event of every variant was stored.
"""

from __future__ import annotations

import argparse
import json
import math
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from streammesh.cli.bench import add_bench_command, cmd_bench
from streammesh.cli.bench_variants import ORDER_SCHEMA, VARIANTS, order_payload
from streammesh.cli.bench_variants_report import render_variants, variant_costs
from tests.bench.configs import bench_test_config

LOOPS = (
    *("base", "json", "validation"),
    *("base_restarted", "metrics_off", "tracing_1pct", "tracing_100pct"),
)
COSTS = (
    "validation_us_per_event",
    "metrics_cost",
    "metrics_path_us_per_event",
    "metrics_path_share",
    "tracing_1pct_cost",
    "tracing_100pct_cost",
    "tracing_1pct_path_us_per_event",
    "tracing_100pct_path_share",
    "mesh_over_raw_validation",
    "mesh_over_legacy_raw_validation",
)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_order_payloads_are_100_bytes_and_match_the_schema() -> None:
    validator = jsonschema.Draft202012Validator(ORDER_SCHEMA)
    payloads = [order_payload(n) for n in (0, 1, 7, 99_999, 123_456_789)]
    assert {len(p) for p in payloads} == {100}
    assert all(validator.is_valid(json.loads(p)) for p in payloads)
    assert len(set(payloads)) == len(payloads)


def test_variants_flag_takes_names_all_or_none() -> None:
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    assert parser.parse_args(["bench"]).variants == list(VARIANTS)
    assert parser.parse_args(["bench", "--variants", "none"]).variants == []
    assert parser.parse_args(["bench", "--variants", "tracing, legacy"]).variants == [
        "tracing",
        "legacy",
    ]
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--variants", "tracing,speed"])


def _loop(stored_eps: float, ingest: float, path: float) -> dict[str, Any]:
    """A loop whose event path costs `path` us/event: ingest's, the rest in storage's backends."""
    cpu = dict.fromkeys(("gateway", "processor", "storage", "redis"), 0.0)
    return {
        "stored_eps": stored_eps,
        "cpu_us_per_event": cpu | {"ingest": ingest, "machine": path + 40.0},
        "storage_backends_cpu_us_per_event": path - ingest,
    }


def test_costs_are_shares_of_the_rate_and_cpu_differences() -> None:
    loops = {
        "base": _loop(50_000, 5.0, 30.0),
        "json": _loop(52_000, 4.5, 29.0),
        "validation": _loop(48_000, 6.5, 31.0),
        "metrics_off": _loop(51_000, 4.9, 29.5),
        "tracing_1pct": _loop(49_000, 5.2, 30.4),
    }
    legacy = {"stored_eps": 120_000, "own_backends_cpu_us_per_event": 12.5, "stored": 9000}
    raw = {"stored_eps": 80_000, "own_backends_cpu_us_per_event": 14.0, "stored": 9000}
    variants = {"duration_s": 30, "loops": loops, "legacy": legacy}
    costs = variant_costs(variants, raw)
    assert costs["validation_us_per_event"] == pytest.approx(2.0)
    assert costs["metrics_cost"] == pytest.approx(1 - 50 / 51)
    assert costs["metrics_path_us_per_event"] == pytest.approx(0.5)
    assert costs["metrics_path_share"] == pytest.approx(0.5 / 30)
    assert costs["tracing_1pct_cost"] == pytest.approx(0.02)
    assert costs["tracing_100pct_cost"] is None  # not run
    assert costs["mesh_over_raw_validation"] == pytest.approx(0.6)
    assert costs["mesh_over_legacy_raw_validation"] == pytest.approx(0.4)
    assert costs["targets_met"] == {
        "validation_us_per_event_max": True,
        "metrics_cost_max": True,
        "tracing_1pct_cost_max": True,
        "mesh_over_raw_validation_min": True,
    }
    assert loops["validation"]["over_reference"] == pytest.approx(0.96)
    variants["costs"] = costs
    text = "\n".join(render_variants(variants, raw))
    assert "validation: 2.00 us/event in ingest" in text
    assert "metrics cost: 2.0% of the stored rate" in text
    assert "tracing 1% (file) cost: 2.0% of the stored rate" in text

    # With a reference run on the restarted stack, the restarted variants are compared with it.
    loops["base_restarted"] = _loop(49_000, 5.0, 30.2)
    costs = variant_costs(variants, raw)
    assert costs["metrics_cost"] == pytest.approx(1 - 49 / 51)
    assert costs["tracing_1pct_cost"] == pytest.approx(0.0)
    assert costs["tracing_1pct_path_us_per_event"] == pytest.approx(0.2)
    assert loops["json"]["over_reference"] == pytest.approx(1.04)  # still the first stack's
    assert loops["metrics_off"]["over_reference"] == pytest.approx(51 / 49)
    assert [
        line.split()[-3:]
        for line in text.splitlines()
        if "event_ids" in line or "keyed by id" in line
    ] == [["80,000", "14.0", "9,000"], ["120,000", "12.5", "9,000"]]


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_tiny_run_of_every_variant_reports_its_figures_and_stores_every_event(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    run = uuid.uuid4().hex[:10]
    config = bench_test_config(tmp_path, database_url, redis_url, run)
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        [
            *("bench", "--rate", "500", "--warmup", "0", "--duration", "0.5"),
            *("--closed-duration", "1", "--variant-duration", "1"),
            *("--closed-batch-size", "200", "--raw-events", "2000", "--json", str(out)),
        ]
    )

    assert await cmd_bench(config, args) == 0
    report = json.loads(out.read_text())

    variants = report["variants"]
    assert "error" not in variants
    assert tuple(variants["loops"]) == LOOPS
    for name, loop in variants["loops"].items():
        assert loop["acked"] > 0 and loop["acked"] == loop["stored"], name
        assert loop.get("refused_events", 0) == 0, name
        assert _finite(loop["stored_eps"]) and _finite(loop["over_reference"]), name
        for process in ("gateway", "ingest", "processor", "storage", "machine"):
            assert _finite(loop["cpu_us_per_event"][process]), (name, process)
    for name in COSTS:
        assert _finite(variants["costs"][name]), name
    assert variants["schema_version"] == 1
    # Tracing ran: at 100% sampling the services wrote spans to their files.
    assert sum(variants["loops"]["tracing_100pct"]["spans_written"].values()) > 0
    legacy = report["variants"]["legacy"]
    assert legacy["events"] == legacy["stored"] == legacy["counted"] == 2000
    assert _finite(legacy["own_backends_cpu_us_per_event"]) and _finite(legacy["stored_eps"])
    assert not (config.state_dir / "bench" / "spans").exists()
