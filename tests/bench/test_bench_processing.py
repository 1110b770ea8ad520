"""`streammesh bench`'s processing part: the workload's reference counts (fast), and one tiny run
of the bench with it on its own stack (slow): the figures printed, and the alerts and window
results that came back equal to the reference computed from the acknowledged batches.
"""

from __future__ import annotations

import argparse
import json
import math
import uuid
from pathlib import Path

import pytest

from streammesh.cli import bench_workload as workload
from streammesh.cli.bench import add_bench_command, cmd_bench
from tests.bench.configs import bench_test_config

S = workload.SECOND


def test_reference_counts_each_window_kind_from_the_definitions() -> None:
    events = [
        workload.TimedEvent("a", "s1", 10 * S),  # tumbling [10,11); hopping starts 6..10
        workload.TimedEvent("a", "s1", 10 * S + S // 2),  # same windows, same session
        workload.TimedEvent("a", "s2", 12 * S + S // 2),  # a gap of exactly 2 s: a new session
        workload.TimedEvent("b", "s1", 11 * S),
    ]
    counts = workload.expected_results(events, partitions=1)
    assert counts["bench-tumbling"] == 3  # (a,10) (a,12) (b,11)
    # s1: starts 6..11 (6 windows); s2: starts 8..12 (5 windows).
    assert counts["bench-hopping"] == 11
    assert counts["bench-session"] == 3


def test_every_processing_batch_has_the_scenario_block_at_its_end() -> None:
    rows = workload.batch_payloads(40, keys=8, offset=0, payload_bytes=128)
    assert len(rows) == 40 and all(len(raw) == 128 for _, _, raw in rows)
    assert [json.loads(raw)["site"] for _, _, raw in rows] == [p["site"] for _, p, _ in rows]
    tail = [key for key, _, _ in rows[-workload.SCENARIO_EVENTS :]]
    assert tail[0] == "bench-thr" and all(key.startswith("bench-") for key in tail)
    with pytest.raises(ValueError, match="at least"):
        workload.batch_payloads(workload.SCENARIO_EVENTS, keys=8, offset=0, payload_bytes=128)


@pytest.mark.slow
async def test_tiny_bench_run_prints_processing_figures_and_exact_counts(
    tmp_path: Path, database_url: str, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = bench_test_config(tmp_path, database_url, redis_url, uuid.uuid4().hex[:10])
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        [
            *("bench", "--rate", "500", "--warmup", "0", "--duration", "1"),
            *("--closed-duration", "1", "--closed-batch-size", "500", "--raw-events", "1000"),
            *("--processing-rate", "1000", "--engine-events", "3000", "--json", str(out)),
        ]
    )

    assert await cmd_bench(config, args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())["processing"]

    for line in ("engine alone, one core:", "closed loop with processing:", "processing CPU",
                 "alert on SubscribeAlerts", "window result stored"):  # fmt: skip
        assert line in printed, line
    assert report["engine_alone"]["events"] == 3000 and report["engine_alone"]["alerts"] > 0
    assert math.isfinite(report["stored_ratio"]) and report["stored_ratio"] > 0
    opened = report["open_loop"]
    batches = opened["acked_batches"]
    assert batches == 1000 // 100 and opened["acked"] == opened["stored"] == 1000
    alerts, results = opened["alerts"], opened["window_results"]
    assert alerts["expected"] == {rule: batches for rule in workload.RULE_IDS}
    assert alerts["received"] == alerts["expected"] and alerts["distinct"] == alerts["total"]
    assert results["received"] == results["expected"] and results["distinct"] == results["total"]
    assert results["unexpected"] == 0 and min(results["expected"].values()) > 0
    assert opened["alert_ms"]["count"] == 5 * batches
    assert opened["window_result_stored_ms"]["count"] == results["total"]
