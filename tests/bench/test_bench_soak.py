"""`streammesh bench --soak` and the resource sampler: the summary arithmetic on given samples
(fast), /proc and Redis read for real (fast), and one short soak on the bench's own stack (slow).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from streammesh.cli.bench import add_bench_command, cmd_bench
from streammesh.cli.bench_resources import (
    ResourceSample,
    ResourceSampler,
    open_fds,
    redis_memory_line,
    resource_summary,
    rss_bytes,
)
from streammesh.cli.bench_soak import _line_kind, default_soak_warmup, soak_problems, soak_rate
from streammesh.cli.stack import START_ORDER
from tests.bench.configs import bench_test_config

MiB = 2**20


def _sample(at: float, rss: int, fds: int, redis: int | None) -> ResourceSample:
    return ResourceSample(at=at, phase="p", rss={"storage": rss}, fds={"storage": fds},
                          redis_used_memory=redis)  # fmt: skip


def test_summary_reports_first_last_max_growth_and_trend() -> None:
    # RSS rising 1 MiB a minute from 100 MiB, with one spike; Redis unknown in one sample.
    samples = [_sample(t * 6.0, 100 * MiB + t * MiB // 10, 20 + t % 2, 5 * MiB) for t in range(11)]
    samples[5] = _sample(30.0, 130 * MiB, 25, None)
    summary = resource_summary(samples, interval=6.0)
    storage = summary["services"]["storage"]
    assert storage["rss_bytes"] == {"first": 100 * MiB, "last": 101 * MiB, "max": 130 * MiB}
    assert storage["rss_growth_pct"] == pytest.approx(1.0, rel=1e-3)
    # The spike tilts the least-squares line only a little: about +1% a minute.
    assert 0.5 < storage["rss_trend_pct_per_min"] < 1.5
    assert storage["fds"] == {"first": 20, "last": 20, "max": 25}
    assert summary["redis_used_memory_bytes"] == {"first": 5 * MiB, "last": 5 * MiB, "max": 5 * MiB}
    assert (summary["samples"], summary["seconds"]) == (11, 60.0)
    line = redis_memory_line("closed loop", summary, bound_above_start=64 * MiB)
    assert "max 5.0 MiB against a bound of 69.0 MiB" in line  # the start plus what it allows
    empty = resource_summary([], interval=1.0)
    assert empty["services"] == {} and empty["redis_used_memory_bytes"]["max"] is None


async def test_sampler_reads_this_process_and_redis_and_labels_phases(redis_url: str) -> None:
    pid = os.getpid()
    before = open_fds(pid)
    assert before is not None and before > 0
    extra = os.open(os.devnull, os.O_RDONLY)
    try:
        assert open_fds(pid) == before + 1
    finally:
        os.close(extra)
    rss = rss_bytes(pid)
    assert rss is not None and rss > 10 * MiB
    gone = 2**22 + 1  # above the default pid_max: no such process
    assert rss_bytes(gone) is None and open_fds(gone) is None
    client = aioredis.Redis.from_url(redis_url)
    try:
        sampler = ResourceSampler({"me": pid, "gone": gone}, client, interval=0.05)
        async with sampler, sampler.phase("one"):
            await asyncio.sleep(0.3)
    finally:
        await client.aclose()
    one = sampler.of("one")
    assert len(one) >= 4  # start, end, and the background samples between
    assert all(s.rss["me"] and s.fds["me"] and s.rss["gone"] is None for s in one)
    assert all(s.redis_used_memory and s.redis_used_memory > 0 for s in one)
    assert [s.at for s in one] == sorted(s.at for s in one)


def test_soak_rate_is_seventy_percent_of_the_stored_rate_unless_given() -> None:
    rate, basis = soak_rate({"stored_eps": 30_000.0, "acked_eps": 60_000.0}, None)
    assert rate == pytest.approx(21_000.0) and "stored 30,000/s" in basis
    assert soak_rate({"stored_eps": 30_000.0}, 5_000.0) == (5_000.0, "--soak-rate")
    assert default_soak_warmup(600) == 60 and default_soak_warmup(20) == 2


def test_soak_flags_loss_and_what_counts_cannot_tell() -> None:
    fine = {"events": 10, "acked": 10, "stored": 10, "caught_up": True,
            "errors": {"stream_failed": None}}  # fmt: skip
    assert soak_problems(fine) == []
    assert soak_problems(fine | {"stored": 9}) == [
        "NOT STORED EXACTLY ONCE: soak: 10 sent, 10 acknowledged, 9 stored"
    ]
    failed = {"stream_failed": "Publish stream failed: UNAVAILABLE"}
    # Unacknowledged batches may or may not be stored: fewer stored than acked is still a loss.
    assert soak_problems(fine | {"acked": 8, "stored": 7, "errors": failed})[0].startswith(
        "NOT STORED EXACTLY ONCE"
    )
    (unknown,) = soak_problems(fine | {"acked": 8, "stored": 9, "errors": failed})
    assert (
        unknown.startswith("NOT CHECKED: soak: the Publish stream failed")
        and "UNAVAILABLE" in unknown
    )
    assert soak_problems(fine | {"acked": None, "errors": failed})[0].startswith("NOT CHECKED")


def test_log_lines_are_told_apart_by_level() -> None:
    assert _line_kind('{"level": "ERROR", "msg": "x"}') == "errors"
    assert _line_kind('{"level": "CRITICAL", "msg": "x"}') == "errors"
    assert _line_kind('{"level": "WARNING", "msg": "x"}') == "warnings"
    assert _line_kind('{"level": "INFO", "msg": "x"}') is None
    assert _line_kind("Traceback (most recent call last):") == "other"


def test_soak_flags_parse_and_default_to_no_soak() -> None:
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    plain = parser.parse_args(["bench"])
    assert (plain.soak, plain.soak_rate, plain.soak_warmup) == (0.0, None, None)
    given = parser.parse_args(
        ["bench", "--soak", "600", "--soak-rate", "9000", "--soak-warmup", "5"]
    )
    assert (given.soak, given.soak_rate, given.soak_warmup) == (600.0, 9000.0, 5.0)
    for bad in (["--soak", "-1"], ["--soak-rate", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", *bad])


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_short_soak_reports_real_resources_and_loses_nothing(
    tmp_path: Path,
    database_url: str,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Access tokens of 30 s and no leeway: the soak's stored count comes more than 30 s after
    # the login, so it passes only if the bench keeps its tokens fresh (as a 10-minute soak must).
    monkeypatch.setenv("STREAMMESH_AUTH_ACCESS_TOKEN_TTL_SECONDS", "30")
    monkeypatch.setenv("STREAMMESH_GATEWAY_TOKEN_LEEWAY_SECONDS", "0")
    config = bench_test_config(tmp_path, database_url, redis_url, uuid.uuid4().hex[:10])
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        [
            *("bench", "--rate", "500", "--warmup", "0", "--duration", "1"),
            *("--closed-duration", "2", "--closed-batch-size", "500", "--raw-events", "1000"),
            *("--soak", "30", "--soak-warmup", "2", "--json", str(out)),
            *("--variants", "none"),
            "--no-processing",  # test_bench_processing.py runs it
        ]
    )

    assert await cmd_bench(config, args) == 0
    report = json.loads(out.read_text())
    soak = report["soak"]

    # Offered 70% of the closed loop's stored rate, and every event of it stored exactly once.
    assert soak["offered_eps"] == pytest.approx(0.7 * report["closed_loop"]["stored_eps"])
    assert soak["events"] == soak["acked"] == soak["stored"] > 0 and soak["caught_up"]
    errors = soak["errors"]
    assert errors["stream_failed"] is None and errors["processes_gone"] == []
    assert errors["unacknowledged_batches"] == 0 and errors["dead_letters"] == 0
    assert set(errors["logs"]) == set(START_ORDER)
    # RSS and fds of every service, read from its process: real figures, start after warm-up.
    steady = soak["steady"]
    assert steady["samples"] >= 2 and steady["from_s"] >= 1
    assert set(steady["services"]) == set(START_ORDER)
    for name, entry in steady["services"].items():
        for figure in ("first", "last", "max"):
            assert entry["rss_bytes"][figure] > 10 * MiB, name
            assert entry["fds"][figure] > 0, name
        assert entry["rss_bytes"]["max"] >= entry["rss_bytes"]["last"], name
        assert math.isfinite(entry["rss_growth_pct"]), name
    assert isinstance(soak["flat"], bool)
    assert soak["timeline"] and all(row["acked_eps"] > 0 for row in soak["timeline"])
    # Every phase sampled; the closed loop's Redis max is a real figure.
    resources = report["resources"]
    assert {"open0", "closed", "soak", "raw", "run"} <= set(resources)
    assert _positive_number(resources["closed"]["redis_used_memory_bytes"]["max"])
    assert resources["soak"]["samples"] >= soak["seconds"] / resources["soak"]["interval_s"] / 2
    printed = capsys.readouterr().out
    assert "Redis used_memory during the closed loop: max" in printed
    assert "flat (RSS growth <= 10% per service after the warm-up)" in printed
