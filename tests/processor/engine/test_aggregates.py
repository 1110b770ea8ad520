"""The sketches' stated error bounds, their merges and their snapshots."""

from __future__ import annotations

import math
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.processor.engine.aggregates import (
    DISTINCT_RELATIVE_STANDARD_ERROR,
    QUANTILE_RELATIVE_ACCURACY,
    Accumulator,
    AggregateLayout,
)
from services.processor.engine.events import EngineEvent
from services.processor.engine.window_defs import AggregateDef

QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
LAYOUT = AggregateLayout(
    [AggregateDef("n", "count"), AggregateDef("users", "distinct", "payload.user")]
    + [AggregateDef(name, name, "payload.x") for name in QUANTILES]
    + [AggregateDef(fn, fn, "payload.x") for fn in ("sum", "min", "max", "mean")]
)


def _event(x: object, user: object = "u") -> EngineEvent:
    return EngineEvent(
        id="e", key="k", type="t", event_time_nanos=0, payload={"x": x, "user": user}
    )


def _filled(values: list[float]) -> Accumulator:
    accumulator = LAYOUT.new()
    for value in values:
        accumulator.add(_event(value))
    return accumulator


def _assert_within_alpha(values: list[float], accumulator: Accumulator) -> None:
    ordered = sorted(values)
    result = LAYOUT.values(accumulator)
    for name, q in QUANTILES.items():
        # DDSketch's guarantee is for the lower empirical quantile, rank floor(q * (n - 1)).
        true = ordered[math.floor(q * (len(ordered) - 1))]
        estimate = result[name]
        assert estimate is not None
        assert abs(estimate - true) <= QUANTILE_RELATIVE_ACCURACY * abs(true) + 1e-12, (name, q)


@pytest.mark.parametrize(
    "draw",
    [
        lambda rng: rng.lognormvariate(3, 1.5),
        lambda rng: rng.uniform(-1_000, 1_000),
        lambda rng: rng.paretovariate(1.2),
        lambda rng: rng.expovariate(1e-6),
        lambda rng: float(rng.randrange(0, 5)),
    ],
    ids=["lognormal", "uniform-signed", "pareto", "exponential", "few-values-with-zero"],
)
def test_quantiles_are_within_the_relative_accuracy_on_generated_data(draw: object) -> None:
    rng = random.Random(11)
    values = [draw(rng) for _ in range(20_000)]  # type: ignore[operator]
    _assert_within_alpha(values, _filled(values))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e12, 1e12, allow_nan=False), min_size=1, max_size=300))
def test_quantiles_are_within_the_relative_accuracy_for_any_data(values: list[float]) -> None:
    _assert_within_alpha(values, _filled(values))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200),
    st.integers(1, 6),
)
def test_merged_sketches_equal_one_sketch_of_all_values(values: list[float], parts: int) -> None:
    whole = _filled(values)
    merged = LAYOUT.new()
    for index in range(parts):
        merged.merge_from(_filled(values[index::parts]))
    expected, got = LAYOUT.values(whole), LAYOUT.values(merged)
    for name in (*QUANTILES, "n", "min", "max", "users"):
        assert got[name] == expected[name]
    assert math.isclose(got["sum"] or 0, expected["sum"] or 0, rel_tol=1e-9, abs_tol=1e-6)


@pytest.mark.parametrize("cardinality", [1_000, 20_000, 100_000])
def test_distinct_counts_are_within_three_standard_errors(cardinality: int) -> None:
    # Three relative standard errors hold for 99.7 % of estimates; the data is fixed, so this
    # test is deterministic (the hash has a fixed seed).
    accumulator = LAYOUT.new()
    for index in range(cardinality):
        accumulator.add(_event(1.0, f"user-{index}"))
        if index % 3 == 0:
            accumulator.add(_event(1.0, f"user-{index}"))  # repeats do not count
    estimate = LAYOUT.values(accumulator)["users"]
    assert estimate is not None
    assert abs(estimate - cardinality) <= 3 * DISTINCT_RELATIVE_STANDARD_ERROR * cardinality


def test_small_distinct_counts_are_exact_and_typed() -> None:
    accumulator = LAYOUT.new()
    for user in ["a", "b", "a", 1, "1", 1.5, None, True]:
        accumulator.add(_event(0, user))
    # None is no value; the string "1" and the number 1 differ; True counts as a value.
    assert LAYOUT.values(accumulator)["users"] == 6


def test_non_numbers_are_not_measured() -> None:
    accumulator = LAYOUT.new()
    for value in [1, "2", None, True, math.inf, math.nan, 3.5, {"a": 1}]:
        accumulator.add(_event(value))
    result = LAYOUT.values(accumulator)
    assert (result["n"], result["sum"], result["min"], result["max"]) == (8, 4.5, 1, 3.5)
    assert result["mean"] == 2.25


def test_an_empty_field_gives_none() -> None:
    accumulator = LAYOUT.new()
    accumulator.add(_event("x"))
    result = LAYOUT.values(accumulator)
    assert result["n"] == 1
    assert all(result[name] is None for name in ("sum", "min", "max", "mean", *QUANTILES))


def test_a_snapshot_restores_the_same_state_and_goes_on_identically() -> None:
    rng = random.Random(3)
    values = [rng.uniform(-100, 1e6) for _ in range(5_000)]
    original = _filled(values[:4_000])
    state = orjson.loads(orjson.dumps(original.snapshot()))
    restored = Accumulator.restore(LAYOUT, state)
    assert LAYOUT.values(restored) == LAYOUT.values(original)
    for value in values[4_000:]:
        original.add(_event(value, str(value)))
        restored.add(_event(value, str(value)))
    assert LAYOUT.values(restored) == LAYOUT.values(original)
    assert restored.snapshot() == original.snapshot()


def test_huge_integers_do_not_break_a_snapshot() -> None:
    accumulator = _filled([2**62, 2**62, 2**62])
    state = orjson.loads(orjson.dumps(accumulator.snapshot()))
    assert LAYOUT.values(Accumulator.restore(LAYOUT, state))["sum"] == float(3 * 2**62)
