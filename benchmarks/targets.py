"""The targets of issue #11 (p50 on this machine kind, 2 cores) and what each baseline is compared with.

Pure: a verdict is computed from a measurement, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .results import Figure, Latency, Measurement, Skipped

__all__ = ["COUNTERPARTS", "TARGETS", "Target", "target_text", "verdict"]

Stat = Literal["p50", "p95", "value"]


@dataclass(frozen=True)
class Target:
    stat: Stat
    op: Literal["<=", ">="]
    bound: float
    unit: str
    at_scale: int | None = None
    """The target holds only when measured with at least this many (detail ``n``)."""

    @property
    def text(self) -> str:
        sign = "≤" if self.op == "<=" else "≥"
        what = "" if self.stat == "value" else f"{self.stat} "
        scale = f" at {self.at_scale:,}" if self.at_scale else ""
        return f"{what}{sign} {self.bound:g} {self.unit}{scale}"

    def holds(self, value: float) -> bool:
        return value <= self.bound if self.op == "<=" else value >= self.bound


_BURST = (Target("p50", "<=", 150, "ms"),)

TARGETS: dict[str, tuple[Target, ...]] = {
    "first_exec.pool": (Target("p50", "<=", 20, "ms"), Target("p95", "<=", 40, "ms")),
    "first_exec.cold": (Target("p50", "<=", 80, "ms"),),
    "burst50.pool": _BURST,
    "burst50.cold": _BURST,
    "sustained": (Target("value", ">=", 20, "creates/s"),),
    "exec.true": (Target("p50", "<=", 5, "ms"),),
    "destroy": (Target("p50", "<=", 15, "ms"),),
    "density": (Target("value", "<=", 4, "MiB each", at_scale=1000),),
    "copy.in": (Target("value", ">=", 500, "MiB/s"),),
    "copy.out": (Target("value", ">=", 500, "MiB/s"),),
}

COUNTERPARTS: dict[str, str] = {
    "podman.create": "create.cold",
    "podman.first_exec": "first_exec.cold",
    "podman.exec": "exec.true",
    "podman.destroy": "destroy",
    "podman.run": "first_exec.cold",
    "bwrap.run": "first_exec.cold",
    "floor.create": "create.cold",
    "floor.first_exec": "first_exec.cold",
    "floor.exec": "exec.true",
    "floor.destroy": "destroy",
}
"""Each baseline and the nspawn-mcp measurement it is set against (one-shot runs: a fresh sandbox
running its first command)."""


def _stat(measurement: Latency | Figure, stat: Stat) -> float | None:
    if isinstance(measurement, Figure):
        return measurement.value if stat == "value" else None
    summary = measurement.summary
    return {"p50": summary.p50, "p95": summary.p95, "value": None}[stat]


def verdict(key: str, measurement: Measurement) -> str:
    """'met', 'not met', 'not measured' or why the target does not apply; '' without a target."""
    targets = TARGETS.get(key, ())
    if not targets:
        return ""
    if isinstance(measurement, Skipped):
        return "not measured"
    for target in targets:
        if target.at_scale is not None:
            n = int(measurement.detail.get("n", 0))
            if n < target.at_scale:
                return f"not at scale (n={n:,})"
        value = _stat(measurement, target.stat)
        if value is None or not target.holds(value):
            return "not met"
    return "met"


def target_text(key: str) -> str:
    return ", ".join(t.text for t in TARGETS.get(key, ()))
