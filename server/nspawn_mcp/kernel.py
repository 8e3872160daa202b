"""Linux system calls the standard library lacks: ``openat2`` and the new mount API.

Thin ``ctypes`` wrappers that raise :class:`OSError` like ``os`` does. Standard
library only, so the bind helper (:mod:`nspawn_mcp.backend.attach`) that imports it
starts in a few milliseconds. The syscall numbers are those of the unified table
(the same on x86_64 and aarch64); ``renameat2`` is glibc's (2.28+).
"""

from __future__ import annotations

import ctypes
import os

__all__ = [
    "AT_EMPTY_PATH",
    "AT_FDCWD",
    "AT_RECURSIVE",
    "CLONE_NEWNS",
    "CLONE_NEWUSER",
    "MOUNT_ATTR_IDMAP",
    "MOUNT_ATTR_NODEV",
    "MOUNT_ATTR_NOEXEC",
    "MOUNT_ATTR_NOSUID",
    "MOUNT_ATTR_RDONLY",
    "MOVE_MOUNT_F_EMPTY_PATH",
    "MOVE_MOUNT_T_EMPTY_PATH",
    "MS_PRIVATE",
    "OPEN_TREE_CLOEXEC",
    "OPEN_TREE_CLONE",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "RESOLVE_BENEATH",
    "RESOLVE_IN_ROOT",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "openat2",
    "renameat2",
    "setfsid",
    "setns",
    "unshare",
]

_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

RENAME_NOREPLACE = 0x1
RENAME_EXCHANGE = 0x2

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40

MOUNT_ATTR_RDONLY = 0x01
MOUNT_ATTR_NOSUID = 0x02
MOUNT_ATTR_NODEV = 0x04
MOUNT_ATTR_NOEXEC = 0x08
MOUNT_ATTR_IDMAP = 0x100000
MS_PRIVATE = 1 << 18

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), what)
    return result


def openat2(dir_fd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """``openat2(2)``; ``O_CLOEXEC`` is always added."""
    how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=mode, resolve=resolve)
    return _check(
        int(_libc.syscall(_SYS_OPENAT2, dir_fd, path.encode(), ctypes.byref(how), ctypes.sizeof(how))),
        path,
    )


def renameat2(old_dir_fd: int, old: str, new_dir_fd: int, new: str, flags: int) -> None:
    """``renameat2(2)``: ``RENAME_EXCHANGE`` swaps two names atomically; ``RENAME_NOREPLACE``."""
    _check(
        int(_libc.renameat2(old_dir_fd, old.encode(), new_dir_fd, new.encode(), flags)),
        f"renameat2 {old} {new}",
    )


def open_tree(dir_fd: int, path: str, flags: int) -> int:
    return _check(int(_libc.syscall(_SYS_OPEN_TREE, dir_fd, path.encode(), flags)), "open_tree")


def move_mount(from_fd: int, from_path: str, to_fd: int, to_path: str, flags: int) -> None:
    _check(
        int(_libc.syscall(_SYS_MOVE_MOUNT, from_fd, from_path.encode(), to_fd, to_path.encode(), flags)),
        "move_mount",
    )


def mount_setattr(
    dir_fd: int, path: str, flags: int, *, attr_set: int = 0, propagation: int = 0, userns_fd: int = 0
) -> None:
    attr = _MountAttr(attr_set=attr_set, attr_clr=0, propagation=propagation, userns_fd=userns_fd)
    _check(
        int(
            _libc.syscall(
                _SYS_MOUNT_SETATTR, dir_fd, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)
            )
        ),
        "mount_setattr",
    )


def setns(fd: int, nstype: int) -> None:
    """Only for a single-threaded process: a mount namespace cannot be entered otherwise."""
    _check(int(_libc.setns(fd, nstype)), "setns")


def unshare(flags: int) -> None:
    _check(int(_libc.unshare(flags)), "unshare")


def setfsid(uid: int, gid: int) -> None:
    """Set the filesystem uid and gid (which decide who creates files) of the calling thread."""
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)


RENAME_NOREPLACE = 0x1


def rename_noreplace(old_dir_fd: int, old: str, new_dir_fd: int, new: str) -> None:
    """``renameat2(..., RENAME_NOREPLACE)``: fails with EEXIST rather than replace ``new``."""
    _check(
        int(_libc.renameat2(old_dir_fd, os.fsencode(old), new_dir_fd, os.fsencode(new), RENAME_NOREPLACE)),
        "renameat2",
    )
