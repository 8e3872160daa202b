"""Set-up of the host: the btrfs image pool and the template images.

This is set-up code, run by ``nspawn-mcp setup`` (and so by ``make run`` / ``make
test``), and it may use command-line tools (``mkfs.btrfs``, ``debootstrap``,
``btrfs``, ``cp``). The server itself never shells out.

It never hides or removes machines or images the host already has: the pool is
mounted only inside the private systemd's mount namespace, and on a host whose
PID 1 is systemd it is used only when ``/var/lib/machines`` is already btrfs or
is empty.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .layout import Layout

__all__ = [
    "TEMPLATES",
    "Template",
    "build_rootfs",
    "filesystem_type",
    "install_template",
    "make_pool",
    "run_setup",
]

log = logging.getLogger(__name__)

POOL_SIZE = "20G"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class Template:
    name: str
    suite: str
    packages: tuple[str, ...]


TEMPLATES = {
    "default": Template(name="default", suite="bookworm", packages=("python3",)),
}

TEMPLATE_REVISION = 2
"""Bumped whenever what set-up puts into a template changes; older images are rebuilt.

1: debootstrap minbase + python3. 2: an unprivileged user ``sandbox`` (uid 1000).
"""
MARKER = "etc/nspawn-mcp-template"
UNPRIVILEGED_USER = "sandbox"


def marker_text(template: Template) -> str:
    return f"{template.name} {TEMPLATE_REVISION}\n"


def is_current(root: Path, template: Template) -> bool:
    try:
        return (root / MARKER).read_text() == marker_text(template)
    except OSError:
        return False


def customise(rootfs: Path, template: Template) -> None:
    """What set-up adds to a debootstrapped tree, idempotently."""
    if is_current(rootfs, template):
        return
    passwd = (rootfs / "etc/passwd").read_text()
    if not any(line.startswith(f"{UNPRIVILEGED_USER}:") for line in passwd.splitlines()):
        _run(
            [
                "chroot",
                str(rootfs),
                "useradd",
                "--create-home",
                "--uid",
                "1000",
                "--user-group",
                "--shell",
                "/bin/sh",
                UNPRIVILEGED_USER,
            ]
        )
    (rootfs / MARKER).write_text(marker_text(template))


def filesystem_type(path: str, mountinfo: str) -> str:
    """The type of the filesystem ``path`` lives on, from ``/proc/self/mountinfo`` text."""
    best, best_type = "", "unknown"
    for line in mountinfo.splitlines():
        fields, _, rest = line.partition(" - ")
        mount_point = fields.split()[4].replace("\\040", " ")
        within = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if within and len(mount_point) >= len(best):
            best, best_type = mount_point, rest.split()[0]
    return best_type


def _run(argv: Sequence[str]) -> None:
    log.info("running %s", " ".join(argv))
    subprocess.run(argv, check=True)


def make_pool(layout: Layout) -> bool:
    """Create the sparse btrfs pool file once. Returns whether it was created."""
    if layout.pool_image.exists():
        return False
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    temporary = layout.pool_image.with_suffix(".tmp")
    temporary.unlink(missing_ok=True)
    _run(["truncate", "-s", POOL_SIZE, str(temporary)])
    _run(["mkfs.btrfs", "-q", str(temporary)])
    temporary.rename(layout.pool_image)
    return True


def rootfs_dir(layout: Layout, template: Template) -> Path:
    return layout.cache_dir / template.name / "rootfs"


def build_rootfs(layout: Layout, template: Template) -> Path:
    """debootstrap the template's root filesystem once; later runs reuse it."""
    target = rootfs_dir(layout, template)
    if (target / "usr/bin/python3").exists():
        customise(target, template)
        return target
    temporary = target.with_name("rootfs.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(template.packages),
            template.suite,
            str(temporary),
            DEBIAN_MIRROR,
        ]
    )
    # Debian images ship no hostname and a machine-id that must be empty.
    (temporary / "etc/machine-id").write_text("")
    shutil.rmtree(temporary / "var/cache/apt/archives", ignore_errors=True)
    (temporary / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    customise(temporary, template)
    shutil.rmtree(target, ignore_errors=True)
    temporary.rename(target)
    return target


def install_template(rootfs: Path, image_name: str, machines_dir: Path, enter_pid: int | None) -> None:
    """Copy ``rootfs`` into a new btrfs subvolume ``machines_dir/image_name``.

    ``enter_pid``: run the commands in that process's mount namespace (the box's),
    where the pool is mounted.
    """
    prefix = ["nsenter", "-t", str(enter_pid), "-m", "--"] if enter_pid else []
    staging = machines_dir / f".{image_name}.tmp"
    final = machines_dir / image_name
    _run([*prefix, "sh", "-c", 'if [ -e "$1" ]; then btrfs subvolume delete "$1"; fi', "sh", str(staging)])
    _run([*prefix, "btrfs", "subvolume", "create", str(staging)])
    _run([*prefix, "cp", "-a", "--reflink=auto", f"{rootfs}/.", f"{staging}/"])
    _run([*prefix, "mv", "-T", str(staging), str(final)])
    os.sync()


def enable_quotas(machines_dir: Path, enter_pid: int | None) -> None:
    """btrfs quotas on the pool, which SetImageLimit needs (qgroups cost time on create and destroy)."""
    prefix = ["nsenter", "-t", str(enter_pid), "-m", "--"] if enter_pid else []
    _run([*prefix, "btrfs", "quota", "enable", str(machines_dir)])


async def run_setup(layout: Layout, disk_quotas: bool = False) -> int:
    """Everything ``make setup`` needs beyond Debian packages and the virtualenv."""
    import anyio.to_thread

    from .backend.bus import Bus
    from .backend.machine1 import Machined
    from .box import find_box, host_runs_systemd, stop_box
    from .naming import template_image
    from .runtime import find_daemons

    in_box = not host_runs_systemd()
    if in_box and make_pool(layout):
        print(f"created the image pool {layout.pool_image}")
    if not in_box:
        mountinfo = await anyio.Path("/proc/self/mountinfo").read_text()
        fs_type = filesystem_type(str(layout.machines_dir), mountinfo)
        if fs_type != "btrfs":
            print(
                f"{layout.machines_dir} is on {fs_type}; sandboxes are btrfs snapshots, so it must be btrfs."
                "\n"
                f"Mount one there (for example a loop file: truncate -s 20G {layout.pool_image}; "
                f"mkfs.btrfs {layout.pool_image}; mount -o loop {layout.pool_image} {layout.machines_dir}), "
                "make it permanent with a mount unit, and run setup again. Existing images are left alone."
            )
            return 1
    box_was_running = in_box and find_box(layout) is not None
    address = (await anyio.to_thread.run_sync(find_daemons, layout)).bus_address
    box = find_box(layout) if in_box else None
    bus = await Bus.connect(address)
    try:
        machined = Machined(bus)
        installed = {image.name for image in await machined.list_images()}
        machines_view = (
            Path(f"/proc/{box.pid}/root") / str(layout.machines_dir).lstrip("/")
            if box
            else layout.machines_dir
        )
        for template in TEMPLATES.values():
            image = template_image(template.name)
            if image in installed and is_current(machines_view / image, template):
                print(f"image {template.name!r} is installed ({image})")
                continue
            if image in installed:
                print(
                    f"image {template.name!r} is out of date; rebuilding it (running sandboxes keep theirs)"
                )
                await machined.mark_image_read_only(image, False)
                await machined.remove_image(image)

            print(f"building image {template.name!r} ({template.suite} + {', '.join(template.packages)}) ...")
            rootfs = await anyio.to_thread.run_sync(build_rootfs, layout, template)
            await anyio.to_thread.run_sync(
                install_template, rootfs, image, layout.machines_dir, box.pid if box else None
            )
            await machined.mark_image_read_only(image)
            print(f"image {template.name!r} is installed ({image})")
        if disk_quotas:
            await anyio.to_thread.run_sync(enable_quotas, layout.machines_dir, box.pid if box else None)
            print(f"btrfs quotas are enabled on {layout.machines_dir}: policies may set limits.*.disk")
    finally:
        bus.disconnect()
        if in_box and not box_was_running:
            stop_box(layout)  # leave the host as set-up found it
    return 0
