"""Aggregates of one window (or one pane of a hopping window): exact count, sum, min, max and
mean, distinct counts from HyperLogLog and quantiles from DDSketch.

Sketch choice (measured by scripts/bench_sketches.py, 100,000 lognormal values, one run on the
shared 2-core machine; compare rows, not runs):

    library                             update  size @1k  size @100k  p50/p95/p99 rel err  merge
    ddsketch DDSketch (alpha=0.01)      358 ns    3.1 kB     4.1 kB   0.0093               exact
    datasketches kll_doubles (k=200)     81 ns    2.6 kB     4.7 kB   0.0211, 0.1759 (*)   random
    datasketches req_floats (k=12)      676 ns    1.4 kB     5.3 kB   0.0163, 0.0099 (*)   random
    datasketches tdigest_double (100)   111 ns    1.6 kB     2.3 kB   0.0450               approx
    fastdigest TDigest                  110 ns   14.1 kB    16.1 kB   0.0004               approx
    pytdigest TDigest (delta=100)      1486 ns    0.7 kB     1.0 kB   0.0087               approx
    (*) two runs over the same seeded data: KLL and REQ compact with random coin flips.

Quantiles use DDSketch (the `ddsketch` package, kept by Datadog) although KLL and t-digest
update faster, because of what the engine needs beyond speed:
- a deterministic bound: every quantile q is within `QUANTILE_RELATIVE_ACCURACY` (1 %) of the
  true value, |q_est - q_true| <= alpha * |q_true|, for any data and any number of merges
  (KLL's bound is on the rank, and probabilistic; t-digest has none);
- exact merges: a DDSketch is a count per logarithmic bucket, so merging the panes of a hopping
  window or two sessions gives the very sketch of the union;
- determinism: the result does not depend on insertion order, merge order or randomness (KLL
  and REQ compact with random coin flips, see (*), t-digest depends on order), so replaying the same events
  from a restored snapshot gives the same quantiles, bit for bit, which exactly-once result
  identities rely on.
Its per-update cost (about 0.4 us) fits the engine's budget of 5 us per event for all windows.

Distinct counts use Apache DataSketches' HLL (`datasketches.hll_sketch`, lg_k = 12, HLL_8):
77 ns per update, deterministic hashing, mergeable through `hll_union`, 4 kB at most when
serialized (much less for few values, where it is exact). Its relative standard error is
1.04 / sqrt(2^12) = 1.625 % (`DISTINCT_RELATIVE_STANDARD_ERROR`); 99.7 % of estimates fall
within three of those.

Snapshots are plain JSON-able lists (floats round-trip exactly through orjson), the DDSketch
bins as (offset, counts) and the HLL in its compact binary form, base64-encoded.
"""

from __future__ import annotations

import binascii
import math
from collections.abc import Callable, Sequence
from typing import Any

import datasketches
from ddsketch.ddsketch import BaseDDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.store import DenseStore

from services.processor.engine.events import EngineEvent, compile_field_path
from services.processor.engine.window_defs import AggregateDef

__all__ = [
    "DISTINCT_LG_K",
    "DISTINCT_RELATIVE_STANDARD_ERROR",
    "QUANTILE_RELATIVE_ACCURACY",
    "Accumulator",
    "AggregateLayout",
]

QUANTILE_RELATIVE_ACCURACY = 0.01
"""DDSketch's alpha: each reported quantile is within 1 % of the true one."""
DISTINCT_LG_K = 12
DISTINCT_RELATIVE_STANDARD_ERROR = 1.04 / math.sqrt(2**DISTINCT_LG_K)
"""HLL's relative standard error for lg_k = 12 (1.625 %)."""

_QUANTILE_OF = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
_NUMERIC_FNS = {"sum", "min", "max", "mean", "p50", "p95", "p99"}
# One mapping shared by every sketch: building it costs logarithms, and merging requires equal
# parameters, which sharing guarantees.
_MAPPING = LogarithmicMapping(QUANTILE_RELATIVE_ACCURACY)


def _new_sketch() -> BaseDDSketch:
    return BaseDDSketch(_MAPPING, DenseStore(), DenseStore(), 0.0)


def _store_state(store: DenseStore) -> list[Any]:
    # Trimmed to the non-empty bins: the same counts give the same bytes whatever the layout
    # the store grew into (a restored store grows differently).
    bins = store.bins
    used = [index for index, weight in enumerate(bins) if weight]
    if not used:
        return [0, []]
    return [store.offset + used[0], bins[used[0] : used[-1] + 1]]


def _restore_store(state: list[Any]) -> DenseStore:
    store = DenseStore()
    offset, bins = state
    # Through the store's public add, so the restored store is a valid one whatever its layout.
    for index, weight in enumerate(bins):
        if weight:
            store.add(offset + index, weight)
    return store


def _json_number(value: float | int) -> float | int:
    # A snapshot holds 64-bit integers at most; a sum of huge integers is kept as a float.
    if type(value) is int and not -(2**63) <= value < 2**63:
        return float(value)
    return value


def _distinct_token(value: Any) -> str:
    # Strings as themselves; other JSON scalars typed, so the string "1" and the number 1 differ.
    return value if type(value) is str else "\x00" + repr(value)


class AggregateLayout:
    """The compiled shape of one definition's aggregates: which fields are read, which need
    a sketch, and how a finished accumulator becomes named values."""

    __slots__ = (
        "_names",
        "_outputs",
        "count_only",
        "distinct_accessors",
        "numeric_accessors",
        "sketched",
    )

    def __init__(self, aggregates: Sequence[AggregateDef]) -> None:
        numeric: list[str] = []
        distinct: list[str] = []
        quantile_fields: set[str] = set()
        for aggregate in aggregates:
            if aggregate.field is None:
                continue
            if aggregate.fn in _NUMERIC_FNS and aggregate.field not in numeric:
                numeric.append(aggregate.field)
            if aggregate.fn == "distinct" and aggregate.field not in distinct:
                distinct.append(aggregate.field)
            if aggregate.fn in _QUANTILE_OF:
                quantile_fields.add(aggregate.field)
        self.numeric_accessors: tuple[Callable[[EngineEvent], Any], ...] = tuple(
            compile_field_path(field) for field in numeric
        )
        self.sketched = tuple(field in quantile_fields for field in numeric)
        self.distinct_accessors: tuple[Callable[[EngineEvent], Any], ...] = tuple(
            compile_field_path(field) for field in distinct
        )
        self.count_only = not numeric and not distinct
        self._names = tuple(aggregate.name for aggregate in aggregates)
        """Nothing but the count: the operators then add an event with `count += 1`."""
        self._outputs = tuple(
            (
                aggregate.name,
                aggregate.fn,
                numeric.index(aggregate.field)
                if aggregate.fn in _NUMERIC_FNS and aggregate.field is not None
                else distinct.index(aggregate.field)
                if aggregate.fn == "distinct" and aggregate.field is not None
                else -1,
            )
            for aggregate in aggregates
        )

    def new(self) -> Accumulator:
        return Accumulator(self)

    def values(self, accumulator: Accumulator) -> dict[str, float | int | None]:
        """The named results; None where no event had a numeric value for the field."""
        if self.count_only:
            return dict.fromkeys(self._names, accumulator.count)
        out: dict[str, float | int | None] = {}
        for name, fn, index in self._outputs:
            if fn == "count":
                out[name] = accumulator.count
            elif fn == "distinct":
                out[name] = round(accumulator.distinct[index].hll.get_estimate())
            else:
                stat = accumulator.numeric[index]
                if stat.n == 0:
                    out[name] = None
                elif fn == "sum":
                    out[name] = stat.total
                elif fn == "min":
                    out[name] = stat.low
                elif fn == "max":
                    out[name] = stat.high
                elif fn == "mean":
                    out[name] = stat.total / stat.n
                else:
                    assert stat.sketch is not None
                    out[name] = stat.sketch.get_quantile_value(_QUANTILE_OF[fn])
        return out


class _Numeric:
    """n, sum, min and max of one numeric field (and its sketch when a quantile needs it)."""

    __slots__ = ("high", "low", "n", "read", "sketch", "total")

    def __init__(self, read: Callable[[EngineEvent], Any], sketch: BaseDDSketch | None) -> None:
        self.read = read
        self.sketch = sketch
        self.n = 0
        self.total: float | int = 0
        self.low: float | int = math.inf
        self.high: float | int = -math.inf


class _Distinct:
    __slots__ = ("hll", "read")

    def __init__(self, read: Callable[[EngineEvent], Any], hll: Any) -> None:
        self.read = read
        self.hll = hll


class Accumulator:
    """The running aggregates of one (group, window or pane): the event count, per numeric
    field its n, sum, min, max (and sketch), and per distinct field an HLL."""

    __slots__ = ("count", "distinct", "layout", "numeric")

    def __init__(self, layout: AggregateLayout) -> None:
        self.layout = layout
        self.count = 0
        # A count-only layout (the common window) builds no generator: an accumulator is made
        # per window and group, often for a single event.
        self.numeric = (
            tuple(
                _Numeric(read, _new_sketch() if sketched else None)
                for read, sketched in zip(layout.numeric_accessors, layout.sketched, strict=True)
            )
            if layout.numeric_accessors
            else ()
        )
        self.distinct = (
            tuple(
                _Distinct(read, datasketches.hll_sketch(DISTINCT_LG_K, datasketches.HLL_8))
                for read in layout.distinct_accessors
            )
            if layout.distinct_accessors
            else ()
        )

    def add(self, event: EngineEvent) -> None:
        self.count += 1
        for stat in self.numeric:
            value = stat.read(event)
            kind = type(value)
            # Finite numbers only (x - x is NaN for inf and NaN); bool is not a measurement.
            if (kind is int or kind is float) and value - value == 0:
                stat.n += 1
                stat.total += value
                if value < stat.low:
                    stat.low = value
                if value > stat.high:
                    stat.high = value
                if stat.sketch is not None:
                    stat.sketch.add(value)
        for distinct in self.distinct:
            value = distinct.read(event)
            if type(value) is str:
                distinct.hll.update(value)
            elif value is not None and isinstance(value, int | float):
                distinct.hll.update(_distinct_token(value))

    def merge_from(self, other: Accumulator) -> None:
        """Fold `other` into this one (panes into a hopping window, sessions into one)."""
        self.count += other.count
        for mine, theirs in zip(self.numeric, other.numeric, strict=True):
            mine.n += theirs.n
            mine.total += theirs.total
            mine.low = min(mine.low, theirs.low)
            mine.high = max(mine.high, theirs.high)
            if mine.sketch is not None and theirs.sketch is not None:
                mine.sketch.merge(theirs.sketch)
        for mine_distinct, theirs_distinct in zip(self.distinct, other.distinct, strict=True):
            union = datasketches.hll_union(DISTINCT_LG_K)
            union.update(mine_distinct.hll)
            union.update(theirs_distinct.hll)
            mine_distinct.hll = union.get_result(datasketches.HLL_8)

    def snapshot(self) -> list[Any]:
        # DDSketch has no public getters for its zero count and stores; the attributes read
        # here are the ones its own merge and copy use.
        return [
            self.count,
            [
                [
                    stat.n,
                    _json_number(stat.total),
                    _json_number(stat.low) if stat.n else None,
                    _json_number(stat.high) if stat.n else None,
                    None
                    if stat.sketch is None
                    else [
                        stat.sketch._zero_count,
                        _store_state(stat.sketch._store),
                        _store_state(stat.sketch._negative_store),
                    ],
                ]
                for stat in self.numeric
            ],
            [
                binascii.b2a_base64(d.hll.serialize_compact(), newline=False).decode()
                for d in self.distinct
            ],
        ]

    @classmethod
    def restore(cls, layout: AggregateLayout, state: list[Any]) -> Accumulator:
        accumulator = cls(layout)
        count, numeric, distinct = state
        accumulator.count = count
        for stat, (n, total, low, high, sketch_state) in zip(
            accumulator.numeric, numeric, strict=True
        ):
            stat.n, stat.total = n, total
            stat.low = math.inf if low is None else low
            stat.high = -math.inf if high is None else high
            if sketch_state is not None:
                zero, positive, negative = sketch_state
                stat.sketch = BaseDDSketch(
                    _MAPPING, _restore_store(positive), _restore_store(negative), zero
                )
        for slot, text in zip(accumulator.distinct, distinct, strict=True):
            slot.hll = datasketches.hll_sketch.deserialize(binascii.a2b_base64(text))
        return accumulator
