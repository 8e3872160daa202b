"""The interface between the service and whatever runs sandboxes.

The real implementation is :class:`nspawn_mcp.backend.nspawn.NspawnBackend`
(systemd + machined over D-Bus); unit tests of the service use an in-memory one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

import anyio.abc

from ..policy import SandboxPlan
from ..sandbox.protocol import (
    CommandOutcome,
    FileEdited,
    FileListing,
    FileRead,
    FileSlice,
    FileWritten,
    OutputChunk,
    ProcessOutput,
    ProcessState,
    TreeEntry,
    TreeRead,
    TreeWritten,
)

__all__ = [
    "Backend",
    "CommandOutcome",
    "CommandSpec",
    "FileEdited",
    "FileListing",
    "FileRead",
    "FileSlice",
    "FileWritten",
    "Jail",
    "MeasuredUsage",
    "OutputChunk",
    "ProcessOutput",
    "ProcessState",
    "SnapshotImage",
    "SnapshotKind",
    "SnapshotRef",
    "TemplateImage",
    "TreeEntry",
    "TreeRead",
    "TreeWritten",
]


@dataclass(frozen=True)
class CommandSpec:
    argv: tuple[str, ...]
    cwd: str | None
    """None: the user's home directory."""
    env: Mapping[str, str]
    stdin: bytes
    timeout_seconds: float
    max_output_bytes: int
    """Per stream, as the supervisor captures it."""
    user: str = "root"
    keep: Literal["head", "tail"] = "head"
    """Past the cap: keep the start or the end of each stream."""


@dataclass(frozen=True)
class TemplateImage:
    """An image sandboxes can be created from, as the image pool reports it (no host paths)."""

    name: str
    """The name policies and ``create_sandbox(image=...)`` use (``"default"``)."""
    usage_bytes: int | None
    """Disk use as the pool counts it; None when it cannot tell (no quotas)."""
    created: datetime | None


SnapshotKind = Literal["snapshot", "kept", "fork"]
"""An agent's snapshot; one kept as an image (a template that outlives its sandbox); one taken only
for the forks of one call."""


@dataclass(frozen=True)
class SnapshotRef:
    """A read-only checkpoint of a sandbox's filesystem, as the service names it."""

    sandbox_id: str
    name: str
    kind: SnapshotKind = "snapshot"


@dataclass(frozen=True)
class SnapshotImage:
    """A snapshot as the image pool reports it."""

    ref: SnapshotRef
    created: datetime | None
    usage_bytes: int | None


@dataclass(frozen=True)
class MeasuredUsage:
    """What a running sandbox uses, as the daemons count it (None: they cannot tell)."""

    memory_bytes: int | None = None
    cpu_nsec: int | None = None
    tasks: int | None = None
    disk_bytes: int | None = None


class Jail(Protocol):
    """The requests a running sandbox answers (its in-jail supervisor)."""

    async def run(
        self, spec: CommandSpec, on_output: Callable[[OutputChunk], Awaitable[None]] | None = None
    ) -> CommandOutcome: ...

    async def spawn(self, spec: CommandSpec, timeout: float | None) -> str: ...

    async def read(
        self, process_id: str, stdout_offset: int, stderr_offset: int, max_bytes: int, tail: bool = False
    ) -> ProcessOutput:
        """Output after the offsets, at most ``max_bytes`` a stream; ``tail``: the newest, skipping older."""
        ...

    async def write(self, process_id: str, data: bytes, close: bool) -> int: ...

    async def kill(self, process_id: str, signal: int, wait: float = 0.0) -> ProcessState:
        """Signal the process (its whole group); then wait up to ``wait`` seconds for it to end."""
        ...

    async def list(self) -> list[ProcessState]: ...

    async def read_file(
        self, path: str, max_bytes: int, sink: Callable[[bytes], Awaitable[None]]
    ) -> FileRead:
        """Stream a regular file to ``sink`` as root in the sandbox may read it (not beyond ``max_bytes``)."""
        ...

    # File tools: paths are resolved inside the jail (see nspawn_mcp.sandbox.fileops).

    async def read_slice(
        self, path: str, offset: int, limit: int | None, max_bytes: int, encoding: str
    ) -> FileSlice: ...

    async def write_file(
        self, path: str, data: bytes, mode: int | None, make_parents: bool
    ) -> FileWritten: ...

    async def edit_file(self, path: str, old: str, new: str, count: int, max_bytes: int) -> FileEdited: ...

    async def list_files(
        self, path: str, pattern: str | None, depth: int, max_entries: int
    ) -> FileListing: ...

    async def read_tree(
        self,
        path: str,
        max_bytes: int,
        max_entries: int,
        on_entry: Callable[[TreeEntry], Awaitable[None]],
        on_data: Callable[[bytes], Awaitable[None]],
    ) -> TreeRead: ...

    async def extract_tar(self, archive: str, destination: str, max_bytes: int) -> TreeWritten: ...
    async def connect(self, port: int) -> anyio.abc.ByteStream:
        """A byte stream to ``port`` on the sandbox's own loopback (what a port forward carries);
        raises SandboxGone, or ExecFailed when nothing listens there."""
        ...


class Backend(Protocol):
    @property
    def staging_dir(self) -> Path:
        """A host directory the backend's copy operations can read and write."""
        ...

    async def available_images(self) -> set[str]:
        """Names of the images sandboxes can be created from (``"default"``, ...)."""
        ...

    async def images(self) -> list[TemplateImage]:
        """The images sandboxes can be created from, with what the pool knows of each, by name."""
        ...

    def reserve_subnet(self, sandbox_id: str) -> str:
        """A /30 for a new egress sandbox (its plan's ``egress.subnet``), held until :meth:`destroy`.

        Synchronous, so a create can reserve between its quota check and registering the
        sandbox without an await, and concurrent creates cannot take the same subnet.
        Raises QuotaExceeded when none is left, BackendError without egress networking.
        """
        ...

    async def create(
        self, sandbox_id: str, plan: SandboxPlan, source: SnapshotRef | str | None = None
    ) -> None:
        """Snapshot the image and start the sandbox; return once it accepts commands.

        ``source``: start from a snapshot instead of the plan's image, or from a copy of the
        current filesystem of the running sandbox of that id (its processes frozen for the copy).
        """
        ...

    async def snapshot(self, snapshot: SnapshotRef) -> None:
        """A read-only copy of the running sandbox's filesystem, its processes frozen for the instant."""
        ...

    async def restore(self, sandbox_id: str, plan: SandboxPlan, snapshot: SnapshotRef) -> None:
        """Stop the sandbox, put the snapshot in place of its filesystem and start it again as
        :meth:`create` does (same id, plan and network); return once it accepts commands."""
        ...

    async def remove_snapshot(self, snapshot: SnapshotRef) -> None:
        """Remove the snapshot's image. Idempotent."""
        ...

    async def snapshots(self) -> list[SnapshotImage]:
        """Every snapshot this server's sandboxes took that is still in the pool, kept ones included."""
        ...

    async def adapt(self, sandbox_id: str, started: SandboxPlan, plan: SandboxPlan) -> None:
        """Make a running sandbox, started for ``started`` (a pooled one), one for ``plan``: its caps
        (memory, CPU, tasks, disk) and, for egress, its network; the rest of the plans must match
        (see :func:`nspawn_mcp.pool.fits`)."""
        ...

    async def adopt(self, sandbox_id: str, plan: SandboxPlan) -> None:
        """Take a running sandbox over after a server restart (restart what serves it, hold its subnet)."""
        ...

    async def kill(self, sandbox_id: str) -> None:
        """Kill every process of the sandbox (SIGKILL): once this returns nothing of it runs, and its
        remains are left for :meth:`destroy`. Idempotent; a sandbox that is not running is no error."""
        ...

    async def destroy(self, sandbox_id: str) -> None:
        """Remove everything of the sandbox (its subnet is released). Idempotent: also cleans up a
        half-made one."""
        ...

    async def running(self) -> set[str]:
        """Ids of this server's sandboxes that are running now."""
        ...

    async def leftovers(self) -> set[str]:
        """Ids with some remains (snapshot, unit, directory) but no running sandbox."""
        ...

    async def oom_kills(self, sandbox_id: str) -> int | None:
        """How many processes the OOM killer has killed in the sandbox so far (None: unknown)."""
        ...

    async def usage(self, sandbox_id: str) -> MeasuredUsage:
        """Memory, CPU time and tasks of the sandbox's slice, and its filesystem's disk use; a
        figure the daemons cannot tell (no accounting, no quotas) is None."""
        ...

    def jail(self, sandbox_id: str) -> Jail:
        """The sandbox's supervisor; requests raise SandboxGone if it is not running."""
        ...

    async def copy_in(self, sandbox_id: str, host_source: Path, container_destination: str) -> None: ...
