"""Statistics of samples: pure, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Summary", "percentile", "ratio", "summarize"]


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between closest ranks (numpy's default)."""
    if not samples:
        raise ValueError("no samples")
    if not 0 <= q <= 1:
        raise ValueError(f"quantile {q} is not within 0..1")
    ordered = sorted(samples)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    n: int
    p50: float
    p95: float
    p99: float
    mean: float
    min: float
    max: float


def summarize(samples: Sequence[float]) -> Summary:
    return Summary(
        n=len(samples),
        p50=percentile(samples, 0.50),
        p95=percentile(samples, 0.95),
        p99=percentile(samples, 0.99),
        mean=sum(samples) / len(samples),
        min=min(samples),
        max=max(samples),
    )


def ratio(baseline: float, ours: float) -> float | None:
    """How many times ``ours`` fits in ``baseline`` (above 1: ours is faster); None without a measure."""
    if ours <= 0:
        return None
    return baseline / ours
