"""Measure the quantile and distinct-count sketch libraries the window engine could keep.

For each candidate: CPU time per single-value update from a Python loop (the engine's per-event
path), serialized size after 1,000 and 100,000 values (checkpoint cost), whether two sketches
merge (hopping panes and session merges need it), and the worst error on p50/p95/p99 of a
lognormal sample (relative error |q_est - q_true| / q_true, and rank error). Not a test: the
machine is shared, so compare the rows of one run, not figures across runs.

    .venv/bin/pip install fastdigest pytdigest   # the t-digest candidates, not dependencies
    .venv/bin/python scripts/bench_sketches.py
"""

from __future__ import annotations

import importlib
import random
import time
from collections.abc import Callable
from typing import Any

import datasketches
from ddsketch import DDSketch
from ddsketch.pb.proto import DDSketchProto

QUANTILES = (0.5, 0.95, 0.99)


def _true_quantile(ordered: list[float], q: float) -> float:
    # The lower empirical quantile (rank ceil(q*n)), the definition DDSketch's bound refers to.
    index = max(0, min(len(ordered) - 1, int(q * (len(ordered) - 1))))
    return ordered[index]


def _rank_error(ordered: list[float], estimate: float, q: float) -> float:
    import bisect

    rank = bisect.bisect_left(ordered, estimate) / len(ordered)
    return abs(rank - q)


class Candidate:
    def __init__(
        self,
        name: str,
        new: Callable[[], Any],
        add: Callable[[Any, float], None],
        quantile: Callable[[Any, float], float],
        serialize: Callable[[Any], bytes],
        merge: Callable[[Any, Any], None] | None,
    ) -> None:
        self.name, self.new, self.add, self.quantile = name, new, add, quantile
        self.serialize, self.merge = serialize, merge


def _candidates() -> list[Candidate]:
    def dd_new() -> DDSketch:
        return DDSketch(relative_accuracy=0.01)

    def pt_serialize(sketch: Any) -> bytes:
        return bytes(sketch.get_centroids().tobytes())

    candidates = [
        Candidate(
            "ddsketch (alpha=0.01, pure Python)",
            dd_new,
            lambda s, v: s.add(v),
            lambda s, q: s.get_quantile_value(q),
            lambda s: DDSketchProto.to_proto(s).SerializeToString(),
            lambda a, b: a.merge(b),
        ),
        Candidate(
            "datasketches kll_doubles (k=200)",
            lambda: datasketches.kll_doubles_sketch(200),
            lambda s, v: s.update(v),
            lambda s, q: s.get_quantile(q),
            lambda s: s.serialize(),
            lambda a, b: a.merge(b),
        ),
        Candidate(
            "datasketches req_floats (k=12)",
            lambda: datasketches.req_floats_sketch(12),
            lambda s, v: s.update(v),
            lambda s, q: s.get_quantile(q),
            lambda s: s.serialize(),
            lambda a, b: a.merge(b),
        ),
        Candidate(
            "datasketches tdigest_double (k=100)",
            lambda: datasketches.tdigest_double(100),
            lambda s, v: s.update(v),
            lambda s, q: s.get_quantile(q),
            lambda s: s.serialize(),
            lambda a, b: a.merge(b),
        ),
    ]
    fastdigest = _optional("fastdigest")
    if fastdigest is not None:
        candidates.append(
            Candidate(
                "fastdigest TDigest",
                lambda: fastdigest.TDigest(),
                lambda s, v: s.update(v),
                lambda s, q: s.quantile(q),
                lambda s: s.to_bytes(),
                lambda a, b: a.merge_inplace(b),
            )
        )
    pytdigest = _optional("pytdigest")
    if pytdigest is not None:
        candidates.append(
            Candidate(
                "pytdigest TDigest (delta=100)",
                lambda: pytdigest.TDigest(100),
                lambda s, v: s.update(v),
                lambda s, q: s.inverse_cdf(q),
                pt_serialize,
                lambda a, b: pytdigest.TDigest.combine(a, b),
            )
        )
    return candidates


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        print(f"({name} not installed: its row is left out)")
        return None


def _measure(candidate: Candidate, values: list[float]) -> str:
    sketch = candidate.new()
    add = candidate.add
    started = time.process_time_ns()
    for value in values:
        add(sketch, value)
    per_update_ns = (time.process_time_ns() - started) / len(values)
    small = candidate.new()
    for value in values[:1000]:
        add(small, value)
    ordered = sorted(values)
    relative = max(
        abs(candidate.quantile(sketch, q) - _true_quantile(ordered, q)) / _true_quantile(ordered, q)
        for q in QUANTILES
    )
    rank = max(_rank_error(ordered, candidate.quantile(sketch, q), q) for q in QUANTILES)
    merge_note = "no"
    if candidate.merge is not None:
        half_a, half_b = candidate.new(), candidate.new()
        for value in values[: len(values) // 2]:
            add(half_a, value)
        for value in values[len(values) // 2 :]:
            add(half_b, value)
        started = time.process_time_ns()
        merged = candidate.merge(half_a, half_b)
        merge_us = (time.process_time_ns() - started) / 1000
        target = half_a if merged is None else merged
        merged_rel = max(
            abs(candidate.quantile(target, q) - _true_quantile(ordered, q))
            / _true_quantile(ordered, q)
            for q in QUANTILES
        )
        merge_note = f"yes, {merge_us:.0f} us, rel err after {merged_rel:.4f}"
    return (
        f"{candidate.name:38} {per_update_ns:7.0f} ns/update  "
        f"{len(candidate.serialize(small)):6d} B @1k  {len(candidate.serialize(sketch)):6d} B @{len(values) // 1000}k  "
        f"rel err {relative:.4f}  rank err {rank:.4f}  merge: {merge_note}"
    )


def _hll(values: list[str]) -> str:
    sketch = datasketches.hll_sketch(12, datasketches.HLL_8)
    started = time.process_time_ns()
    for value in values:
        sketch.update(value)
    per_update_ns = (time.process_time_ns() - started) / len(values)
    union = datasketches.hll_union(12)
    union.update(sketch)
    true = len(set(values))
    estimate = sketch.get_estimate()
    return (
        f"{'datasketches hll_sketch (lg_k=12, HLL_8)':38} {per_update_ns:7.0f} ns/update  "
        f"{len(sketch.serialize_compact()):6d} B compact  distinct {true} est {estimate:.0f} "
        f"(rel {abs(estimate - true) / true:.4f}; RSE 1.04/sqrt(4096) = {1.04 / 64:.4f})  merge: hll_union"
    )


def main() -> None:
    rng = random.Random(7)  # noqa: S311 - benchmark data, not secrets
    values = [rng.lognormvariate(3.0, 1.0) for _ in range(100_000)]
    for candidate in _candidates():
        print(_measure(candidate, values), flush=True)
    print(_hll([f"user-{rng.randrange(30_000)}" for _ in range(100_000)]))


if __name__ == "__main__":
    main()
