"""Attach a running sandbox's host binds: the helper process, and its protocol.

Run as ``python -m nspawn_mcp.backend.attach`` by :mod:`.binds`, one short-lived
process per sandbox create, because it enters the sandbox's mount namespace and a
multithreaded process (the server) cannot. One JSON :class:`AttachRequest` on
stdin, one JSON :class:`AttachReply` on stdout, both bounded. Standard library
only, so it starts in milliseconds.

For each bind:

1. The source is opened beneath its allowed root with ``openat2(RESOLVE_BENEATH |
   RESOLVE_NO_SYMLINKS)``, in the server's own mount namespace (where the policy
   checked it), by the real paths the check resolved (:func:`open_checked_source`),
   and must still be the very object (st_dev, st_ino) the check found: what gets
   mounted is that descriptor, so a path swapped after the check cannot be mounted
   instead (HOSTILE-TESTS B11).
2. ``open_tree(OPEN_TREE_CLONE)`` makes a detached mount of exactly that object and
   ``mount_setattr`` sets ``nosuid,nodev`` (``noexec`` if the policy says), ``ro``
   unless writable, and an ID map (see :func:`writable_root_refusal` for why writable
   binds get their own):

   - read-only: the sandbox's user namespace (``0 S 65536``): files show their real
     owners inside, as in the image;
   - writable: a user namespace made here whose only mapping is ``D S 1`` (uid) and
     ``G S 1`` (gid), D:G owning the allowed root on the host and S the sandbox's
     uid shift: what root inside writes belongs to D on the host, never to host
     root; other owners' files show as ``nobody`` and only root inside can write.

3. The mount reaches the sandbox by propagation, not by a move into its namespace.
   nspawn makes the sandbox's mount namespace owned by the sandbox's user namespace,
   and root inside keeps CAP_SYS_ADMIN there: a mount moved straight in could be
   remounted ``rw,suid`` from inside (measured: it can). Mounts that propagate into a
   namespace of a less privileged user namespace are locked by the kernel
   (MNT_LOCK_READONLY, _NOSUID, _NODEV, _NOEXEC, and the ID map cannot be changed).
   So the helper clones, inside the sandbox's namespace, the mount that holds the
   target (a peer of it, since nspawn's mounts are shared), moves that clone into a
   private mount namespace of its own (owned by the host's user namespace) and
   mounts the prepared tree there: the kernel copies it, locked, onto the target in
   the sandbox. The private namespace dies with the helper; the sandbox's copy stays.

Mount points missing in the sandbox are created as root inside (fsuid S), resolved
with ``RESOLVE_IN_ROOT`` so a symlink inside cannot lead out of the sandbox's root.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .. import kernel

__all__ = [
    "MAX_REPLY_BYTES",
    "MAX_REQUEST_BYTES",
    "AttachReply",
    "AttachRequest",
    "BindSpec",
    "open_checked_source",
    "writable_root_refusal",
]

MAX_REQUEST_BYTES = 1 << 20
MAX_REPLY_BYTES = 64 << 10
_IDS = 65536  # uids an nspawn --private-users=pick sandbox gets

ReplyKind = Literal["ok", "refused", "changed", "missing", "failed"]


def writable_root_refusal(uid: int, gid: int, mode: int) -> str | None:
    """Why a directory may not be the root of writable binds, or None if it may.

    Root inside writes through a writable bind as the root's owner D:G. That is
    safe only if D is not host root and no other host user can reach what the
    sandbox writes: a setuid-D (or setgid-G) program planted there would make any
    host user who can run it D. So the root must be owned by an unprivileged user
    and group, with no permissions for group or others (mode & 0o077 == 0).
    """
    if uid == 0 or gid == 0:
        return (
            "root inside would write as host root; give the directory to an unprivileged owner "
            "(user and group other than 0)"
        )
    if stat.S_IMODE(mode) & 0o077:
        return (
            "other host users can reach it, and could run programs the sandbox plants there as its "
            "owner; make it accessible to its owner only (chmod 700)"
        )
    return None


@dataclass(frozen=True)
class BindSpec:
    root: str
    """The allowed root, as the policy resolved it (a path in the server's mount namespace)."""
    relative: str
    """The source beneath ``root``."""
    device: int
    inode: int
    """The source's (st_dev, st_ino) when the policy checked it."""
    target: str
    writable: bool
    noexec: bool


@dataclass(frozen=True)
class AttachRequest:
    sandbox: str
    """``/proc/LEADER`` of the sandbox's init, as the server reaches it."""
    binds: tuple[BindSpec, ...]

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> AttachRequest:
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
        raw = json.loads(data)
        return cls(sandbox=str(raw["sandbox"]), binds=tuple(_bind_spec(item) for item in raw["binds"]))


def _bind_spec(raw: dict[str, Any]) -> BindSpec:
    spec = BindSpec(
        root=raw["root"],
        relative=raw["relative"],
        device=raw["device"],
        inode=raw["inode"],
        target=raw["target"],
        writable=raw["writable"],
        noexec=raw["noexec"],
    )
    for name in ("root", "relative", "target"):
        if not isinstance(getattr(spec, name), str):
            raise ValueError(f"{name} must be a string")
    for name in ("device", "inode"):
        if type(getattr(spec, name)) is not int:
            raise ValueError(f"{name} must be an integer")
    for name in ("writable", "noexec"):
        if not isinstance(getattr(spec, name), bool):
            raise ValueError(f"{name} must be a boolean")
    return spec


@dataclass(frozen=True)
class AttachReply:
    kind: ReplyKind
    message: str = ""
    """For the agent: what went wrong with which bind (no raw system error text)."""
    detail: str = ""
    """For the server's log."""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> AttachReply:
        if len(data) > MAX_REPLY_BYTES:
            raise ValueError("reply too large")
        raw = json.loads(data)
        kind = raw["kind"]
        if kind not in ("ok", "refused", "changed", "missing", "failed"):
            raise ValueError(f"unknown reply kind {kind!r}")
        return cls(kind=kind, message=str(raw["message"])[:1024], detail=str(raw["detail"])[:4096])


class _Refusal(Exception):
    def __init__(self, kind: ReplyKind, message: str) -> None:
        super().__init__(message)
        self.kind: ReplyKind = kind


# -- the helper --------------------------------------------------------------------


@dataclass(frozen=True)
class _Sandbox:
    userns: int
    mntns: int
    root: int
    uid_shift: int
    gid_shift: int


def _shift(path: str) -> int:
    with open(path) as lines:
        fields = lines.read().split()
    if len(fields) != 3 or fields[0] != "0" or int(fields[2]) < _IDS:
        raise _Refusal("failed", "the sandbox's user namespace is not the one nspawn makes")
    return int(fields[1])


def _open_sandbox(proc: str) -> _Sandbox:
    userns = os.open(f"{proc}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    mntns = os.open(f"{proc}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    root = os.open(f"{proc}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if os.fstat(userns).st_ino == os.stat("/proc/self/ns/user").st_ino:
        raise _Refusal("failed", "the sandbox has no user namespace of its own")
    if os.fstat(mntns).st_ino == os.stat("/proc/self/ns/mnt").st_ino:
        raise _Refusal("failed", "the sandbox has no mount namespace of its own")
    uid_shift, gid_shift = _shift(f"{proc}/uid_map"), _shift(f"{proc}/gid_map")
    if uid_shift == 0 or gid_shift == 0:
        raise _Refusal("failed", "the sandbox's root is host root")
    return _Sandbox(userns, mntns, root, uid_shift, gid_shift)


def _owner_userns(uid: int, gid: int, sandbox: _Sandbox) -> int:
    """A user namespace mapping only D -> S (uid) and G -> S (gid), as a descriptor."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only holds the namespace open
        try:
            os.close(ready_r)
            os.close(go_w)
            kernel.unshare(kernel.CLONE_NEWUSER)
            # its pid as /proc numbers it, which need not be the pid namespace fork() answered in
            # (the daemon in the private systemd lives in its pid namespace, with the host's /proc)
            os.write(ready_w, os.readlink("/proc/self").encode())
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        seen_as = os.read(ready_r, 32).decode()
        if not seen_as.isdigit():
            raise _Refusal("failed", "could not make a user namespace for a writable bind")
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{uid} {sandbox.uid_shift} 1\n"),
            ("gid_map", f"{gid} {sandbox.gid_shift} 1\n"),
        ):
            with open(f"/proc/{seen_as}/{name}", "w") as file:
                file.write(text)
        return os.open(f"/proc/{seen_as}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(go_w)
        os.close(ready_r)
        os.waitpid(child, 0)


_CHANGED = "a mount's host path changed while the sandbox was being created"


def open_checked_source(spec: BindSpec) -> tuple[int, os.stat_result]:
    """Step 1: the checked source as an ``O_PATH`` descriptor, and its allowed root's status.

    Both are reached the way the check resolved them, so what is compared is the object
    the check found: ``spec.root`` and ``spec.relative`` are real paths (the check
    resolved any symlink in the policy's root, such as ``/tmp/link`` to ``/tmp/real``),
    so they are walked without following any symlink. A component swapped for a
    symlink since, or a source that is not the checked (st_dev, st_ino), is refused
    as changed. Raises :class:`_Refusal`.
    """
    no_symlinks = kernel.RESOLVE_NO_SYMLINKS | kernel.RESOLVE_NO_MAGICLINKS
    try:
        root_fd = kernel.openat2(
            kernel.AT_FDCWD, spec.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, no_symlinks
        )
    except FileNotFoundError:
        raise _Refusal("missing", f"allowed host directory {spec.root} no longer exists") from None
    except OSError:
        raise _Refusal("changed", _CHANGED) from None
    try:
        root_info = os.fstat(root_fd)
        try:
            source = kernel.openat2(
                root_fd,
                spec.relative,
                os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                kernel.RESOLVE_BENEATH | no_symlinks,
            )
        except OSError:
            raise _Refusal("changed", _CHANGED) from None
    finally:
        os.close(root_fd)
    info = os.fstat(source)
    if (info.st_dev, info.st_ino) != (spec.device, spec.inode):
        os.close(source)
        raise _Refusal("changed", _CHANGED)
    return source, root_info


def _prepare(spec: BindSpec, sandbox: _Sandbox, userns_by_owner: dict[tuple[int, int], int]) -> int:
    """The detached, ID-mapped, flagged mount of the checked source."""
    source, root_info = open_checked_source(spec)
    try:
        if spec.writable:
            refusal = writable_root_refusal(root_info.st_uid, root_info.st_gid, root_info.st_mode)
            if refusal is not None:
                raise _Refusal("refused", f"{spec.root} cannot be bound writable: {refusal}")
        tree = kernel.open_tree(
            source, "", kernel.OPEN_TREE_CLONE | kernel.OPEN_TREE_CLOEXEC | kernel.AT_EMPTY_PATH
        )
    finally:
        os.close(source)
    attributes = kernel.MOUNT_ATTR_IDMAP | kernel.MOUNT_ATTR_NOSUID | kernel.MOUNT_ATTR_NODEV
    if spec.noexec:
        attributes |= kernel.MOUNT_ATTR_NOEXEC
    if spec.writable:
        owner = (root_info.st_uid, root_info.st_gid)
        if owner not in userns_by_owner:
            userns_by_owner[owner] = _owner_userns(*owner, sandbox)
        userns = userns_by_owner[owner]
    else:
        attributes |= kernel.MOUNT_ATTR_RDONLY
        userns = sandbox.userns
    kernel.mount_setattr(tree, "", kernel.AT_EMPTY_PATH, attr_set=attributes, userns_fd=userns)
    return tree


@contextlib.contextmanager
def _as_root_inside(sandbox: _Sandbox) -> Iterator[None]:
    kernel.setfsid(sandbox.uid_shift, sandbox.gid_shift)
    try:
        yield
    finally:
        kernel.setfsid(0, 0)


def _mount_point(sandbox: _Sandbox, target: str, directory: bool) -> int:
    """``target`` inside the sandbox (made if missing), as an O_PATH descriptor."""
    resolve = kernel.RESOLVE_IN_ROOT | kernel.RESOLVE_NO_MAGICLINKS
    parts = [part for part in target.split("/") if part]
    at = kernel.openat2(sandbox.root, "/", os.O_PATH | os.O_DIRECTORY, resolve)
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        flags = os.O_PATH | (os.O_DIRECTORY if directory or not last else 0)
        try:
            found = kernel.openat2(at, part, flags, resolve)
        except FileNotFoundError:
            with _as_root_inside(sandbox):
                if directory or not last:
                    os.mkdir(part, 0o755, dir_fd=at)
                else:
                    os.close(
                        os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=at)
                    )
            found = kernel.openat2(at, part, flags, resolve)
        os.close(at)
        at = found
    return at


def _attach_all(request: AttachRequest) -> None:
    sandbox = _open_sandbox(request.sandbox)
    userns_by_owner: dict[tuple[int, int], int] = {}
    trees = [_prepare(spec, sandbox, userns_by_owner) for spec in request.binds]
    kinds = [stat.S_ISDIR(os.fstat(tree).st_mode) for tree in trees]

    # A mount namespace of our own, owned by the host's user namespace, where nothing propagates to the host.
    kernel.unshare(kernel.CLONE_NEWNS)
    kernel.mount_setattr(kernel.AT_FDCWD, "/", kernel.AT_RECURSIVE, propagation=kernel.MS_PRIVATE)
    private = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    for spec, tree, directory in zip(request.binds, trees, kinds, strict=True):
        kernel.setns(sandbox.mntns, kernel.CLONE_NEWNS)
        try:
            point = _mount_point(sandbox, spec.target, directory)
        except OSError as exc:
            raise _Refusal("failed", f"cannot make the mount point {spec.target} in the sandbox") from exc
        peer = kernel.open_tree(
            point, "", kernel.OPEN_TREE_CLONE | kernel.OPEN_TREE_CLOEXEC | kernel.AT_EMPTY_PATH
        )
        os.close(point)
        kernel.setns(private, kernel.CLONE_NEWNS)
        kernel.move_mount(peer, "", kernel.AT_FDCWD, "/", kernel.MOVE_MOUNT_F_EMPTY_PATH)
        kernel.move_mount(tree, "", peer, "", kernel.MOVE_MOUNT_F_EMPTY_PATH | kernel.MOVE_MOUNT_T_EMPTY_PATH)
        # out of the peer group it just joined: what the next bind stacks on it here must not propagate
        kernel.mount_setattr(tree, "", kernel.AT_EMPTY_PATH, propagation=kernel.MS_PRIVATE)
        os.close(peer)
        os.close(tree)
        kernel.setns(sandbox.mntns, kernel.CLONE_NEWNS)
        resolve = kernel.RESOLVE_IN_ROOT | kernel.RESOLVE_NO_MAGICLINKS
        check = kernel.openat2(sandbox.root, spec.target, os.O_PATH, resolve)
        info = os.fstat(check)
        os.close(check)
        if (info.st_dev, info.st_ino) != (spec.device, spec.inode):
            raise _Refusal("failed", f"the bind at {spec.target} did not reach the sandbox")


def main() -> int:
    try:
        request = AttachRequest.decode(sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1))
    except (ValueError, KeyError, TypeError) as exc:
        reply = AttachReply("failed", "internal error attaching binds", f"bad request: {exc}")
    else:
        try:
            _attach_all(request)
            reply = AttachReply("ok")
        except _Refusal as refusal:
            cause = refusal.__cause__
            reply = AttachReply(refusal.kind, str(refusal), repr(cause) if cause else "")
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, "?")
            reply = AttachReply(
                "failed", "binding a host directory into the sandbox failed", f"{code}: {exc}"
            )
    sys.stdout.buffer.write(reply.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
