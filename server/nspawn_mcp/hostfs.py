"""Confined host-side file I/O for copy_file.

machined's CopyToMachine/CopyFromMachine confine nothing on the host side: they
follow host symlinks, and CopyFrom recreates symlinks as symlinks. So the server
never hands machined an agent-chosen host path. Instead:

- to a sandbox: the host file is opened with ``openat2(RESOLVE_BENEATH |
  RESOLVE_NO_MAGICLINKS)`` relative to an allowed root (no symlink or ``..`` can
  leave it), must be a regular file within the size cap, and is copied into a
  private staging directory; machined copies from there.
- from a sandbox: machined writes into a private staging directory; what it wrote
  must be a regular file (not a symlink, device, FIFO or directory) within the
  size cap; it is copied to a temporary file in the destination directory (opened
  beneath the root the same way) with setuid/setgid bits dropped, then renamed
  into place, so no half-written file is ever visible.

Functions here block; callers run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import kernel
from .backend.attach import writable_root_refusal
from .errors import CopyRefused, NotFound, PolicyRefused
from .policy.paths import HostTarget, is_protected

__all__ = [
    "BindSource",
    "CopyStats",
    "open_beneath",
    "publish_from_staging",
    "resolve_bind_source",
    "stage_from_host",
    "staging_area",
]

_BENEATH = kernel.RESOLVE_BENEATH | kernel.RESOLVE_NO_MAGICLINKS
_CHUNK = 1 << 20


@dataclass(frozen=True)
class CopyStats:
    bytes: int
    sha256: str


def _openat2(dir_fd: int, path: str, flags: int, mode: int = 0) -> int:
    return kernel.openat2(dir_fd, path, flags, _BENEATH, mode)


def _open_root(root: str) -> int:
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if is_protected(os.readlink(f"/proc/self/fd/{fd}")):
        os.close(fd)
        raise PolicyRefused(
            "an allowed host directory resolves into a protected location", rule="files.allowed_host_dirs"
        )
    return fd


@contextlib.contextmanager
def open_beneath(target: HostTarget, flags: int, mode: int = 0) -> Iterator[int]:
    """Open ``target.relative`` beneath ``target.root``; refuse anything that escapes it."""
    try:
        root_fd = _open_root(target.root)
    except FileNotFoundError:
        raise NotFound(f"allowed host directory {target.root} does not exist") from None
    try:
        fd = _openat2(root_fd, target.relative, flags, mode)
    except OSError as exc:
        raise _explain(exc, target) from None
    finally:
        os.close(root_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _explain(exc: OSError, target: HostTarget, rule: str = "files.allowed_host_dirs") -> Exception:
    if exc.errno == errno.EXDEV or exc.errno == errno.ELOOP:
        return PolicyRefused(
            f"host path {target.path} leads outside the allowed directory {target.root} (symlink or '..')",
            rule=rule,
        )
    if exc.errno == errno.ENOENT:
        return NotFound(f"host path {target.path} does not exist")
    if exc.errno == errno.ENOTDIR:
        return CopyRefused(f"a component of host path {target.path} is not a directory")
    if exc.errno == errno.EISDIR:
        return CopyRefused(f"host path {target.path} is a directory; copy_file copies single regular files")
    if exc.errno == errno.EACCES:
        return CopyRefused(f"permission denied on host path {target.path}")
    return CopyRefused(f"cannot open host path {target.path}: {os.strerror(exc.errno or 0)}")


def _copy_fd(source: int, destination: int, limit: int, what: str) -> CopyStats:
    digest = hashlib.sha256()
    total = 0
    while chunk := os.read(source, _CHUNK):
        total += len(chunk)
        if total > limit:
            raise CopyRefused(
                f"{what} is larger than the policy's limit of {limit} bytes (files.max_copy_bytes)"
            )
        digest.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(destination, view) :]
    return CopyStats(bytes=total, sha256=digest.hexdigest())


def _require_regular(info: os.stat_result, what: str, limit: int) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise CopyRefused(f"{what} is a symbolic link; copy_file copies regular files only")
    if stat.S_ISDIR(info.st_mode):
        raise CopyRefused(f"{what} is a directory; copy_file copies single regular files")
    if not stat.S_ISREG(info.st_mode):
        raise CopyRefused(f"{what} is not a regular file (device, FIFO or socket)")
    if info.st_size > limit:
        raise CopyRefused(f"{what} is larger than the policy's limit of {limit} bytes (files.max_copy_bytes)")


@contextlib.contextmanager
def staging_area(staging_dir: Path) -> Iterator[Path]:
    """A fresh private directory under ``staging_dir``, removed afterwards."""
    area = staging_dir / secrets.token_hex(8)
    area.mkdir(mode=0o700)
    try:
        yield area
    finally:
        shutil.rmtree(area, ignore_errors=True)


def stage_from_host(target: HostTarget, area: Path, limit: int) -> tuple[Path, CopyStats]:
    """Copy the confined host file into ``area``; return the staged path and its stats."""
    with open_beneath(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY) as source:
        _require_regular(os.fstat(source), f"host path {target.path}", limit)
        os.set_blocking(source, True)
        staged = area / "file"
        destination = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            stats = _copy_fd(source, destination, limit, f"host path {target.path}")
        finally:
            os.close(destination)
    return staged, stats


def publish_from_staging(staged: Path, target: HostTarget, limit: int, what: str) -> CopyStats:
    """Move what machined wrote to ``staged`` to the confined host ``target``, atomically."""
    try:
        info = os.lstat(staged)
    except FileNotFoundError:
        raise CopyRefused(f"{what} produced nothing to copy") from None
    _require_regular(info, what, limit)
    parent, name = os.path.split(target.relative)
    if name in ("", ".", ".."):
        raise CopyRefused(f"host path {target.path} names a directory; give a file name")
    directory = HostTarget(root=target.root, relative=parent or ".")
    source = os.open(staged, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with open_beneath(directory, os.O_PATH | os.O_DIRECTORY) as dir_fd:
            temporary = f".{name}.nspawn-mcp-{secrets.token_hex(4)}"
            mode = stat.S_IMODE(info.st_mode) & 0o777 & ~0o022 | 0o600
            out = os.open(
                temporary,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode,
                dir_fd=dir_fd,
            )
            try:
                stats = _copy_fd(source, out, limit, what)
                os.fsync(out)
            except BaseException:
                os.close(out)
                os.unlink(temporary, dir_fd=dir_fd)
                raise
            os.close(out)
            try:
                os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except OSError as exc:
                os.unlink(temporary, dir_fd=dir_fd)
                raise _explain(exc, target) from None
    finally:
        os.close(source)
    return stats


@dataclass(frozen=True)
class BindSource:
    """A bind's source as found on the host: its allowed root's and its own real path, and its identity."""

    root: str
    path: str
    device: int
    inode: int


def resolve_bind_source(target: HostTarget, *, writable: bool) -> BindSource:
    """Find a bind's source beneath its allowed root; refuse it if it escapes or may not be bound.

    Symlinks are followed only while they stay beneath the root. Only directories
    and regular files can be bound. A writable bind's root must pass
    :func:`~nspawn_mcp.backend.attach.writable_root_refusal` (root inside writes as
    its owner). The identity (st_dev, st_ino) is what the bind helper checks again
    when it mounts the source, so a path swapped meanwhile is refused.
    """
    try:
        root_fd = _open_root(target.root)
    except FileNotFoundError:
        raise NotFound(f"allowed host directory {target.root} does not exist") from None
    try:
        real_root = os.readlink(f"/proc/self/fd/{root_fd}")
        if writable:
            root = os.fstat(root_fd)
            refusal = writable_root_refusal(root.st_uid, root.st_gid, root.st_mode)
            if refusal is not None:
                raise PolicyRefused(
                    f"{target.root} cannot be bound writable: {refusal}", rule="mounts.allowed"
                )
        try:
            fd = kernel.openat2(root_fd, target.relative, os.O_PATH, _BENEATH)
        except OSError as exc:
            raise _explain(exc, target, rule="mounts.allowed") from None
    finally:
        os.close(root_fd)
    try:
        info = os.fstat(fd)
        real = os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    if is_protected(real):
        raise PolicyRefused(
            f"host path {target.path} resolves into a protected location", rule="mounts.allowed"
        )
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        raise PolicyRefused(
            f"host path {target.path} is not a directory or a regular file (socket, device or FIFO)",
            rule="mounts.allowed",
        )
    return BindSource(root=real_root, path=real, device=info.st_dev, inode=info.st_ino)
