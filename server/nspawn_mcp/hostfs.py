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
import ctypes
import errno
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import CopyRefused, NotFound, PolicyRefused
from .policy.paths import HostTarget, is_protected

__all__ = [
    "CopyStats",
    "check_same_beneath",
    "open_beneath",
    "publish_from_staging",
    "resolve_bind_source",
    "stage_from_host",
    "staging_area",
]

_SYS_OPENAT2 = 437  # the same number on every architecture (new-style syscall table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_CHUNK = 1 << 20


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class CopyStats:
    bytes: int
    sha256: str


def _openat2(dir_fd: int, path: str, flags: int, mode: int = 0) -> int:
    how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=mode, resolve=_RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    fd = int(_libc.syscall(_SYS_OPENAT2, dir_fd, path.encode(), ctypes.byref(how), ctypes.sizeof(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return fd


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


def _explain(exc: OSError, target: HostTarget) -> Exception:
    if exc.errno == errno.EXDEV or exc.errno == errno.ELOOP:
        return PolicyRefused(
            f"host path {target.path} leads outside the allowed directory {target.root} (symlink or '..')",
            rule="files.allowed_host_dirs",
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


def resolve_bind_source(target: HostTarget) -> str:
    """The real path of a bind's source, found beneath its allowed root; refused if it escapes.

    nspawn takes a path, so the path is resolved once here (symlinks followed only
    while they stay beneath the root) and that resolved path is what nspawn binds.
    """
    with open_beneath(target, os.O_PATH) as fd:
        real = os.readlink(f"/proc/self/fd/{fd}")
    if is_protected(real):
        raise PolicyRefused(
            f"host path {target.path} resolves into a protected location", rule="mounts.allowed"
        )
    if ":" in real or "," in real:
        raise CopyRefused(
            f"host path {target.path} resolves to a path with ':' or ','; nspawn cannot bind it"
        )
    return real


def check_same_beneath(root: str, relative: str, expected: os.stat_result) -> None:
    """Refuse unless ``relative``, resolved beneath ``root``, is still the object ``expected``.

    ``root`` may be the host tree as another mount namespace sees it (the private
    systemd's view): a source swapped for a symlink, or for another object, since
    it was checked is refused (HOSTILE-TESTS B11, up to the moment nspawn binds it).
    """
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _openat2(root_fd, relative, os.O_PATH)
    except OSError:
        raise CopyRefused("a mount's host path changed while the sandbox was being created") from None
    finally:
        os.close(root_fd)
    found = os.fstat(fd)
    os.close(fd)
    if (found.st_dev, found.st_ino) != (expected.st_dev, expected.st_ino):
        raise CopyRefused("a mount's host path changed while the sandbox was being created")
