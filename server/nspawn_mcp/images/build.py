"""Building an image from its recipe into the pool: ``nspawn-mcp image build NAME`` and set-up.

:func:`plan_build` (pure) turns a recipe into numbered steps of commands; :func:`build_image`
runs them in a staging subvolume next to the template (hidden from machined), logging every
command's output to :meth:`Catalog.log_path`, then installs the result with
:func:`.templates.install_template` (an atomic swap) and records the catalog entry.

A build that fails at any step leaves the old template and its catalog entry as they were
and deletes the staging subvolume; the error names the step and the log.

Commands of the recipe run as root in a chroot of the new tree, each in a fresh mount
namespace (``unshare --mount``) in which ``/proc``, ``/sys``, ``/dev`` and the host's
``resolv.conf`` are mounted: they have the host's network, and every mount goes away with
the namespace, so nothing is left mounted whatever they do.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

from ..layout import Layout
from ..naming import template_image, template_staging
from .catalog import Catalog, ImageEntry
from .recipe import RecipeError, RecipeSource, find_recipe
from .templates import Pool, delete_subvolume, install_template, read_os_release

if TYPE_CHECKING:
    from ..backend.machine1 import Machined

__all__ = [
    "MARKER",
    "BuildFailed",
    "Command",
    "Progress",
    "Step",
    "build_image",
    "image_marker",
    "installed_digest",
    "new_version",
    "package_in_line",
    "plan_build",
    "run_image_build",
]

MARKER = "etc/nspawn-mcp-image"
"""A JSON file in every built image: its name, version and recipe digest (what decides it is current)."""

_CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# $1 the tree, $2 the command. A private mount namespace: what is mounted here ends with it.
_IN_CHROOT = (
    r"""set -e
root=$1
mount -t proc proc "$root/proc"
mount -t sysfs -o ro sysfs "$root/sys"
mount --rbind /dev "$root/dev"
if [ -f "$root/etc/resolv.conf" ] && [ ! -L "$root/etc/resolv.conf" ] && [ -e /etc/resolv.conf ]; then
    mount --bind /etc/resolv.conf "$root/etc/resolv.conf"
fi
command=$2
shift 2
# The host's CA bundle for apt, curl, git and pip while the command runs (a host behind a
# TLS-inspecting proxy needs its own CA for https mirrors), on a tmpfs /run: the image keeps its own.
if [ -d "$root/run" ] && [ ! -L "$root/run" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mount -t tmpfs -o mode=755 tmpfs "$root/run"
    cp /etc/ssl/certs/ca-certificates.crt "$root/run/host-ca.crt"
    echo 'Acquire::https::CaInfo "/run/host-ca.crt";' > "$root/run/host-apt.conf"
    set -- APT_CONFIG=/run/host-apt.conf SSL_CERT_FILE=/run/host-ca.crt CURL_CA_BUNDLE=/run/host-ca.crt \
        GIT_SSL_CAINFO=/run/host-ca.crt REQUESTS_CA_BUNDLE=/run/host-ca.crt
fi
exec chroot "$root" /usr/bin/env -i PATH="""
    + _CHROOT_PATH
    + r""" HOME=/root LC_ALL=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "$@" /bin/sh -c "$command"
"""
)

_NO_SERVICES = "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d"

_FINISH = (
    "apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/* "
    "&& rm -f /usr/sbin/policy-rc.d /var/lib/dbus/machine-id && : > /etc/machine-id"
)


@dataclass(frozen=True)
class Command:
    """One program run in the pool's mount namespace (``argv``), given ``stdin``."""

    argv: tuple[str, ...]
    stdin: bytes = b""


@dataclass(frozen=True)
class Step:
    title: str
    commands: tuple[Command, ...]


class BuildFailed(Exception):
    """A build step failed; the message names the step and the log."""


_PRIVATE_MOUNTS = ("unshare", "--mount", "--propagation", "private", "--")

# $1 the tree, $2 the suite, $3 the mirror, then debootstrap's options. debootstrap evals its
# target unquoted (so the '#' of the staging name would start a comment): it gets a bind mount.
# The pool refuses device nodes (mknod's chmod fails): container=lxc makes debootstrap fall back
# to bind-mounting the host's /dev nodes while it runs (sandboxes get their own /dev from nspawn).
_DEBOOTSTRAP = r"""set -e
root=$1 suite=$2 mirror=$3
shift 3
target=$(mktemp -d /tmp/nspawn-mcp-debootstrap.XXXXXX)
mount --bind "$root" "$target" || { rmdir "$target"; exit 1; }
status=0
container=lxc debootstrap --variant=minbase "$@" "$suite" "$target" "$mirror" || status=$?
umount -R "$target" 2>/dev/null || umount -l "$target" 2>/dev/null || true
rmdir "$target" 2>/dev/null || true
exit $status
"""


def _in_chroot(root: PurePosixPath, command: str, stdin: bytes = b"") -> Command:
    return Command((*_PRIVATE_MOUNTS, "sh", "-c", _IN_CHROOT, "sh", str(root), command), stdin)


def image_marker(name: str, version: str, digest: str) -> str:
    return json.dumps({"name": name, "version": version, "recipe": digest}, sort_keys=True) + "\n"


def _shown(command: str, width: int = 60) -> str:
    line = " ".join(command.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def plan_build(source: RecipeSource, pool_path: PurePosixPath, version: str) -> tuple[Step, ...]:
    """The steps that build ``source`` into its staging subvolume in the pool at ``pool_path``."""
    recipe = source.recipe
    staging = pool_path / template_staging(source.name)
    steps: list[Step] = []
    if recipe.base is not None:
        base = pool_path / template_image(recipe.base)
        steps.append(
            Step(
                f"start from image {recipe.base!r} (a snapshot)",
                (Command(("btrfs", "subvolume", "snapshot", str(base), str(staging))),),
            )
        )
        if recipe.packages:
            install = shlex.join(["apt-get", "install", "-y", "--no-install-recommends", *recipe.packages])
            steps.append(
                Step(
                    f"install {len(recipe.packages)} packages: {', '.join(recipe.packages)}",
                    (_in_chroot(staging, f"{_NO_SERVICES} && apt-get update && {install}"),),
                )
            )
    else:
        assert recipe.suite is not None  # the model allows exactly one of base and suite
        include = [f"--include={','.join(recipe.packages)}"] if recipe.packages else []
        steps.append(
            Step(
                f"debootstrap {recipe.suite} with {len(recipe.packages)} packages (a minute or more)",
                (
                    Command(("btrfs", "subvolume", "create", str(staging))),
                    Command(
                        (
                            *_PRIVATE_MOUNTS,
                            "sh",
                            "-c",
                            _DEBOOTSTRAP,
                            "sh",
                            str(staging),
                            recipe.suite,
                            recipe.mirror,
                            *include,
                        )
                    ),
                ),
            )
        )
    if recipe.files:
        writes = tuple(
            _in_chroot(
                staging,
                shlex.join(["mkdir", "-p", str(PurePosixPath(file.path).parent)])
                + f" && cat > {shlex.quote(file.path)} && chmod {file.mode:o} {shlex.quote(file.path)}",
                file.content.encode(),
            )
            for file in recipe.files
        )
        steps.append(Step(f"write {len(recipe.files)} files", writes))
    steps.extend(
        Step(f"run: {_shown(command)}", (_in_chroot(staging, command),)) for command in recipe.commands
    )
    marker = image_marker(source.name, version, source.digest).encode()
    steps.append(
        Step(
            "clean apt's caches, empty the machine-id, record the version",
            (_in_chroot(staging, f"{_FINISH} && cat > /{MARKER}", marker),),
        )
    )
    return tuple(steps)


_NAME = r"([a-z0-9][a-z0-9+.-]*[a-z0-9+])"
_PACKAGE_LINE = re.compile(
    rf"^(?:I: (?:Retrieving|Validating|Extracting|Unpacking|Configuring) {_NAME}(?=\.\.\.| [0-9])"
    rf"|(?:Unpacking|Setting up) {_NAME}(?::[a-z0-9]+)? )"
)


def package_in_line(line: str) -> str | None:
    """The package a line of debootstrap's or apt's output is about, if any (for the progress display)."""
    found = _PACKAGE_LINE.match(line)
    if found is None:
        return None
    return found[1] or found[2]


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


class Progress:
    """Prints the steps and, while one runs, the package it is at (a status line on a terminal)."""

    def __init__(self, stream: IO[str] = sys.stdout, quiet_interval: float = 10.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.quiet_interval = quiet_interval
        self._started = time.monotonic()
        self._shown_at = 0.0
        self._status = False

    def step(self, index: int, total: int, title: str) -> None:
        self._end_status()
        print(f"[{index}/{total}] {title} ({_clock(time.monotonic() - self._started)})", file=self.stream)
        self.stream.flush()

    def package(self, package: str) -> None:
        now = time.monotonic()
        text = f"      {package} ({_clock(now - self._started)})"
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self._status = True
        elif now - self._shown_at >= self.quiet_interval:
            print(text, file=self.stream)
        else:
            return
        self._shown_at = now
        self.stream.flush()

    def done(self, message: str) -> None:
        self._end_status()
        print(f"{message} ({_clock(time.monotonic() - self._started)})", file=self.stream)
        self.stream.flush()

    def _end_status(self) -> None:
        if self._status:
            self.stream.write("\r\033[K")
            self._status = False


def _logged(command: Command) -> str:
    if len(command.argv) > 4 and command.argv[-4] == _IN_CHROOT:
        return f"(in the new tree) {command.argv[-1]}"
    if _DEBOOTSTRAP in command.argv:
        return "debootstrap: tree, suite, mirror, options: " + shlex.join(
            command.argv[len(_PRIVATE_MOUNTS) + 4 :]
        )
    return shlex.join(command.argv)


def _run(command: Command, pool: Pool, log: IO[str], progress: Progress) -> int:
    argv = pool.enter(command.argv)
    log.write(f"$ {_logged(command)}\n")
    log.flush()
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as process:
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            process.stdin.write(command.stdin)
            process.stdin.close()
        except BrokenPipeError:
            pass
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace")
            log.write(line)
            if (package := package_in_line(line)) is not None:
                progress.package(package)
        code = process.wait()
    log.write(f"[exit status {code}]\n")
    log.flush()
    return code


def new_version(now: datetime) -> str:
    """A version that differs between any two builds: the time and a random part."""
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _build_tree(
    source: RecipeSource, pool: Pool, steps: Sequence[Step], log_path: Path, progress: Progress
) -> None:
    """Run ``steps`` and install the result; the staging subvolume is gone afterwards, whatever happens."""
    staging = template_staging(source.name)
    total = len(steps) + 1
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        log.write(f"# building image {source.name!r} from {source.path}\n")
        delete_subvolume(pool, staging)  # left by a build that was killed
        try:
            for index, step in enumerate(steps, 1):
                progress.step(index, total, step.title)
                log.write(f"## [{index}/{total}] {step.title}\n")
                for command in step.commands:
                    if _run(command, pool, log, progress) != 0:
                        raise BuildFailed(
                            f"building image {source.name!r} failed at step {index}/{total} "
                            f"({step.title}); the old image is unchanged; the log is {log_path}"
                        )
            progress.step(total, total, f"install as {template_image(source.name)}")
            log.write(f"## [{total}/{total}] install\n")
            install_template(pool, staging, source.name)
        finally:
            delete_subvolume(pool, staging)


async def build_image(
    source: RecipeSource, pool: Pool, machined: Machined, catalog: Catalog, progress: Progress
) -> ImageEntry:
    """Build ``source`` into the pool, replace its template atomically and record it in ``catalog``."""
    import anyio.to_thread

    started = time.monotonic()
    now = datetime.now(UTC)
    version = new_version(now)
    if source.recipe.base is not None:
        installed = {image.name for image in await machined.list_images()}
        if template_image(source.recipe.base) not in installed:
            raise BuildFailed(
                f"image {source.name!r} starts from image {source.recipe.base!r}, which is not installed: "
                f"build it first (nspawn-mcp image build {source.recipe.base})"
            )
    steps = plan_build(source, PurePosixPath(pool.path), version)
    log_path = catalog.log_path(source.name)
    await anyio.to_thread.run_sync(_build_tree, source, pool, steps, log_path, progress)
    template = template_image(source.name)
    await machined.mark_image_read_only(template)
    entry = ImageEntry(
        name=source.name,
        description=source.recipe.description,
        source="recipe",
        origin=str(source.path),
        version=version,
        built_at=now,
        build_seconds=round(time.monotonic() - started, 1),
        packages=source.recipe.packages,
        os_release=await anyio.to_thread.run_sync(read_os_release, pool.view / template),
        env=source.recipe.env,
    )
    catalog.put(entry)
    progress.done(f"image {source.name!r} is installed ({template}, version {version})")
    return entry


def installed_digest(pool: Pool, name: str) -> str | None:
    """The recipe digest the installed template of ``name`` was built from, None if unknown."""
    try:
        text = (pool.view / template_image(name) / MARKER).read_text()
        recorded = json.loads(text)
    except (OSError, ValueError):
        return None
    digest = recorded.get("recipe") if isinstance(recorded, dict) else None
    return digest if isinstance(digest, str) else None


async def run_image_build(layout: Layout, name: str, image_dirs: tuple[Path, ...]) -> int:
    """``nspawn-mcp image build NAME``: find the recipe, build it, say what happened; the exit status."""
    import anyio.to_thread

    from ..backend.bus import Bus
    from ..backend.machine1 import Machined
    from ..box import find_box, host_runs_systemd, stop_box
    from ..errors import InvalidRequest
    from ..runtime import find_daemons

    try:
        source = find_recipe(name, image_dirs)
    except (RecipeError, InvalidRequest) as exc:
        print(f"nspawn-mcp: {exc}", file=sys.stderr)
        return 1
    in_box = not host_runs_systemd()
    box_was_running = in_box and find_box(layout) is not None
    daemons = await anyio.to_thread.run_sync(find_daemons, layout)
    bus = await Bus.connect(daemons.bus_address)
    try:
        catalog = Catalog(layout.images_dir)
        print(f"building image {name!r} from {source.path}; the log is {catalog.log_path(name)}")
        await build_image(
            source, Pool.of(layout, daemons.box_pid), Machined(bus), Catalog(layout.images_dir), Progress()
        )
    except BuildFailed as exc:
        print(f"nspawn-mcp: {exc}", file=sys.stderr)
        return 1
    finally:
        bus.disconnect()
        if in_box and not box_was_running:
            stop_box(layout)  # leave the host as set-up found it
    return 0
