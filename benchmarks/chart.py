"""The PNG of a run: the distribution of every latency measured, nspawn-mcp and baselines."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt

from .results import Latency, Results
from .targets import COUNTERPARTS

__all__ = ["write_chart"]


def write_chart(results: Results, path: Path) -> None:
    series = [(k, m) for k, m in results.measurements.items() if isinstance(m, Latency)]
    if not series:
        return
    series.reverse()  # matplotlib draws the first row at the bottom
    figure, axes = plt.subplots(figsize=(10, 0.42 * len(series) + 1.6))
    plot = axes.boxplot(
        [m.samples_ms for _, m in series],
        vert=False,
        whis=(1, 99),
        showfliers=True,
        patch_artist=True,
        flierprops={"markersize": 2},
    )
    for (key, _), box in zip(series, plot["boxes"], strict=True):
        box.set_facecolor("#d9d9d9" if key in COUNTERPARTS else "#8ab4e8")
    axes.set_yticks(range(1, len(series) + 1), [f"{m.label} (n={len(m.samples_ms)})" for _, m in series])
    axes.set_xscale("log")
    axes.set_xlabel("milliseconds (log scale); box: p25-p75, whiskers: p1-p99; grey: baselines")
    axes.set_title(
        f"nspawn-mcp `make bench`, {results.meta.get('date', '')} ({results.meta.get('mode', '')})"
    )
    axes.grid(axis="x", which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
