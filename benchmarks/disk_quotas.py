"""What a disk cap costs per create and destroy, per btrfs quota mode, on the real machined.

Run as root, under the test lock, from the repository:

    flock /tmp/nspawn-mcp-tests.lock .venv/bin/python benchmarks/disk_quotas.py

It never touches the shared pool's quota state: a fresh loop-file btrfs is mounted
over ``/var/lib/machines`` inside the private systemd's mount namespace (the shared
pool stays mounted beneath it), a template is copied in from set-up's cache, and
for each mode (quotas off, classic qgroups, simple quotas) it times machined's
``CloneImage``, ``SetImageLimit`` and ``RemoveImage`` over D-Bus, then checks that
the cap holds (``fallocate`` and a streaming write past it fail with EDQUOT and the
pool grows by no more than the cap). Everything it made is removed at the end.
Quotas-off numbers on the shared pool are taken first, as a baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio

from nspawn_mcp.backend.bus import Bus
from nspawn_mcp.backend.machine1 import Machined
from nspawn_mcp.box import find_box, stop_box
from nspawn_mcp.layout import Layout
from nspawn_mcp.naming import template_image
from nspawn_mcp.provision import QuotaMode, disable_quotas, enable_quotas, quota_mode
from nspawn_mcp.runtime import find_daemons

_MiB = 1 << 20
TEMPLATE = "nspawn-mcp-bench"
CAP = 64 * _MiB


@dataclass
class Row:
    mechanism: str
    clone: list[float]
    limit: list[float]
    remove: list[float]
    holds: str = "n/a"

    def line(self) -> str:
        def p50(samples: list[float]) -> str:
            return f"{statistics.median(samples):7.1f}" if samples else "      -"

        create = [c + lim for c, lim in zip(self.clone, self.limit, strict=False)] or self.clone
        return (
            f"| {self.mechanism:<34} | {p50(self.clone)} | {p50(self.limit)} | {p50(create)} "
            f"| {p50(self.remove)} | {self.holds} |"
        )


def run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def scratch_pool(box_pid: int, size: str) -> Iterator[None]:
    """A fresh btrfs loop file mounted over /var/lib/machines in the box only."""
    enter = ["nsenter", "-t", str(box_pid), "-m", "--"]
    workdir = Path(tempfile.mkdtemp(prefix="nspawn-mcp-diskbench-", dir="/var/tmp"))
    image = workdir / "pool.img"
    run(["truncate", "-s", size, str(image)])
    run(["mkfs.btrfs", "-q", str(image)])
    device = run(["losetup", "--find", "--show", str(image)]).strip()
    try:
        run([*enter, "mount", device, "/var/lib/machines"])
        try:
            yield
        finally:
            run([*enter, "umount", "/var/lib/machines"])
    finally:
        run(["losetup", "-d", device])
        shutil.rmtree(workdir)


def write(path: Path, size: int) -> tuple[int, OSError | None]:
    """Write up to ``size`` bytes: how many landed, and the error that stopped it if one did."""
    chunk = b"\xa5" * _MiB
    written = 0
    try:
        with path.open("wb") as out:
            while written < size:
                out.write(chunk)
                out.flush()
                written += len(chunk)
    except OSError as exc:
        return written, exc
    return written, None


def pool_used(machines: Path) -> int:
    os.sync()
    stats = os.statvfs(machines)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


async def measure(
    machined: Machined, machines: Path, mechanism: str, template: str, rounds: int, cap: bool, dirty_mib: int
) -> Row:
    row = Row(mechanism, [], [], [])
    for i in range(rounds):
        name = f"dqbench{i}"
        started = time.perf_counter()
        await machined.clone_image(template, name)
        row.clone.append((time.perf_counter() - started) * 1000)
        if cap:
            started = time.perf_counter()
            await machined.set_image_limit(name, 1 << 30)
            row.limit.append((time.perf_counter() - started) * 1000)
        if dirty_mib:
            # What a sandbox leaves behind: some new data, committed (a sandbox lives longer
            # than btrfs's 30 s commit interval), plus a changed file of the image.
            _, error = write(machines / name / "root" / "scratch", dirty_mib * _MiB)
            assert error is None, error
            with (machines / name / "etc" / "hostname").open("w") as f:
                f.write(name + "\n")
            os.sync()
        started = time.perf_counter()
        await machined.remove_image(name)
        row.remove.append((time.perf_counter() - started) * 1000)
    return row


async def cap_holds(machined: Machined, machines: Path) -> str:
    """fallocate and a streaming write past CAP fail with EDQUOT; the pool grows by <= CAP."""
    name = "dqbenchcap"
    await machined.clone_image(TEMPLATE, name)
    try:
        await machined.set_image_limit(name, CAP)
        before = pool_used(machines)
        target = machines / name / "root"
        try:
            fd = os.open(target / "falloc", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, 2 * CAP)
                fallocate = "fallocate ok (cap broken)"
            finally:
                os.close(fd)
        except OSError as exc:
            fallocate = f"fallocate {errno.errorcode[exc.errno or 0]}"
        landed, error = write(target / "stream", 2 * CAP)
        if error is None:
            stream = f"write ok {landed // _MiB} MiB (cap broken)"
        else:
            stream = f"write {errno.errorcode[error.errno or 0]} at {landed // _MiB} MiB"
        grown = (pool_used(machines) - before) / _MiB
        return f"{fallocate}; {stream}; pool +{grown:.0f} MiB (cap {CAP // _MiB})"
    finally:
        await machined.remove_image(name)


def set_mode(machines: Path, mode: QuotaMode | None) -> None:
    disable_quotas(machines)
    if mode is not None:
        enable_quotas(machines, mode)
        assert quota_mode(machines) == mode, quota_mode(machines)


def qgroup_count(box_pid: int) -> int:
    """Qgroups on the pool once the cleaner has dropped every deleted subvolume."""
    enter = ["nsenter", "-t", str(box_pid), "-m", "--"]
    run([*enter, "btrfs", "subvolume", "sync", "/var/lib/machines"])
    lines = run([*enter, "btrfs", "qgroup", "show", "/var/lib/machines"]).splitlines()
    return sum(1 for line in lines if line[:1].isdigit())


async def main(rounds: int, dirty_mib: int, modes: list[str]) -> None:
    layout = Layout.from_env()
    box_was_running = find_box(layout) is not None
    daemons = find_daemons(layout)
    box = find_box(layout)
    assert box is not None, "this benchmark is for hosts whose PID 1 is not systemd"
    machines = Path(f"/proc/{box.pid}/root/var/lib/machines")
    bus = await Bus.connect(daemons.bus_address)
    rows: list[Row] = []
    try:
        machined = Machined(bus)
        print(f"shared pool, quotas as they are ({quota_mode(machines) or 'off'}) ...", flush=True)
        rows.append(
            await measure(
                machined,
                machines,
                "shared pool, quotas as found",
                "nspawn-mcp-default",
                rounds,
                False,
                dirty_mib,
            )
        )
        # The scratch pool covers the real one: hold the default template open to copy it from.
        source = os.open(machines / template_image("default"), os.O_RDONLY | os.O_DIRECTORY)
        with scratch_pool(box.pid, "8G"):
            enter = ["nsenter", "-t", str(box.pid), "-m", "--"]
            run([*enter, "btrfs", "subvolume", "create", f"/var/lib/machines/{TEMPLATE}"])
            subprocess.run(  # noqa: ASYNC221 (a benchmark's set-up, nothing else runs)
                ["cp", "-a", f"/proc/self/fd/{source}/.", f"{machines}/{TEMPLATE}/"],
                check=True,
                pass_fds=(source,),
            )
            os.close(source)
            await machined.mark_image_read_only(TEMPLATE)
            try:
                for label, mode in (
                    ("scratch pool, quotas off", None),
                    ("classic qgroups", QuotaMode.CLASSIC),
                    ("simple quotas (squota)", QuotaMode.SIMPLE),
                ):
                    if (mode.value if mode else "off") not in modes:
                        continue
                    print(f"{label} ...", flush=True)
                    set_mode(machines, mode)
                    row = await measure(
                        machined, machines, label, TEMPLATE, rounds, mode is not None, dirty_mib
                    )
                    if mode is not None:
                        row.holds = await cap_holds(machined, machines)
                        row.holds += f"; qgroups left after {rounds} images: {qgroup_count(box.pid)}"
                    rows.append(row)
                set_mode(machines, None)
            finally:
                await machined.mark_image_read_only(TEMPLATE, False)
                await machined.remove_image(TEMPLATE)
    finally:
        bus.disconnect()
        if not box_was_running:
            stop_box(layout)
    print(f"\n{rounds} rounds each, {dirty_mib} MiB written and synced per image before removal; ms p50")
    print("| mechanism | CloneImage | SetImageLimit | create | RemoveImage | cap holds |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(row.line())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--dirty-mib", type=int, default=4, help="data each image gets before removal")
    parser.add_argument("--modes", nargs="+", default=["off", "classic", "simple"])
    options = parser.parse_args()
    anyio.run(main, options.rounds, options.dirty_mib, options.modes)
