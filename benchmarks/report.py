"""The Markdown report of a run and its place in the README: pure text in, text out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .results import Figure, Latency, Measurement, Results, Skipped
from .stats import ratio
from .targets import COUNTERPARTS, target_text, verdict

__all__ = ["README_BEGIN", "README_END", "markdown", "splice_readme"]

README_BEGIN = "<!-- bench:begin (written by `make bench`) -->"
README_END = "<!-- bench:end -->"


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def _number(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _row(key: str, measurement: Measurement) -> str:
    status = verdict(key, measurement)
    match measurement:
        case Latency():
            s = measurement.summary
            cells = [str(s.n), _ms(s.p50), _ms(s.p95), _ms(s.p99)]
        case Figure(value=value, unit=unit, detail=detail):
            cells = [str(detail.get("n", "")), f"{_number(value)} {unit}", "", ""]
        case Skipped(reason=reason):
            cells = ["", "—", "", ""]
            status = f"skipped: {reason}"
    return "| " + " | ".join([measurement.label, *cells, target_text(key), status]) + " |"


def _baseline_row(key: str, measurement: Measurement, ours: Measurement | None) -> str:
    counterpart = "—" if ours is None else ours.label
    if isinstance(measurement, Skipped):
        return f"| {measurement.label} | | — | | {counterpart} | | skipped: {measurement.reason} |"
    if not isinstance(measurement, Latency):
        raise TypeError(f"baseline {key} is not a latency")
    mine = measurement.summary
    if isinstance(ours, Latency):
        their = ours.summary
        factor = ratio(mine.p50, their.p50)
        ours_cell = f"{_ms(their.p50)} ({ours.label})"
        factor_cell = "" if factor is None else f"{factor:.2f}x"
    else:
        ours_cell, factor_cell = f"not measured ({counterpart})", ""
    cells = [measurement.label, str(mine.n), _ms(mine.p50), _ms(mine.p95), ours_cell, factor_cell, ""]
    return "| " + " | ".join(cells) + " |"


def _header(meta: Mapping[str, Any]) -> str:
    host = meta.get("host", {})
    return (
        f"`make bench` of {meta.get('date', '?')} ({meta.get('mode', '?')} run, "
        f"{host.get('cpus', '?')} CPUs, {host.get('memory_gib', '?')} GiB, kernel {host.get('kernel', '?')}, "
        f"{meta.get('duration_s', '?')} s in all), through a real MCP client over stdio. "
        "Targets from issue #11 (p50 on this machine kind)."
    )


def markdown(results: Results) -> str:
    ours = {k: m for k, m in results.measurements.items() if k not in COUNTERPARTS}
    baselines = {k: m for k, m in results.measurements.items() if k in COUNTERPARTS}
    lines = [
        _header(results.meta),
        "",
        "| nspawn-mcp | n | p50 / value | p95 | p99 | target | |",
        "|---|--:|--:|--:|--:|---|---|",
        *(_row(k, m) for k, m in ours.items()),
    ]
    if baselines:
        lines += [
            "",
            "Baselines from the same template rootfs; ratio = baseline p50 / nspawn-mcp p50 "
            "(above 1: nspawn-mcp is faster).",
            "",
            "| baseline | n | p50 | p95 | nspawn-mcp p50 | ratio | |",
            "|---|--:|--:|--:|---|--:|---|",
            *(_baseline_row(k, m, results.measurements.get(COUNTERPARTS[k])) for k, m in baselines.items()),
        ]
    return "\n".join(lines) + "\n"


def splice_readme(readme: str, table: str) -> str:
    """``readme`` with the text between the bench markers replaced by ``table``."""
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"the README has no {README_BEGIN!r} ... {README_END!r} section")
    return readme[: begin + len(README_BEGIN)] + "\n" + table + readme[end:]
