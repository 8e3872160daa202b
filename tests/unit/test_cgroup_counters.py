"""CPU time of a sandbox's slice from the kernel's counters, on v2, hybrid and v1 hosts."""

from __future__ import annotations

from pathlib import Path

import pytest

from nspawn_mcp.backend.cgroups import cpu_usage_nsec

SLICE = Path("nspawnmcp.slice/nspawnmcp-1a2b3c4d.slice")
SANDBOX = "sbx-1a2b3c4d"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("file", "text"),
    [
        (SLICE / "cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"),  # v2
        (Path("unified") / SLICE / "cpu.stat", "usage_usec 1500\n"),  # hybrid
        (Path("cpuacct") / SLICE / "cpuacct.usage", "1500000\n"),  # v1
    ],
)
def test_cpu_time_is_read_where_the_host_keeps_it(tmp_path: Path, file: Path, text: str) -> None:
    _write(tmp_path / file, text)
    assert cpu_usage_nsec(SANDBOX, tmp_path) == 1_500_000


def test_cpu_time_of_a_slice_that_is_not_there_is_unknown(tmp_path: Path) -> None:
    _write(tmp_path / "cpuacct" / "nspawnmcp.slice" / "other" / "cpuacct.usage", "5\n")
    assert cpu_usage_nsec(SANDBOX, tmp_path) is None
