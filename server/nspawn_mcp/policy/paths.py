"""Pure checks on paths: which host paths a request may touch.

Host paths are confined in two steps. Here, lexically: the path must be well
formed, contain no ``..`` component, and lie under one of the policy's allowed
roots. At I/O time (``nspawn_mcp.hostfs``) the remainder is opened beneath the
root's file descriptor with ``openat2(RESOLVE_BENEATH)``, so a symlink cannot lead
out of the root either. machined itself confines nothing on the host side.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidRequest, PolicyRefused

__all__ = [
    "DENIED_HOST_ROOTS",
    "MAX_PATH_BYTES",
    "RESERVED_SANDBOX_PATHS",
    "HostPathRule",
    "HostTarget",
    "check_container_path",
    "check_mount_target",
    "confine_host_path",
    "is_protected",
    "resolve_allowed_roots",
]

MAX_PATH_BYTES = 4096

DENIED_HOST_ROOTS: tuple[str, ...] = (
    "/",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/etc",
    "/boot",
    "/root/.ssh",
    "/var/lib/machines",
    "/var/lib/nspawn-mcp",
    "/var/run",
)
"""Never allowed as (or inside) an allowed host root, whatever a policy says.

``/`` is special-cased: it is denied as a root, not everything beneath it.
"""


HostPathRule = Literal["files.allowed_host_dirs", "mounts.allowed"]
"""The policy field whose roots a host path was confined to: copies' or mounts'. Refusals name it."""

_USE: dict[HostPathRule, str] = {"files.allowed_host_dirs": "copies", "mounts.allowed": "mounts"}


@dataclass(frozen=True)
class HostTarget:
    """A host path split into the allowed root it lies under and the rest."""

    root: str
    relative: str

    @property
    def path(self) -> str:
        return self.root if self.relative == "." else posixpath.join(self.root, self.relative)


def _check_syntax(path: str, what: str) -> None:
    if not path:
        raise InvalidRequest(f"{what} is empty")
    if "\x00" in path:
        raise InvalidRequest(f"{what} contains a NUL byte")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} is not valid UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidRequest(f"{what} is longer than {MAX_PATH_BYTES} bytes")


def _is_within(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


def is_protected(root: str) -> bool:
    """Whether ``root`` is, or lies inside, a directory on the deny list."""
    return any(root == denied or (denied != "/" and _is_within(root, denied)) for denied in DENIED_HOST_ROOTS)


def resolve_allowed_roots(directories: Iterable[str], cwd: str) -> tuple[str, ...]:
    """Make the policy's allowed directories absolute, dropping any on the deny list.

    Dropping rather than failing keeps sandboxes usable when, say, the server was
    started with ``/`` as its working directory: copies are then refused instead.
    """
    roots: list[str] = []
    for directory in directories:
        _check_syntax(directory, "allowed host directory")
        root = posixpath.normpath(posixpath.join(cwd, directory))
        if root.startswith("//"):
            root = "/" + root.lstrip("/")
        if not is_protected(root):
            roots.append(root)
    return tuple(roots)


def confine_host_path(
    path: str, roots: tuple[str, ...], cwd: str, *, rule: HostPathRule = "files.allowed_host_dirs"
) -> HostTarget:
    """Place ``path`` under one of ``roots`` (those of the policy field ``rule``) or refuse it.

    Relative paths are taken relative to ``cwd``. ``..`` components are refused
    outright rather than interpreted, since their meaning depends on symlinks.
    """
    _check_syntax(path, "host path")
    if not roots:
        raise PolicyRefused(
            f"this sandbox's policy allows no host directory for {_USE[rule]} (protected directories "
            "such as / or /etc never count)",
            rule=rule,
        )
    if ".." in path.split("/"):
        raise PolicyRefused(
            f"host path {path!r} contains '..'; use a path inside an allowed directory: " + ", ".join(roots),
            rule=rule,
        )
    absolute = posixpath.normpath(posixpath.join(cwd, path))
    if absolute.startswith("//"):
        absolute = "/" + absolute.lstrip("/")
    best: str | None = None
    for root in roots:
        if _is_within(absolute, root) and (best is None or len(root) > len(best)):
            best = root
    if best is None:
        raise PolicyRefused(
            f"host path {path!r} is outside the directories allowed for {_USE[rule]}: " + ", ".join(roots),
            rule=rule,
        )
    relative = posixpath.relpath(absolute, best)
    return HostTarget(root=best, relative=relative)


RESERVED_SANDBOX_PATHS: tuple[str, ...] = (
    "/",
    "/proc",
    "/sys",
    "/dev",
    "/run/nspawn-mcp",
    "/run/host",
    "/var/tmp/.nspawn-mcp",
)
"""Where a bind may never go inside a sandbox: the kernel's and nspawn's, and ours."""


def check_mount_target(path: str) -> str:
    """A bind's place inside the sandbox: absolute, plain, and off the reserved paths."""
    check_container_path(path)
    parts = path.split("/")
    if ".." in parts or "." in parts:
        raise InvalidRequest(f"sandbox mount path {path!r} must not contain '.' or '..'")
    if ":" in path or "," in path:
        raise InvalidRequest(f"sandbox mount path {path!r} must not contain ':' or ','")
    normal = posixpath.normpath(path)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    for reserved in RESERVED_SANDBOX_PATHS:
        if normal == reserved or (reserved != "/" and _is_within(normal, reserved)):
            raise InvalidRequest(
                f"sandbox mount path {path!r} is reserved; mount somewhere like /work or /data"
            )
    return normal


def check_container_path(path: str) -> str:
    """A path inside the sandbox: absolute and well formed. The sandbox confines the rest."""
    _check_syntax(path, "sandbox path")
    if not path.startswith("/"):
        raise InvalidRequest(f"sandbox path {path!r} must be absolute (start with '/')")
    return path
