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
from typing import Any

import pytest

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.cli import bench_workload as workload
from streammesh.cli.bench import add_bench_command, cmd_bench
from streammesh.cli.bench_processing import _TimedBatches, _Watermarks
from streammesh.cli.bench_processing_report import processing_problems
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
            *("--variants", "none"),  # test_bench_variants.py runs them
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


def _counts(expected: dict[str, int], received: dict[str, int], total: int) -> dict[str, Any]:
    return {"expected": expected, "received": received, "distinct": sum(received.values()),
            "total": total, "unexpected": 0}  # fmt: skip


def test_a_count_off_the_reference_fails_the_run() -> None:
    right = {"bench-threshold": 3}
    opened = {
        "acked": 300, "stored": 300, "subscription_errors": [],
        "alerts": _counts(right, right, 3),
        "window_results": _counts({"bench-session": 2}, {"bench-session": 2}, 2),
    }  # fmt: skip
    report = {"closed_loop": {"acked": 10, "stored": 10}, "open_loop": opened}
    assert processing_problems(report) == [] and processing_problems(None) == []
    opened["alerts"] = _counts(right, {"bench-threshold": 2}, 2)  # one missing
    opened["window_results"] = _counts({"bench-session": 2}, {"bench-session": 2}, 3)  # doubled
    problems = processing_problems(report)
    assert len(problems) == 2 and "1 doubled" in problems[1], problems


def test_the_watermark_is_reached_by_the_first_batch_past_time_plus_lag() -> None:
    marks = _Watermarks(partitions=2, ooo_ns=2 * S)
    marks.add({0, 1}, 10 * S, 100.0)
    marks.add({0}, 12 * S, 101.0)
    marks.add({0, 1}, 11 * S, 102.0)  # not a new maximum for partition 0
    assert marks.reached(0, 10 * S) == 101.0 and marks.reached(1, 9 * S) == 102.0
    assert marks.reached(0, 8 * S) == 100.0 and marks.reached(1, 10 * S) is None


def test_a_resent_batch_keeps_its_event_time() -> None:
    events = [event_pb2.Event(key="k", type="t", payload=b"{}") for _ in range(3)]
    timed = _TimedBatches([events], "run1q", offset_ns=5 * S)
    first = timed.stamp(7)
    assert timed.stamp(8) != first and timed.stamp(7) == first
    sent = gateway_pb2.PublishRequest.FromString(first)
    assert [e.id for e in sent.events] == [f"run1q-{7:010d}-{i:04d}" for i in range(3)]
    assert sent.events[0].event_time.ToNanoseconds() == timed.times[7]
