"""Confined host-side file I/O for copy_file.

machined's CopyToMachine/CopyFromMachine confine nothing on the host side: they
follow host symlinks, and CopyFrom recreates symlinks as symlinks. So the server
never hands machined an agent-chosen host path. Instead:

- to a sandbox: the host file is opened with ``openat2(RESOLVE_BENEATH |
  RESOLVE_NO_MAGICLINKS)`` relative to an allowed root (no symlink or ``..`` can
  leave it), must be a regular file within the size cap, and is copied into a
  private staging directory; machined copies from there.
- from a sandbox: the bytes come from the sandbox's own supervisor (so only what
  root in the sandbox may read comes out, and type and size are checked as the
  sandbox sees them before a byte moves). They are written to an unnamed file
  (``O_TMPFILE``) in the destination directory, opened beneath the root the same
  way, counted against the cap as they arrive, and only a complete file is linked
  into place (setuid/setgid bits dropped): a cancelled or killed copy leaves
  nothing behind, not even a hidden temporary file.

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
    "Publication",
    "check_same_beneath",
    "open_beneath",
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


class Publication:
    """A file being written beneath an allowed root, invisible until :meth:`publish`.

    :meth:`discard` must follow, published or not: it drops what was not published.
    """

    def __init__(self, target: HostTarget, limit: int, what: str) -> None:
        parent, name = os.path.split(target.relative)
        if name in ("", ".", ".."):
            raise CopyRefused(f"host path {target.path} names a directory; give a file name")
        self._target, self._name, self._limit, self._what = target, name, limit, what
        self._digest = hashlib.sha256()
        self.bytes = 0
        directory = HostTarget(root=target.root, relative=parent or ".")
        with open_beneath(directory, os.O_PATH | os.O_DIRECTORY) as fd:
            self._dir_fd = os.dup(fd)
        self._temporary: str | None = None  # a named temporary, where O_TMPFILE is not supported
        try:
            self._fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=self._dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
                os.close(self._dir_fd)
                raise _explain(exc, target) from None
            self._temporary = f".{name}.nspawn-mcp-{secrets.token_hex(4)}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(self._temporary, flags, 0o600, dir_fd=self._dir_fd)

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.bytes > self._limit:
            raise CopyRefused(
                f"{self._what} is larger than the policy's limit of {self._limit} bytes "
                "(files.max_copy_bytes)"
            )
        self._digest.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def publish(self, mode: int) -> CopyStats:
        """Put the complete file in place, atomically replacing what was there (a symlink is replaced)."""
        os.fchmod(self._fd, mode & 0o777 & ~0o022 | 0o600)
        os.fsync(self._fd)
        if self._temporary is None:
            self._temporary = f".{self._name}.nspawn-mcp-{secrets.token_hex(4)}"
            os.link(f"/proc/self/fd/{self._fd}", self._temporary, dst_dir_fd=self._dir_fd)
        try:
            os.rename(self._temporary, self._name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except OSError as exc:
            raise _explain(exc, self._target) from None
        self._temporary = None
        return CopyStats(bytes=self.bytes, sha256=self._digest.hexdigest())

    def discard(self) -> None:
        os.close(self._fd)
        if self._temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._temporary, dir_fd=self._dir_fd)
        os.close(self._dir_fd)


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
