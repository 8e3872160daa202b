"""Baselines from the same template rootfs as nspawn-mcp's ``default`` image: podman (a persistent
container and one-shot runs), bubblewrap one-shot, and the raw systemd-nspawn + machined floor.

Each returns its samples by key (ms), or the reason it could not run: a baseline that cannot run
is recorded as such, never the end of the run. Set-up code: CLI tools are fine here.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nspawn_mcp.box import find_box
from nspawn_mcp.layout import Layout
from nspawn_mcp.naming import template_image

__all__ = ["Host", "Samples", "bwrap", "floor", "locate", "podman"]

Samples = dict[str, list[float]]
FLOOR_SCRIPT = Path(__file__).parent / "floor.sh"
PODMAN_IMAGE = "localhost/nspawn-mcp-bench"
PODMAN_FLAGS = (
    "--network=none",
    "--cgroups=disabled",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
)


class BaselineError(RuntimeError):
    """Why a baseline could not run (one line)."""


@dataclass(frozen=True)
class Host:
    """Where the template is seen from here, and how to run a command beside machined."""

    root: Path
    """The root of machined's mount namespace, seen from here."""
    enter: tuple[str, ...]
    """Prefix that runs a command in machined's mount and pid namespaces."""
    image: str = "default"

    @property
    def template(self) -> str:
        return template_image(self.image)

    @property
    def rootfs(self) -> Path:
        return self.root / "var/lib/machines" / self.template


def locate(layout: Layout) -> Host:
    box = find_box(layout)
    if box is None:
        return Host(Path("/"), ())
    return Host(Path(f"/proc/{box.pid}/root"), ("nsenter", "-t", str(box.pid), "-m", "-p", "--"))


def _run(argv: list[str] | tuple[str, ...], stdin: bytes | None = None, timeout: float = 120) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BaselineError(f"{argv[0]}: {exc.__class__.__name__}: {exc}") from None
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise BaselineError(f"`{' '.join(argv[:3])} ...` exited {done.returncode}: {tail[0][:300]}")
    return done.stdout.decode(errors="replace")


def _ms(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def _needs(tool: str, host: Host) -> None:
    if shutil.which(tool) is None:
        raise BaselineError(f"{tool} is not installed (make bench installs it with apt)")
    if not host.rootfs.is_dir():
        raise BaselineError(f"the template of image {host.image!r} is not there (run make setup)")


_LOOP = """n=$1; shift
"$@" >/dev/null  # warm-up
for i in $(seq 1 "$n"); do
    t0=${EPOCHREALTIME/./}; "$@" >/dev/null; t1=${EPOCHREALTIME/./}
    echo $((t1 - t0))
done
"""


def bwrap(host: Host, n: int) -> Samples | str:
    """``bwrap ... true`` one-shot, ``n`` times, timed by bash beside machined (where the template is
    reachable: bwrap cannot bind it through /proc/PID/root)."""
    try:
        _needs("bwrap", host)
        rootfs = f"/var/lib/machines/{host.template}"
        argv = ["bwrap", "--ro-bind", rootfs, "/", "--proc", "/proc", "--dev", "/dev"]
        argv += ["--unshare-all", "--die-with-parent", "true"]
        lines = _run([*host.enter, "bash", "-c", _LOOP, "loop", str(n), *argv])
    except BaselineError as exc:
        return str(exc)
    return {"bwrap.run": [int(micros) / 1000 for micros in lines.split()]}


def podman(host: Host, n: int) -> Samples | str:
    """A persistent container's create (``run -d``), first exec, exec and destroy; one-shot ``run --rm``."""
    try:
        _needs("podman", host)
        tar = subprocess.Popen(["tar", "-C", str(host.rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            _run(["podman", "import", "-q", "-", PODMAN_IMAGE], stdin=tar.communicate()[0], timeout=600)
        finally:
            tar.wait()
        try:
            return _podman_rounds(n)
        finally:
            subprocess.run(["podman", "rmi", "-f", PODMAN_IMAGE], capture_output=True, check=False)
    except BaselineError as exc:
        return str(exc)


def _podman_rounds(n: int) -> Samples:
    out: Samples = {k: [] for k in ("podman.create", "podman.first_exec", "podman.exec", "podman.destroy")}
    run = ["podman", "run", "--rm", *PODMAN_FLAGS, PODMAN_IMAGE, "true"]
    _run(run)  # warm-up
    for i in range(n):
        name = f"nspawn-mcp-bench-{i}"
        started = time.perf_counter()
        try:
            _run(["podman", "run", "-d", "--name", name, *PODMAN_FLAGS, PODMAN_IMAGE, "sleep", "infinity"])
            created = time.perf_counter()
            _run(["podman", "exec", name, "true"])
            out["podman.first_exec"].append((time.perf_counter() - started) * 1000)
            out["podman.create"].append((created - started) * 1000)
            out["podman.exec"].append(_ms(lambda: _run(["podman", "exec", name, "true"])))  # noqa: B023
        finally:
            out["podman.destroy"].append(_ms(lambda: _run(["podman", "rm", "-f", "-t", "0", name])))  # noqa: B023
    out["podman.run"] = [_ms(lambda: _run(run)) for _ in range(n)]
    return out


def floor(host: Host, n: int) -> Samples | str:
    """``floor.sh``: machined's clone, a transient nspawn unit, nsenter, systemctl stop."""
    try:
        _needs("systemd-nspawn", host)
        script = FLOOR_SCRIPT.read_text()
        lines = _run([*host.enter, "bash", "-c", script, "floor.sh", str(n), host.template, "bench-floor"])
    except BaselineError as exc:
        return str(exc)
    keys = ("floor.create", "floor.first_exec", "floor.exec", "floor.destroy")
    out: Samples = {k: [] for k in keys}
    for line in lines.splitlines():
        for key, micros in zip(keys, line.split(), strict=True):
            out[key].append(int(micros) / 1000)
    return out
