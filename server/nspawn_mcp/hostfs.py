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
from .errors import CopyRefused, InvalidRequest, NotFound, PolicyRefused, SandboxError
from .policy.paths import HostPathRule, HostTarget, is_protected

__all__ = [
    "BindSource",
    "CopyStats",
    "Publication",
    "open_beneath",
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


def _open_root(target: HostTarget, rule: HostPathRule) -> int:
    """The allowed root, as an O_PATH descriptor; refused if it resolves into a protected place."""
    try:
        fd = os.open(target.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if rule == "mounts.allowed":
            raise PolicyRefused(f"allowed host directory {target.root} does not exist", rule=rule) from None
        raise NotFound(f"allowed host directory {target.root} does not exist") from None
    if is_protected(os.readlink(f"/proc/self/fd/{fd}")):
        os.close(fd)
        raise PolicyRefused("an allowed host directory resolves into a protected location", rule=rule)
    return fd


@contextlib.contextmanager
def open_beneath(target: HostTarget, flags: int, mode: int = 0) -> Iterator[int]:
    """Open ``target.relative`` beneath ``target.root`` for a copy; refuse anything that escapes it."""
    root_fd = _open_root(target, "files.allowed_host_dirs")
    try:
        fd = _openat2(root_fd, target.relative, flags, mode)
    except OSError as exc:
        raise _explain(exc, target, "files.allowed_host_dirs") from None
    finally:
        os.close(root_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _explain(exc: OSError, target: HostTarget, rule: HostPathRule) -> SandboxError:
    """What the agent reads when opening a host path for a copy or a mount failed."""
    if exc.errno == errno.EXDEV or exc.errno == errno.ELOOP:
        return PolicyRefused(
            f"host path {target.path} leads outside the allowed directory {target.root} (symlink or '..')",
            rule=rule,
        )
    if rule == "mounts.allowed":
        reason = {
            errno.ENOENT: "it does not exist",
            errno.ENOTDIR: "a component of it is not a directory",
            errno.EACCES: "permission denied",
        }.get(exc.errno or 0, os.strerror(exc.errno or 0))
        return InvalidRequest(f"host path {target.path} cannot be mounted: {reason}")
    if exc.errno == errno.ENOENT:
        return NotFound(f"host path {target.path} does not exist")
    if exc.errno == errno.ENOTDIR:
        return CopyRefused(f"a component of host path {target.path} is not a directory")
    if exc.errno == errno.EISDIR:
        return CopyRefused(f"host path {target.path} is a directory; copy_file copies single regular files")
    if exc.errno == errno.EACCES:
        return CopyRefused(f"permission denied on host path {target.path}")
    return CopyRefused(f"cannot open host path {target.path}: {os.strerror(exc.errno or 0)}")


class _CappedWriter:
    """Writes to ``fd``, counting bytes against the policy's cap and hashing them."""

    def __init__(self, fd: int, limit: int, what: str) -> None:
        self._fd, self._limit, self._what = fd, limit, what
        self._digest = hashlib.sha256()
        self.bytes = 0

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

    def stats(self) -> CopyStats:
        return CopyStats(bytes=self.bytes, sha256=self._digest.hexdigest())


def _copy_fd(source: int, destination: int, limit: int, what: str) -> CopyStats:
    writer = _CappedWriter(destination, limit, what)
    while chunk := os.read(source, _CHUNK):
        writer.write(chunk)
    return writer.stats()


def _temporary_name(name: str) -> str:
    """A hidden name next to ``name`` for a file not yet complete."""
    return f".{name}.nspawn-mcp-{secrets.token_hex(4)}"


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
        self._target, self._name = target, name
        directory = HostTarget(root=target.root, relative=parent or ".")
        with open_beneath(directory, os.O_PATH | os.O_DIRECTORY) as fd:
            self._dir_fd = os.dup(fd)
        self._temporary: str | None = None  # a named temporary, where O_TMPFILE is not supported
        try:
            self._fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=self._dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
                os.close(self._dir_fd)
                raise _explain(exc, target, "files.allowed_host_dirs") from None
            self._temporary = _temporary_name(name)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(self._temporary, flags, 0o600, dir_fd=self._dir_fd)
        self._writer = _CappedWriter(self._fd, limit, what)

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def publish(self, mode: int) -> CopyStats:
        """Put the complete file in place, atomically replacing what was there (a symlink is replaced)."""
        os.fchmod(self._fd, mode & 0o777 & ~0o022 | 0o600)
        os.fsync(self._fd)
        if self._temporary is None:
            self._temporary = _temporary_name(self._name)
            os.link(f"/proc/self/fd/{self._fd}", self._temporary, dst_dir_fd=self._dir_fd)
        try:
            os.rename(self._temporary, self._name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except OSError as exc:
            raise _explain(exc, self._target, "files.allowed_host_dirs") from None
        self._temporary = None
        return self._writer.stats()

    def discard(self) -> None:
        os.close(self._fd)
        if self._temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._temporary, dir_fd=self._dir_fd)
        os.close(self._dir_fd)


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
    root_fd = _open_root(target, "mounts.allowed")
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
