"""Latency percentiles for `streammesh bench`, from HdrHistogram (the `hdrhistogram` package, the
HdrHistogram project's own Python port): values recorded in microseconds from 1 us to one hour
with 3 significant digits, so every percentile, p99.9 and the max included, is within 0.1% of the
exact value, whatever the distribution's shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from hdrh.histogram import HdrHistogram

__all__ = ["HIGHEST_US", "SIGNIFICANT_DIGITS", "latency_summary"]

HIGHEST_US = 3_600_000_000
"""The largest latency the histogram tells apart (one hour); longer ones count as one hour."""
SIGNIFICANT_DIGITS = 3
"""Relative precision 10**-3 of every value read back."""
_QUANTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}


def latency_summary(values_ms: Iterable[float]) -> dict[str, float]:
    """p50, p90, p99, p99.9 and max in milliseconds, `count`, and `below_zero`: values under 0,
    counted as 0 (ack-to-stored can be: store_time is read from the database's clock).
    NaN percentiles when there are no values."""
    histogram = HdrHistogram(1, HIGHEST_US, SIGNIFICANT_DIGITS)
    below = 0
    for value in values_ms:
        micros = round(value * 1000)
        if micros < 0:
            below += 1
            micros = 0
        histogram.record_value(min(micros, HIGHEST_US))
    count = histogram.get_total_count()
    out: dict[str, float] = {"count": count, "below_zero": below}
    for name, quantile in _QUANTILES.items():
        out[name] = histogram.get_value_at_percentile(quantile) / 1000 if count else math.nan
    out["max"] = histogram.get_max_value() / 1000 if count else math.nan
    return out
