"""The interface between the service and whatever runs sandboxes.

The real implementation is :class:`nspawn_mcp.backend.nspawn.NspawnBackend`
(systemd + machined over D-Bus); unit tests of the service use an in-memory one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..policy import SandboxPlan

__all__ = ["Backend", "CommandOutcome", "CommandSpec"]


@dataclass(frozen=True)
class CommandSpec:
    argv: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    stdin: bytes
    timeout_seconds: float
    max_output_bytes: int


@dataclass(frozen=True)
class CommandOutcome:
    exit_code: int | None
    """None when the command was killed by a signal."""
    signal: int | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    duration_ms: float


class Backend(Protocol):
    @property
    def staging_dir(self) -> Path:
        """A host directory the backend's copy operations can read and write."""
        ...

    async def available_images(self) -> set[str]:
        """Names of the images sandboxes can be created from (``"default"``, ...)."""
        ...

    async def create(self, sandbox_id: str, plan: SandboxPlan) -> None:
        """Snapshot the image and start the sandbox; return once it accepts commands."""
        ...

    async def destroy(self, sandbox_id: str) -> None:
        """Remove everything of the sandbox. Idempotent: also cleans up a half-made one."""
        ...

    async def running(self) -> set[str]:
        """Ids of this server's sandboxes that are running now."""
        ...

    async def leftovers(self) -> set[str]:
        """Ids with some remains (snapshot, unit, directory) but no running sandbox."""
        ...

    async def exec(self, sandbox_id: str, spec: CommandSpec) -> CommandOutcome: ...

    async def copy_in(self, sandbox_id: str, host_source: Path, container_destination: str) -> None: ...

    async def copy_out(self, sandbox_id: str, container_source: str, host_destination: Path) -> None: ...
