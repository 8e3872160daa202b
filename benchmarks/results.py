"""What a run produces: measurements by key, each a latency distribution, a figure or a skip.

Pure data and its JSON form. Keys are stable names (``create.cold``, ``podman.exec``); labels
are what the table shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .stats import Summary, summarize

__all__ = ["Figure", "Latency", "Measurement", "Results", "Skipped"]


@dataclass(frozen=True)
class Latency:
    """A distribution of durations, in milliseconds."""

    label: str
    samples_ms: tuple[float, ...]
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> Summary:
        return summarize(self.samples_ms)


@dataclass(frozen=True)
class Figure:
    """One number with its unit (a rate, a wall time, memory each)."""

    label: str
    value: float
    unit: str
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    """A measurement that could not be taken, and why."""

    label: str
    reason: str


Measurement = Latency | Figure | Skipped


@dataclass
class Results:
    meta: dict[str, Any]
    measurements: dict[str, Measurement] = field(default_factory=dict)

    def add(self, key: str, measurement: Measurement) -> None:
        if key in self.measurements:
            raise ValueError(f"measurement {key!r} taken twice")
        self.measurements[key] = measurement

    def latency(self, key: str, label: str, samples_ms: Sequence[float], **detail: Any) -> None:
        if samples_ms:
            self.add(key, Latency(label, tuple(samples_ms), detail))
        else:
            self.add(key, Skipped(label, "no samples"))

    def figure(self, key: str, label: str, value: float, unit: str, **detail: Any) -> None:
        self.add(key, Figure(label, value, unit, detail))

    def skip(self, key: str, label: str, reason: str) -> None:
        self.add(key, Skipped(label, reason))

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "measurements": {k: _encode(m) for k, m in self.measurements.items()}}


def _encode(measurement: Measurement) -> dict[str, Any]:
    match measurement:
        case Latency(label, samples, detail):
            s = measurement.summary
            return {
                "kind": "latency",
                "label": label,
                "unit": "ms",
                "n": s.n,
                "p50": round(s.p50, 3),
                "p95": round(s.p95, 3),
                "p99": round(s.p99, 3),
                "mean": round(s.mean, 3),
                "min": round(s.min, 3),
                "max": round(s.max, 3),
                "detail": dict(detail),
                "samples": [round(x, 3) for x in samples],
            }
        case Figure(label, value, unit, detail):
            return {
                "kind": "figure",
                "label": label,
                "value": round(value, 3),
                "unit": unit,
                "detail": dict(detail),
            }
        case Skipped(label, reason):
            return {"kind": "skipped", "label": label, "reason": reason}
