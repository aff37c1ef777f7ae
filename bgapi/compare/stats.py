"""Percentiles and summaries of the figures that ``bgapi compare`` collects."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Spread", "histogram", "percentiles", "sign_test", "spread"]

# Histogram bucket edges in milliseconds: 0, then log-spaced from 10 µs to 100 s.
HISTOGRAM_EDGES_MS: tuple[float, ...] = (0.0,) + tuple(
    round(10 ** (exponent / 10), 6) for exponent in range(-20, 51)
)


def percentiles(values: Iterable[float]) -> dict[str, float | None]:
    """Return p50, p99 and max of ``values`` (nearest rank), or Nones when empty."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": _rank(ordered, 0.50), "p99": _rank(ordered, 0.99), "max": ordered[-1]}


def _rank(ordered: Sequence[float], fraction: float) -> float:
    index = max(0, math.ceil(fraction * len(ordered)) - 1)
    return ordered[index]


Spread = dict[str, float | None]


def spread(values: Iterable[float | None]) -> Spread:
    """Return the median, min and max of the values that are not None."""
    present = [value for value in values if value is not None]
    if not present:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(present), "min": min(present), "max": max(present)}


def histogram(values: Iterable[float]) -> dict[str, list[float] | list[int]]:
    """Count ``values`` (milliseconds) in log-spaced buckets; negative values go to the first."""
    counts = [0] * len(HISTOGRAM_EDGES_MS)
    edges = HISTOGRAM_EDGES_MS
    for value in values:
        counts[_bucket(edges, value)] += 1
    last = max((index for index, count in enumerate(counts) if count), default=-1)
    return {"edges_ms": list(edges[: last + 1]), "counts": counts[: last + 1]}


def _bucket(edges: Sequence[float], value: float) -> int:
    low, high = 0, len(edges) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if edges[middle] <= value:
            low = middle
        else:
            high = middle - 1
    return low


def describe(summary: dict[str, Any]) -> str:
    """Format a :func:`spread` as ``median (min-max)`` with three significant digits."""
    median = summary.get("median")
    if median is None:
        return "-"
    low, high = summary["min"], summary["max"]
    if low == high:
        return _short(median)
    return f"{_short(median)} ({_short(low)}–{_short(high)})"


def _short(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def sign_test(wins: int, trials: int) -> float:
    """Return the two-sided p-value of ``wins`` out of ``trials`` paired comparisons.

    It is the probability of a split at least this uneven when each side
    wins a pair with probability 1/2, as it does when nothing but noise
    separates the two.
    """
    if trials <= 0:
        return 1.0
    fewer = min(wins, trials - wins)
    tail = sum(math.comb(trials, count) for count in range(fewer + 1)) / 2**trials
    return min(1.0, 2 * tail)
