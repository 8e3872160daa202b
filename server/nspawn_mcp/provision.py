"""Set-up of the host: the btrfs image pool and the ``default`` image (built from its recipe).

This is set-up code, run by ``nspawn-mcp setup`` (and so by ``make run`` / ``make
test``), and it may use command-line tools (``mkfs.btrfs``, ``btrfs``; images are built by
:mod:`.images.build`). The server itself never shells out.

It never hides or removes machines or images the host already has: the pool is
mounted only inside the private systemd's mount namespace, and on a host whose
PID 1 is systemd it is used only when ``/var/lib/machines`` is already btrfs or
is empty.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import os
import struct
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .images.recipe import DEFAULT_IMAGE_DIR
from .layout import Layout

__all__ = [
    "PoolTooSmall",
    "QuotaMode",
    "choose_quotas",
    "disable_quotas",
    "enable_quotas",
    "filesystem_type",
    "make_pool",
    "pool_size",
    "quota_mode",
    "run_setup",
]

log = logging.getLogger(__name__)

_MiB = 1 << 20
_GiB = 1 << 30
POOL_MAX_BYTES = 20 * _GiB
POOL_MIN_BYTES = 2 * _GiB
RESERVE_FRACTION = 10
"""The pool leaves the larger of 1/RESERVE_FRACTION of the host filesystem and RESERVE_MIN_BYTES free."""
RESERVE_MIN_BYTES = 5 * _GiB


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


class PoolTooSmall(Exception):
    """The host filesystem has too little room for a pool that leaves its reserve free."""


@dataclass(frozen=True)
class PoolSize:
    bytes: int
    reason: str


def pool_size(fs_total: int, fs_available: int) -> PoolSize:
    """How large a new pool may be on a host filesystem of ``fs_total`` bytes with ``fs_available`` free.

    The pool takes at most POOL_MAX_BYTES and always leaves a reserve free on the host
    filesystem: the larger of a tenth of it (what ext4 reserves for root is 5%; a tenth
    leaves that and logs, packages and the state directory room) and 5 GiB (on small
    disks a tenth is too little to upgrade a system). Sizes are whole MiB. Raises
    :class:`PoolTooSmall` when less than POOL_MIN_BYTES would be left for the pool.
    """
    reserve = max(fs_total // RESERVE_FRACTION, RESERVE_MIN_BYTES)
    room = fs_available - reserve
    if room < POOL_MIN_BYTES:
        raise PoolTooSmall(
            f"the host filesystem has {_gib(fs_available)} free; keeping {_gib(reserve)} of it free "
            f"(the larger of 1/{RESERVE_FRACTION} of its {_gib(fs_total)} and {_gib(RESERVE_MIN_BYTES)}) "
            f"leaves {_gib(max(room, 0))} for the image pool, and it needs at least {_gib(POOL_MIN_BYTES)}"
        )
    size = min(POOL_MAX_BYTES, room) // _MiB * _MiB
    why = (
        "the maximum"
        if size == POOL_MAX_BYTES
        else f"{_gib(fs_available)} free on the host filesystem less a reserve of {_gib(reserve)}"
    )
    return PoolSize(size, f"{_gib(size)} ({why}; the host filesystem keeps at least {_gib(reserve)} free)")


def _gib(size: int) -> str:
    return f"{size / _GiB:.1f} GiB"


def make_pool(layout: Layout) -> str | None:
    """Create the btrfs pool file once, preallocated. Returns what it chose and why, or None if it exists.

    Preallocated, not sparse: a sparse file takes host disk only as sandboxes write,
    so the reserve checked today could be gone tomorrow, and a loop file that cannot
    grow turns every write in the pool into an I/O error. Preallocation spends the
    pool's size up front (an instant ``fallocate``) and guarantees the reserve for
    the pool's lifetime; the box mounts it ``nodiscard`` so btrfs never punches holes
    back into it.
    """
    if layout.pool_image.exists():
        return None
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    stats = os.statvfs(layout.state_dir)
    size = pool_size(stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize)
    temporary = layout.pool_image.with_suffix(".tmp")
    temporary.unlink(missing_ok=True)
    _run(["fallocate", "-l", str(size.bytes), str(temporary)])
    _run(["mkfs.btrfs", "-q", "--nodiscard", str(temporary)])
    temporary.rename(layout.pool_image)
    return size.reason


def sparse_bytes(path: Path) -> int:
    """How much of a file's size has no disk blocks yet."""
    stats = path.stat()
    return max(stats.st_size - stats.st_blocks * 512, 0)


class QuotaMode(enum.Enum):
    """btrfs quota accounting, which machined's ``SetImageLimit`` (a qgroup limit) needs.

    SIMPLE (squota, Linux 6.7+) charges each extent to the subvolume that wrote it, so
    snapshot and delete do no backref walking: about as fast as no quotas. A snapshot
    starts at zero (the image's extents stay the template's), so a cap counts what the
    sandbox writes. CLASSIC qgroups count shared extents too (the image counts against
    the cap) and cost tens of ms per create and hundreds per destroy.
    """

    SIMPLE = "simple"
    CLASSIC = "classic"


_BTRFS_IOC_QUOTA_CTL = 0xC0109428  # _IOWR(0x94, 40, struct btrfs_ioctl_quota_ctl_args)
_BTRFS_IOC_FS_INFO = 0x8400941F  # _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args)
_QUOTA_CTL = {QuotaMode.CLASSIC: 1, QuotaMode.SIMPLE: 4}  # BTRFS_QUOTA_CTL_ENABLE(_SIMPLE_QUOTA)
_QUOTA_CTL_DISABLE = 2


def _btrfs_ioctl(directory: Path, request: int, argument: bytes) -> bytes:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buffer = bytearray(argument)
        fcntl.ioctl(fd, request, buffer)
        return bytes(buffer)
    finally:
        os.close(fd)


def quota_mode(machines_view: Path) -> QuotaMode | None:
    """The quota mode of the btrfs holding ``machines_view``, from ``/sys/fs/btrfs/FSID/qgroups``."""
    info = _btrfs_ioctl(machines_view, _BTRFS_IOC_FS_INFO, bytes(1024))
    qgroups = Path("/sys/fs/btrfs") / str(uuid.UUID(bytes=info[16:32])) / "qgroups"
    if not qgroups.is_dir():
        return None
    try:
        mode = (qgroups / "mode").read_text().strip()
    except FileNotFoundError:
        return QuotaMode.CLASSIC  # before Linux 6.7 there is no mode file and only classic qgroups
    return QuotaMode.SIMPLE if mode == "squota" else QuotaMode.CLASSIC


def enable_quotas(machines_view: Path, mode: QuotaMode) -> None:
    """Enable btrfs quotas in ``mode`` on the pool (a path the caller can open, such as the box's view).

    The ioctl directly: Debian 12's btrfs-progs (6.2) cannot enable simple quotas.
    An already enabled mode is kept as it is (switching loses every limit set).
    """
    _btrfs_ioctl(machines_view, _BTRFS_IOC_QUOTA_CTL, struct.pack("=QQ", _QUOTA_CTL[mode], 0))


def disable_quotas(machines_view: Path) -> None:
    _btrfs_ioctl(machines_view, _BTRFS_IOC_QUOTA_CTL, struct.pack("=QQ", _QUOTA_CTL_DISABLE, 0))


def choose_quotas(machines_view: Path, wanted: QuotaMode | None, own_filesystem: bool = True) -> str:
    """Put the pool in the wanted quota mode, or leave one it has; say what holds.

    ``own_filesystem``: the pool is a filesystem of its own. Otherwise (``/var/lib/machines``
    on a host's larger btrfs) quotas are left to the operator: simple quotas set an
    incompatible feature flag, and classic ones slow the whole filesystem.
    """
    current = quota_mode(machines_view)
    if wanted is not None and current is None and not own_filesystem:
        return (
            f"{machines_view} is not a filesystem of its own, so set-up does not enable quotas on it; "
            "policies with limits.*.disk are refused until you do (`btrfs quota enable --simple PATH` "
            "with btrfs-progs 6.7+, or `btrfs quota enable PATH`)"
        )
    if wanted is None:
        if current is None:
            return "disk quotas are off (--disk-quotas=off): policies with limits.*.disk are refused"
        return f"disk quotas stay on ({current.value}), as found; --disk-quotas=off does not switch them off"
    if current is not None:
        if current != wanted:
            return (
                f"disk quotas are on ({current.value}), as found; left so (switching modes drops every "
                "limit set: disable quotas on the pool first to change)"
            )
        return f"disk quotas are on ({current.value}): policies' limits.*.disk hold"
    try:
        enable_quotas(machines_view, wanted)
    except OSError as exc:
        if wanted is not QuotaMode.SIMPLE or exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        enable_quotas(machines_view, QuotaMode.CLASSIC)
        return (
            "this kernel has no simple quotas (Linux 6.7+): enabled classic btrfs qgroups instead, "
            "which make create and destroy slower; policies' limits.*.disk hold"
        )
    return f"enabled disk quotas ({wanted.value}) on the pool: policies' limits.*.disk hold"


DEFAULT_IMAGE = "default"
"""The image set-up builds (when missing or when its recipe changed); the others build on demand."""


async def run_setup(
    layout: Layout,
    disk_quotas: QuotaMode | None = QuotaMode.SIMPLE,
    image_dirs: tuple[Path, ...] = (DEFAULT_IMAGE_DIR,),
) -> int:
    """Everything ``make setup`` needs beyond Debian packages and the virtualenv."""
    import anyio.to_thread

    from .backend.bus import Bus
    from .backend.machine1 import Machined
    from .box import find_box, host_runs_systemd, stop_box
    from .images.build import BuildFailed, Progress, build_image, installed_digest
    from .images.catalog import Catalog
    from .images.recipe import RecipeError, find_recipe
    from .images.templates import Pool
    from .naming import template_image
    from .runtime import find_daemons

    try:
        source = find_recipe(DEFAULT_IMAGE, image_dirs)
    except RecipeError as exc:
        print(exc)
        return 1
    in_box = not host_runs_systemd()
    if in_box:
        try:
            chosen = make_pool(layout)
        except PoolTooSmall as exc:
            print(f"not creating the image pool {layout.pool_image}: {exc}")
            return 1
        if chosen is not None:
            print(f"created the image pool {layout.pool_image}: {chosen}")
        elif (unallocated := sparse_bytes(layout.pool_image)) > _GiB:
            print(
                f"the image pool {layout.pool_image} is sparse (made by an older set-up): it can still take "
                f"{_gib(unallocated)} more of the host filesystem; `fallocate -l "
                f"{layout.pool_image.stat().st_size} {layout.pool_image}` preallocates it"
            )
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
        pool = Pool.of(layout, box.pid if box else None)
        template = template_image(DEFAULT_IMAGE)
        if template in installed and installed_digest(pool, DEFAULT_IMAGE) == source.digest:
            print(f"image {DEFAULT_IMAGE!r} is installed ({template}), as its recipe says")
        else:
            why = "its recipe changed" if template in installed else "it is not installed"
            print(f"building image {DEFAULT_IMAGE!r} from {source.path} ({why}) ...")
            try:
                await build_image(source, pool, machined, Catalog(layout.images_dir), Progress())
            except BuildFailed as exc:
                print(exc)
                return 1
        own_filesystem = in_box or await anyio.Path(layout.machines_dir).is_mount()
        print(await anyio.to_thread.run_sync(choose_quotas, pool.view, disk_quotas, own_filesystem))
    finally:
        bus.disconnect()
        if in_box and not box_was_running:
            stop_box(layout)  # leave the host as set-up found it
    return 0
