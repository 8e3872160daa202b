"""What the sandboxes left behind, asked of the system rather than of the daemon under test.

Each kind of remains is asked of whoever keeps it: machines and images of machined,
units and slices of systemd, mounts of the kernel (the host's and the box's mount
tables), veths of ``ip``, rules of ``nft``, and the state directory's records, staging
files and per-sandbox directories of the file system. The bus clients are the product's
(``backend.machine1``, ``backend.systemd1``) but nothing of the backend's start-up runs:
``NspawnBackend.connect`` clears the staging directory, which would hide a leak there.

A test takes a :func:`snapshot` before it starts and asserts with :func:`assert_no_leaks`
afterwards that nothing is left that was not there before.

The daemon's warm pool is nobody's and comes and goes on its own: what belongs to the sandboxes
it holds (as the operator's ``nspawn-mcp list --json`` shows them, those being started included)
is left out of every answer here. That the pool itself leaves nothing is test_warm_pool.py's.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import anyio
import anyio.to_thread

from nspawn_mcp.backend.bus import Bus
from nspawn_mcp.backend.machine1 import Machined
from nspawn_mcp.backend.systemd1 import Systemd
from nspawn_mcp.layout import Layout
from nspawn_mcp.runtime import find_daemons

__all__ = [
    "Remains",
    "assert_no_leaks",
    "egress_rules",
    "machines_and_images",
    "nft_rules",
    "snapshot",
    "warm_pool",
]

_SANDBOX = re.compile(r"sbx-[0-9a-f]{8}")
_VETH = re.compile(r"^\d+:\s+(ve-sbx-[0-9a-f]{8})[@:]", re.MULTILINE)
_NFT_PER_SANDBOX = re.compile(r"\b(?:chain|set)\s+((?:egress|sni|input|resolved)_[0-9a-f]{8})\b")
_NFT_ELEMENT = re.compile(r'"(ve-sbx-[0-9a-f]{8})"')


@dataclass(frozen=True)
class Remains:
    """Everything of our sandboxes the system holds, by kind."""

    machines: frozenset[str]
    images: frozenset[str]
    units: frozenset[str]
    mounts: frozenset[str]
    veths: frozenset[str]
    nft: frozenset[str]
    records: frozenset[str]
    staging: frozenset[str]
    sandbox_dirs: frozenset[str]

    def __sub__(self, before: Remains) -> Remains:
        return Remains(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def describe(self) -> str:
        kinds = {f.name: sorted(getattr(self, f.name)) for f in fields(self)}
        return "; ".join(f"{kind}: {', '.join(names)}" for kind, names in kinds.items() if names)


async def warm_pool() -> set[str]:
    """The sandboxes the running daemon's warm pool holds (none when no daemon runs)."""
    listing = await anyio.run_process(
        [str(Path(sys.executable).parent / "nspawn-mcp"), "list", "--json"], check=False
    )
    if listing.returncode != 0:
        return set()
    return {row["sandbox_id"] for row in json.loads(listing.stdout) if row["pooled"]}


def _not_pooled(names: set[str], pooled: set[str]) -> set[str]:
    """``names`` without those of pooled sandboxes (named by id, or by its hex part in nftables)."""
    marks = pooled | {sandbox.removeprefix("sbx-") for sandbox in pooled}
    return {name for name in names if not any(mark in name for mark in marks)}


async def machines_and_images(*, with_pool: bool = False) -> tuple[set[str], set[str]]:
    """Our machines and images, as machined reports them (the warm pool's left out unless ``with_pool``)."""
    machines, images = await _machines_and_images()
    pooled = set() if with_pool else await warm_pool()
    return _not_pooled(machines, pooled), _not_pooled(images, pooled)


async def _machines_and_images() -> tuple[set[str], set[str]]:
    daemons = await anyio.to_thread.run_sync(find_daemons, Layout.from_env())
    bus = await Bus.connect(daemons.bus_address)
    try:
        machined = Machined(bus)
        machines = {m.name for m in await machined.list_machines() if _SANDBOX.fullmatch(m.name)}
        images = {i.name for i in await machined.list_images() if _SANDBOX.fullmatch(i.name)}
    finally:
        bus.disconnect()
    return machines, images


async def _units(bus_address: str) -> set[str]:
    bus = await Bus.connect(bus_address)
    try:
        systemd = Systemd(bus)  # no subscription: only a listing is asked for
        units = await systemd.list_units(["nspawn-mcp-sbx-*.service", "nspawnmcp-*.slice"])
    finally:
        bus.disconnect()
    return {unit.name for unit in units}


def _mounts(mountinfo: Path, under: tuple[Path, ...]) -> set[str]:
    """Mount points (field 5 of mountinfo) at or below a sandbox's directory in any of ``under``."""
    found = set()
    for line in mountinfo.read_text().splitlines():
        point = line.split()[4]
        for parent in under:
            relative = point.removeprefix(f"{parent}/")
            if relative != point and _SANDBOX.match(relative):
                found.add(f"{point} (in {mountinfo})")
    return found


async def _veths() -> set[str]:
    listing = await anyio.run_process(["ip", "-o", "link", "show"])
    return set(_VETH.findall(listing.stdout.decode()))


def egress_rules(sandbox_id: str) -> set[str]:
    """What a live egress sandbox has in the host's nftables table, as :func:`nft_rules` names it."""
    suffix = sandbox_id.removeprefix("sbx-")
    chains = {f"{kind}_{suffix}" for kind in ("egress", "sni", "input", "resolved")}
    return chains | {f"map element ve-{sandbox_id}"}


async def nft_rules() -> set[str]:
    """The per-sandbox chains, sets and map elements in the host's nftables table ``inet nspawn_mcp``."""
    table = await anyio.run_process(["nft", "list", "table", "inet", "nspawn_mcp"], check=False)
    if table.returncode != 0:  # no table: nothing of any sandbox
        return set()
    text = table.stdout.decode()
    return set(_NFT_PER_SANDBOX.findall(text)) | {f"map element {n}" for n in _NFT_ELEMENT.findall(text)}


def _entries(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()} if directory.is_dir() else set()


async def snapshot() -> Remains:
    """What the system holds of our sandboxes now."""
    layout = Layout.from_env()
    daemons = await anyio.to_thread.run_sync(find_daemons, layout)
    machines, images = await _machines_and_images()
    under = (layout.machines_dir, layout.sandboxes_dir)
    mounts = _mounts(Path("/proc/self/mountinfo"), under)
    if daemons.box_pid is not None:  # the pool, and what nspawn mounts on it, are the box's only
        mounts |= _mounts(Path(f"/proc/{daemons.box_pid}/mountinfo"), under)
    found = {
        "machines": machines,
        "images": images,
        "units": await _units(daemons.bus_address),
        "mounts": mounts,
        "veths": await _veths(),
        "nft": await nft_rules(),
        "records": _entries(layout.records_dir),
        "staging": _entries(layout.staging_dir),
        "sandbox_dirs": _entries(layout.sandboxes_dir),
    }
    pooled = await warm_pool()  # asked last: one being started meanwhile is already in it
    return Remains(**{kind: frozenset(_not_pooled(names, pooled)) for kind, names in found.items()})


async def assert_no_leaks(before: Remains, *, timeout: float = 30.0) -> None:
    """Wait (bounded) until nothing is left that was not there ``before``; fail naming what is.

    Waiting is for the daemon's own clean-up of disconnected clients, which a client cannot
    wait for; everything a client destroyed itself is gone when its call returns.
    """
    left = await snapshot() - before
    try:
        with anyio.fail_after(timeout):
            while left:
                await anyio.sleep(0.1)
                left = await snapshot() - before
    except TimeoutError:
        raise AssertionError(f"left behind after {timeout:g} s: {left.describe()}") from None
