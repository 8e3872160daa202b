"""``nspawn-mcp doctor``: check every prerequisite and say how to fix each."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .box import find_box, host_runs_systemd
from .images import Catalog
from .layout import Layout

__all__ = ["Check", "run_checks"]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _binary(name: str, path: str, package: str) -> Check:
    found = Path(path).exists() or shutil.which(name) is not None
    return Check(name, found, path if found else "missing", f"apt-get install {package}")


def _openat2() -> Check:
    from . import hostfs

    try:
        fd = hostfs._openat2(os.open("/", os.O_PATH | os.O_DIRECTORY), ".", os.O_PATH)
    except OSError as exc:
        return Check("openat2", False, str(exc), "use Linux 5.6 or later")
    os.close(fd)
    return Check("openat2", True, "supported")


def run_checks(layout: Layout) -> list[Check]:
    checks = [
        Check("python", sys.version_info >= (3, 11), sys.version.split()[0], "use Python 3.11 or later"),
        Check("root", os.geteuid() == 0, f"euid {os.geteuid()}", "run nspawn-mcp as root"),
        _binary("systemd-nspawn", "/usr/bin/systemd-nspawn", "systemd-container"),
        _binary("systemd-machined", "/lib/systemd/systemd-machined", "systemd-container"),
        _binary("debootstrap", "/usr/sbin/debootstrap", "debootstrap"),
        _binary("mkfs.btrfs", "/sbin/mkfs.btrfs", "btrfs-progs"),
        _binary("unshare", "/usr/bin/unshare", "util-linux"),
        _binary("nft", "/usr/sbin/nft", "nftables"),
        _binary("ip", "/usr/sbin/ip", "iproute2"),
        _openat2(),
    ]
    if host_runs_systemd():
        checks.append(Check("init", True, "PID 1 is systemd: using the system bus"))
    else:
        box = find_box(layout)
        state = f"running, pid {box.pid}" if box else "starts on demand"
        checks.append(Check("init", True, f"PID 1 is not systemd: private systemd {state}"))
        checks.append(
            Check(
                "pool",
                layout.pool_image.exists(),
                str(layout.pool_image),
                "run `nspawn-mcp setup` (or `make setup`)",
            )
        )
    built = Catalog(layout.images_dir).get("default")
    detail = f"default, version {built.version}" if built else "set-up has not built the default image"
    checks.append(Check("image", built is not None, detail, "run `nspawn-mcp setup` (or `make setup`)"))
    return checks


def print_report(checks: list[Check], out: Callable[[str], None] = print) -> bool:
    for check in checks:
        mark = "ok  " if check.ok else "FAIL"
        line = f"[{mark}] {check.name}: {check.detail}"
        if not check.ok and check.fix:
            line += f"  -> fix: {check.fix}"
        out(line)
    return all(check.ok for check in checks)
