"""An in-memory Backend for fast tests of the service's logic (never the only proof)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc

from nspawn_mcp.backend.api import (
    CommandOutcome,
    CommandSpec,
    FileRead,
    OutputChunk,
    ProcessOutput,
    ProcessState,
)
from nspawn_mcp.backend.egress import SubnetPool
from nspawn_mcp.errors import CopyRefused, ExecFailed, NotFound, SandboxGone
from nspawn_mcp.policy import SandboxPlan


class Clock:
    """A clock the test moves by hand (``clock.now += timedelta(...)``)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


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
    adopted: list[str] = field(default_factory=list)

    commands: list[tuple[str, CommandSpec]] = field(default_factory=list)
    leftover_ids: set[str] = field(default_factory=set)
    create_error: BaseException | None = None
    create_gate: anyio.Event | None = None
    adopt_errors: dict[str, BaseException] = field(default_factory=dict)
    destroy_gate: anyio.Event | None = None
    """The next destroy waits for it (once)."""
    on_exec: Callable[[CommandSpec], CommandOutcome] = lambda spec: ok()
    oom_kill_counts: dict[str, int] = field(default_factory=dict)
    processes: dict[str, tuple[CommandSpec, float | None]] = field(default_factory=dict)
    subnets: SubnetPool = field(default_factory=SubnetPool)
    """The real bookkeeping the real backend's network keeps."""
    listening: dict[tuple[str, int], int] = field(default_factory=dict)
    """(sandbox, port inside) -> a port on the test's loopback that stands for it (connect goes there)."""

    async def available_images(self) -> set[str]:
        return set(self.images)

    def reserve_subnet(self, sandbox_id: str) -> str:
        return self.subnets.reserve(sandbox_id)

    async def create(self, sandbox_id: str, plan: SandboxPlan) -> None:
        self.sandboxes[sandbox_id] = plan
        if self.create_gate is not None:
            await self.create_gate.wait()
        if self.create_error is not None:
            raise self.create_error

    async def adopt(self, sandbox_id: str, plan: SandboxPlan) -> None:
        if sandbox_id in self.adopt_errors:
            raise self.adopt_errors[sandbox_id]
        self.adopted.append(sandbox_id)
        if plan.egress is not None and plan.egress.subnet is not None:
            self.subnets.claim(sandbox_id, plan.egress.subnet)

    async def destroy(self, sandbox_id: str) -> None:
        gate, self.destroy_gate = self.destroy_gate, None
        if gate is not None:
            await gate.wait()
        self.destroyed.append(sandbox_id)
        self.sandboxes.pop(sandbox_id, None)
        self.subnets.release(sandbox_id)
        self.leftover_ids.discard(sandbox_id)

    async def running(self) -> set[str]:
        return set(self.sandboxes)

    async def leftovers(self) -> set[str]:
        return set(self.leftover_ids)

    async def oom_kills(self, sandbox_id: str) -> int | None:
        return self.oom_kill_counts.get(sandbox_id, 0)

    def jail(self, sandbox_id: str) -> FakeJail:
        return FakeJail(self, sandbox_id)

    async def copy_in(self, sandbox_id: str, host_source: Path, container_destination: str) -> None:
        self.files[(sandbox_id, container_destination)] = host_source.read_bytes()


@dataclass
class FakeJail:
    backend: FakeBackend
    sandbox_id: str

    def _check(self) -> None:
        if self.sandbox_id not in self.backend.sandboxes:
            raise SandboxGone("the sandbox stopped while the request was running")

    async def run(
        self, spec: CommandSpec, on_output: Callable[[OutputChunk], Awaitable[None]] | None = None
    ) -> CommandOutcome:
        self._check()
        self.backend.commands.append((self.sandbox_id, spec))
        outcome = self.backend.on_exec(spec)
        if on_output is not None:
            await on_output(OutputChunk(stdout=outcome.stdout, stderr=outcome.stderr))
        return outcome

    async def spawn(self, spec: CommandSpec, timeout: float | None) -> str:
        self._check()
        process_id = f"p{len(self.backend.processes) + 1}"
        self.backend.processes[process_id] = (spec, timeout)
        return process_id

    def _state(self, process_id: str) -> ProcessState:
        if process_id not in self.backend.processes:
            raise NotFound(f"no background process {process_id!r}")
        spec, _ = self.backend.processes[process_id]
        return ProcessState(process_id, spec.argv, True, None, None, False, False, False)

    async def read(
        self, process_id: str, stdout_offset: int, stderr_offset: int, max_bytes: int
    ) -> ProcessOutput:
        self._check()
        output = b"0123456789"[stdout_offset : stdout_offset + max_bytes]
        return ProcessOutput(self._state(process_id), output, b"", stdout_offset + len(output), stderr_offset)

    async def write(self, process_id: str, data: bytes, close: bool) -> int:
        self._check()
        self._state(process_id)
        return len(data)

    async def kill(self, process_id: str, signal: int) -> ProcessState:
        self._check()
        return self._state(process_id)

    async def list(self) -> list[ProcessState]:
        self._check()
        return [self._state(process_id) for process_id in self.backend.processes]

    async def read_file(
        self, path: str, max_bytes: int, sink: Callable[[bytes], Awaitable[None]]
    ) -> FileRead:
        """As the supervisor does: symlinks and missing files refused, the cap checked before sending."""
        self._check()
        data = self.backend.files.get((self.sandbox_id, path))
        if data is None:
            raise CopyRefused(f"{path} does not exist in the sandbox")
        if data.startswith(b"symlink:"):
            raise CopyRefused(f"{path} is a symbolic link")
        if len(data) > max_bytes:
            raise CopyRefused(f"{path} has {len(data)} bytes, more than {max_bytes}")
        for start in range(0, len(data), 4096):
            await sink(data[start : start + 4096])
        return FileRead(size=len(data), mode=0o644)

    async def connect(self, port: int) -> anyio.abc.ByteStream:
        """As the supervisor does: a stream to what listens on ``port``, or ExecFailed if nothing does."""
        self._check()
        stand_in = self.backend.listening.get((self.sandbox_id, port))
        if stand_in is None:
            raise ExecFailed(f"nothing listens on port {port} in the sandbox (127.0.0.1 or ::1)")
        return await anyio.connect_tcp("127.0.0.1", stand_in)
