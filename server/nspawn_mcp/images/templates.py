"""The template subvolumes in the image pool, and the one step that makes a prepared tree a template.

Set-up code (``image build``, ``image import``, ``setup``): it may use ``btrfs`` and
``nsenter``. The pool is machined's ``/var/lib/machines``; where the project runs its own
systemd (the box) that directory exists only in the box's mount namespace, so this process
reaches it through ``/proc/BOXPID/root`` (:attr:`Pool.view`) and runs commands in the box's
mount namespace (:meth:`Pool.enter`), where it is :attr:`Pool.path`.

:func:`install_template` replaces a template atomically: the prepared subvolume and the
template are swapped with one ``renameat2(RENAME_EXCHANGE)``, so a ``CloneImage`` racing the
swap snapshots the old tree or the new one, never nothing; sandboxes cloned before keep
running on their own snapshots. Then the old tree is deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import kernel
from ..layout import Layout
from ..naming import template_image

__all__ = ["Pool", "delete_subvolume", "install_template", "parse_os_release", "read_os_release"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pool:
    """machined's image directory: as this process sees it, and as commands run through :meth:`enter` do."""

    view: Path
    path: Path
    enter_pid: int | None = None

    @classmethod
    def of(cls, layout: Layout, box_pid: int | None) -> Pool:
        """The pool of the daemons in use: the box's (``box_pid``) or, on a systemd host, the host's."""
        if box_pid is None:
            return cls(layout.machines_dir, layout.machines_dir)
        view = Path(f"/proc/{box_pid}/root") / str(layout.machines_dir).lstrip("/")
        return cls(view, layout.machines_dir, box_pid)

    def enter(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in the pool's mount namespace."""
        if self.enter_pid is None:
            return list(argv)
        return ["nsenter", "-t", str(self.enter_pid), "-m", "--", *argv]

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.view / name)


def delete_subvolume(pool: Pool, name: str) -> None:
    """Delete the subvolume ``name`` of the pool if it exists (read-only or not)."""
    if not pool.exists(name):
        return
    subprocess.run(
        pool.enter(["btrfs", "subvolume", "delete", str(pool.path / name)]),
        check=True,
        stdout=subprocess.DEVNULL,
    )


def install_template(pool: Pool, staging: str, image: str) -> None:
    """Make the prepared subvolume ``staging`` (a name in the pool) the read-only template of ``image``.

    ``staging`` must be a btrfs subvolume in the pool holding a complete root tree (an
    import can pass the subvolume importd made). The template is replaced atomically and
    the previous one deleted; ``staging`` no longer exists afterwards. The caller then
    marks the template read-only through machined (``MarkImageReadOnly``), which this
    already made it at the btrfs level, so it is never published writable.
    """
    template = template_image(image)
    subprocess.run(
        pool.enter(["btrfs", "property", "set", "-ts", str(pool.path / staging), "ro", "true"]),
        check=True,
    )
    directory = os.open(pool.view, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            kernel.renameat2(directory, staging, directory, template, kernel.RENAME_EXCHANGE)
        except FileNotFoundError:
            if pool.exists(template) or not pool.exists(staging):
                raise
            kernel.renameat2(directory, staging, directory, template, kernel.RENAME_NOREPLACE)
            log.info("installed %s", template)
        else:
            log.info("replaced %s; deleting the previous tree", template)
            delete_subvolume(pool, staging)  # now the previous template
        os.fsync(directory)
    finally:
        os.close(directory)


def parse_os_release(text: str) -> dict[str, str]:
    """``os-release(5)``: KEY=value lines, values quoted shell-style; anything else is skipped (bounded)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or not key.isidentifier() or key.startswith("#"):
            continue
        try:
            words = shlex.split(value, posix=True)
        except ValueError:
            continue
        found[key] = " ".join(words)[:1024]
        if len(found) >= 64:
            break
    return found


def read_os_release(root: Path) -> dict[str, str]:
    """The os-release of the tree at ``root``, resolved as inside it (its symlinks cannot lead out)."""
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for path in ("etc/os-release", "usr/lib/os-release"):
            try:
                fd = kernel.openat2(directory, path, os.O_RDONLY, kernel.RESOLVE_IN_ROOT)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    continue
                raise
            with os.fdopen(fd, "rb") as file:
                return parse_os_release(file.read(65536).decode("utf-8", "replace"))
        return {}
    finally:
        os.close(directory)
