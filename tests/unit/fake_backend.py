"""An in-memory Backend for fast tests of the service's logic (never the only proof)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from nspawn_mcp.backend.api import CommandOutcome, CommandSpec
from nspawn_mcp.errors import NotFound, SandboxGone
from nspawn_mcp.policy import SandboxPlan


def ok(stdout: bytes = b"", stderr: bytes = b"", exit_code: int = 0) -> CommandOutcome:
    return CommandOutcome(
        exit_code=exit_code,
        signal=None,
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=False,
        stderr_truncated=False,
        timed_out=False,
        duration_ms=1.0,
    )


@dataclass
class FakeBackend:
    staging_dir: Path
    images: set[str] = field(default_factory=lambda: {"default"})
    sandboxes: dict[str, SandboxPlan] = field(default_factory=dict)
    files: dict[tuple[str, str], bytes] = field(default_factory=dict)
    destroyed: list[str] = field(default_factory=list)
    commands: list[tuple[str, CommandSpec]] = field(default_factory=list)
    leftover_ids: set[str] = field(default_factory=set)
    create_error: BaseException | None = None
    create_gate: anyio.Event | None = None
    on_exec: Callable[[CommandSpec], CommandOutcome] = lambda spec: ok()

    async def available_images(self) -> set[str]:
        return set(self.images)

    async def create(self, sandbox_id: str, plan: SandboxPlan) -> None:
        self.sandboxes[sandbox_id] = plan
        if self.create_gate is not None:
            await self.create_gate.wait()
        if self.create_error is not None:
            raise self.create_error

    async def destroy(self, sandbox_id: str) -> None:
        self.destroyed.append(sandbox_id)
        self.sandboxes.pop(sandbox_id, None)
        self.leftover_ids.discard(sandbox_id)

    async def running(self) -> set[str]:
        return set(self.sandboxes)

    async def leftovers(self) -> set[str]:
        return set(self.leftover_ids)

    async def exec(self, sandbox_id: str, spec: CommandSpec) -> CommandOutcome:
        if sandbox_id not in self.sandboxes:
            raise SandboxGone("gone")
        self.commands.append((sandbox_id, spec))
        return self.on_exec(spec)

    async def copy_in(self, sandbox_id: str, host_source: Path, container_destination: str) -> None:
        self.files[(sandbox_id, container_destination)] = host_source.read_bytes()

    async def copy_out(self, sandbox_id: str, container_source: str, host_destination: Path) -> None:
        data = self.files.get((sandbox_id, container_source))
        if data is None:
            raise NotFound("copying out of the sandbox: no such file or directory")
        if data.startswith(b"symlink:"):
            os.symlink(data.removeprefix(b"symlink:").decode(), host_destination)
        else:
            host_destination.write_bytes(data)
