"""Summaries of measurements: percentiles of one run's samples, median/min/max over runs.

Pure: no I/O. Percentiles interpolate linearly between the two nearest ranks, so the p99 of 300
samples lies between the 3rd and 4th largest, and any percentile of one sample is that sample.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of ``values``; `ValueError` when there are none."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_figures(ms: Sequence[float], prefix: str = "") -> dict[str, float]:
    """``p50_ms``, ``p95_ms`` and ``p99_ms`` of samples in milliseconds (none if no samples)."""
    if not ms:
        return {}
    return {f"{prefix}p{p}_ms": percentile(ms, p) for p in (50, 95, 99)}


def rounded(value: float) -> float:
    """Enough digits for a benchmark figure, without float noise in the JSON."""
    if value == 0 or not math.isfinite(value):
        return value
    digits = max(0, 4 - math.floor(math.log10(abs(value))))
    return round(value, min(digits, 6))


def summary(values: Iterable[float]) -> dict[str, float]:
    """Median, min and max of the per-run values of one figure."""
    got = list(values)
    if not got:
        raise ValueError("summary of no values")
    return {
        "median": rounded(statistics.median(got)),
        "min": rounded(min(got)),
        "max": rounded(max(got)),
    }


def summarize_runs(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Each figure that any run reported, in first-seen order, as median/min/max over the runs."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run))
    return {key: summary(run[key] for run in runs if key in run) for key in keys}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` rounded, or None when either is missing or the divisor is 0."""
    if numerator is None or not denominator:
        return None
    return rounded(numerator / denominator)
