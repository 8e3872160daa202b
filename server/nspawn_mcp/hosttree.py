"""Confined host-side directory trees for copy_file (what :mod:`nspawn_mcp.hostfs` does for files).

Threat: the host paths come from the agent, and the tree coming out of a sandbox
comes from its supervisor, which root inside may have replaced. So:

- to a sandbox: the host directory is opened beneath an allowed root (as for a
  file), then walked by descriptor, never following a symlink (``O_NOFOLLOW`` at
  each step). Regular files and directories go into a tar archive in the server's
  private staging area, counted against the cap; symlinks, devices, FIFOs and
  sockets are left out and counted. machined copies the archive in, and the
  supervisor unpacks it inside the jail.
- from a sandbox: :class:`TreePublication` builds the tree itself, entry by entry,
  from entries the protocol already bounded (plain relative names, no ``..``,
  only files and directories, sizes within the cap). Everything is created under a
  fresh hidden directory next to the destination with ``O_EXCL``/``O_NOFOLLOW``
  relative to directory descriptors, setuid/setgid bits dropped, and renamed into
  place only when complete (never replacing an existing path). Hostile archives are
  never handed to ``tarfile.extractall`` on the host. A cancelled copy removes the
  hidden directory; a killed server may leave it (``.NAME.nspawn-mcp-XXXXXXXX``).

Functions here block; callers run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from . import kernel
from .errors import CopyRefused, TooLarge
from .hostfs import open_beneath
from .policy.paths import HostTarget
from .sandbox.protocol import MAX_TREE_ENTRIES, TreeEntry

__all__ = ["TreePublication", "TreeStats", "is_directory", "stage_tree_from_host"]

_CHUNK = 1 << 20
_SKIPPED_SHOWN = 20


@dataclass(frozen=True)
class TreeStats:
    files: int
    directories: int
    bytes: int
    skipped: int
    skipped_examples: tuple[str, ...] = ()


def is_directory(target: HostTarget) -> bool:
    """Whether the confined host path is a directory (symlinks followed only beneath its root)."""
    with open_beneath(target, os.O_PATH) as fd:
        return stat.S_ISDIR(os.fstat(fd).st_mode)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


def stage_tree_from_host(target: HostTarget, area: Path, limit: int) -> tuple[Path, TreeStats]:
    """The confined host directory as a tar archive in ``area`` (regular files and directories only)."""
    archive = area / "tree.tar"
    counts = {"files": 0, "directories": 1, "bytes": 0, "skipped": 0}
    skipped: list[str] = []
    what = f"host directory {target.path}"

    def add_directory(tar: tarfile.TarFile, fd: int, relative: str) -> None:
        with os.scandir(fd) as scan:
            names = sorted(entry.name for entry in scan)
        for name in names:
            path = f"{relative}/{name}" if relative else name
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone meanwhile
            if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
                counts["skipped"] += 1
                if len(skipped) < _SKIPPED_SHOWN:
                    skipped.append(f"{path} ({_kind(info.st_mode)})")
                continue
            if counts["files"] + counts["directories"] >= MAX_TREE_ENTRIES:
                raise CopyRefused(f"{what} holds more than {MAX_TREE_ENTRIES} entries")
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
            if stat.S_ISDIR(info.st_mode):
                flags |= os.O_DIRECTORY
            child = os.open(name, flags, dir_fd=fd)
            try:
                now = os.fstat(child)
                if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                    raise CopyRefused(f"{what} changed while it was copied; try again")
                member = tarfile.TarInfo(path)
                member.mode = stat.S_IMODE(now.st_mode) & 0o777
                member.mtime = int(now.st_mtime)
                member.uid = member.gid = 0
                if stat.S_ISDIR(now.st_mode):
                    member.type = tarfile.DIRTYPE
                    tar.addfile(member)
                    counts["directories"] += 1
                    add_directory(tar, child, path)
                    continue
                counts["bytes"] += now.st_size
                if counts["bytes"] > limit:
                    raise TooLarge(
                        f"{what} holds more than the policy's limit of {limit} bytes of files "
                        "(files.max_copy_bytes)"
                    )
                member.size = now.st_size
                os.set_blocking(child, True)
                with os.fdopen(os.dup(child), "rb") as source:
                    tar.addfile(member, source)
                counts["files"] += 1
            finally:
                os.close(child)

    with open_beneath(target, os.O_RDONLY | os.O_DIRECTORY) as top, tarfile.open(archive, "w") as tar:
        try:
            add_directory(tar, top, "")
        except OSError as exc:
            raise CopyRefused(f"cannot read {what}: {os.strerror(exc.errno or 0)}") from None
    return archive, TreeStats(
        files=counts["files"],
        directories=counts["directories"],
        bytes=counts["bytes"],
        skipped=counts["skipped"],
        skipped_examples=tuple(skipped),
    )


class TreePublication:
    """A directory tree being built beneath an allowed root, invisible until :meth:`publish`.

    :meth:`discard` must follow, published or not: it removes what was not published.
    """

    def __init__(self, target: HostTarget, limit: int) -> None:
        parent, name = os.path.split(target.relative.rstrip("/"))
        if name in ("", ".", ".."):
            raise CopyRefused(f"host path {target.path} names an existing directory; give a new name")
        self._target, self._name, self._limit = target, name, limit
        with open_beneath(
            HostTarget(root=target.root, relative=parent or "."), os.O_PATH | os.O_DIRECTORY
        ) as fd:
            self._parent_fd = os.dup(fd)
        try:
            self._refuse_existing()
            self._staging: str | None = f".{name[:200]}.nspawn-mcp-{secrets.token_hex(4)}"
            os.mkdir(self._staging, 0o700, dir_fd=self._parent_fd)
            self._root_fd = os.open(
                self._staging,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=self._parent_fd,
            )
        except BaseException:
            os.close(self._parent_fd)
            raise
        self._file: int | None = None
        self._left = 0
        self.bytes = 0

    def _refuse_existing(self) -> None:
        try:
            os.stat(self._name, dir_fd=self._parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        raise CopyRefused(f"host path {self._target.path} already exists; copy a directory to a new name")

    def _parent_of(self, parts: tuple[str, ...]) -> int:
        """A descriptor of the directory holding the entry ``parts`` (made earlier), never through a link."""
        fd = os.dup(self._root_fd)
        for part in parts[:-1]:
            try:
                step = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            finally:
                os.close(fd)
            fd = step
        return fd

    def _close_file(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def add(self, entry: TreeEntry) -> None:
        """Make an entry: a directory, or an empty file its data will follow into."""
        if self._left:
            raise CopyRefused("the sandbox sent a new entry before the previous file was complete")
        self._close_file()
        parts = entry.parts
        try:
            parent = self._parent_of(parts)
            try:
                if entry.directory:
                    os.mkdir(parts[-1], entry.mode & 0o777 | 0o700, dir_fd=parent)
                else:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                    self._file = os.open(parts[-1], flags, entry.mode & 0o777 | 0o600, dir_fd=parent)
                    self._left = entry.size
            finally:
                os.close(parent)
        except (OSError, UnicodeEncodeError) as exc:
            reason = "a name the host cannot hold" if isinstance(exc, UnicodeEncodeError) else exc.strerror
            if isinstance(exc, OSError) and exc.errno in (
                errno.ENOENT,
                errno.ENOTDIR,
                errno.EEXIST,
                errno.ELOOP,
            ):
                reason = "an entry outside the tree sent so far, or sent twice"
            raise CopyRefused(f"the sandbox sent an invalid tree ({reason}); nothing was copied") from None

    def write(self, data: bytes) -> None:
        if self._file is None or len(data) > self._left:
            raise CopyRefused("the sandbox sent more bytes than the file's size; nothing was copied")
        self.bytes += len(data)
        if self.bytes > self._limit:
            raise TooLarge(f"the directory holds more than the policy's limit of {self._limit} bytes")
        self._left -= len(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._file, view) :]

    def publish(self) -> None:
        """Put the complete tree in place under its name (never replacing anything there)."""
        if self._left:
            raise CopyRefused("the sandbox ended the tree in the middle of a file; nothing was copied")
        self._close_file()
        os.fchmod(self._root_fd, 0o755)
        os.fsync(self._root_fd)
        assert self._staging is not None
        try:
            kernel.rename_noreplace(self._parent_fd, self._staging, self._parent_fd, self._name)
        except FileExistsError:
            raise CopyRefused(
                f"host path {self._target.path} already exists; copy a directory to a new name"
            ) from None
        self._staging = None

    def discard(self) -> None:
        self._close_file()
        os.close(self._root_fd)
        if self._staging is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._staging, dir_fd=self._parent_fd)
        os.close(self._parent_fd)
