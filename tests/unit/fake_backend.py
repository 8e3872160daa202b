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
    FileEdited,
    FileListing,
    FileRead,
    FileSlice,
    FileWritten,
    MeasuredUsage,
    OutputChunk,
    ProcessOutput,
    ProcessState,
    SnapshotImage,
    SnapshotRef,
    TemplateImage,
    TreeEntry,
    TreeRead,
    TreeWritten,
)
from nspawn_mcp.backend.egress import SubnetPool
from nspawn_mcp.errors import CopyRefused, ExecFailed, NotFound, SandboxGone, TooLarge
from nspawn_mcp.policy import SandboxPlan
from nspawn_mcp.sandbox.protocol import FileEntry, text_lines


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
    installed: set[str] = field(default_factory=lambda: {"default"})
    """The images sandboxes can be created from."""
    image_sizes: dict[str, int] = field(default_factory=dict)
    sandboxes: dict[str, SandboxPlan] = field(default_factory=dict)
    files: dict[tuple[str, str], bytes] = field(default_factory=dict)
    destroyed: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    """Pooled sandboxes handed out (their caps changed)."""
    adapt_error: BaseException | None = None

    commands: list[tuple[str, CommandSpec]] = field(default_factory=list)
    leftover_ids: set[str] = field(default_factory=set)
    create_error: BaseException | None = None
    create_gate: anyio.Event | None = None
    adopt_errors: dict[str, BaseException] = field(default_factory=dict)
    destroy_gate: anyio.Event | None = None
    """The next destroy waits for it (once)."""
    on_exec: Callable[[CommandSpec], CommandOutcome] = lambda spec: ok()
    oom_kill_counts: dict[str, int] = field(default_factory=dict)
    """What usage() reports (None for a sandbox not in it)."""
    processes: dict[str, tuple[CommandSpec, float | None]] = field(default_factory=dict)
    process_output: bytes = b"0123456789"
    """What every background process has written to stdout."""
    ignored_signals: set[int] = field(default_factory=set)
    """Signals background processes survive (as STOP and CONT always are)."""
    ended: dict[str, int] = field(default_factory=dict)
    """Background processes a signal ended, and the signal."""
    subnets: SubnetPool = field(default_factory=SubnetPool)
    """The real bookkeeping the real backend's network keeps."""
    listening: dict[tuple[str, int], int] = field(default_factory=dict)
    """(sandbox, port inside) -> a port on the test's loopback that stands for it (connect goes there)."""
    measured: dict[str, MeasuredUsage] = field(default_factory=dict)
    """What usage() reports per sandbox; nothing known for the others."""
    snapshot_images: dict[SnapshotRef, dict[str, bytes]] = field(default_factory=dict)
    """Snapshots in the pool: each a copy of its sandbox's files (``files``) when it was taken."""
    sources: dict[str, SnapshotRef | str | None] = field(default_factory=dict)
    """What each sandbox was made from (create's ``source``)."""
    restored: list[tuple[str, SnapshotRef]] = field(default_factory=list)
    snapshot_error: BaseException | None = None

    async def images(self) -> list[TemplateImage]:
        kept = {f"{ref.sandbox_id}-{ref.name}" for ref in self.snapshot_images if ref.kind == "kept"}
        return [
            TemplateImage(name=name, usage_bytes=self.image_sizes.get(name), created=None)
            for name in sorted(self.installed | kept)
        ]

    async def available_images(self) -> set[str]:
        return {image.name for image in await self.images()}

    def _files_of(self, sandbox_id: str) -> dict[str, bytes]:
        return {path: data for (owner, path), data in self.files.items() if owner == sandbox_id}

    def _put_files(self, sandbox_id: str, files: dict[str, bytes]) -> None:
        for key in [key for key in self.files if key[0] == sandbox_id]:
            del self.files[key]
        self.files.update({(sandbox_id, path): data for path, data in files.items()})

    async def snapshot(self, snapshot: SnapshotRef) -> None:
        if snapshot.sandbox_id not in self.sandboxes:
            raise SandboxGone("the sandbox stopped while the request was running")
        if self.snapshot_error is not None:
            raise self.snapshot_error
        self.snapshot_images[snapshot] = self._files_of(snapshot.sandbox_id)

    async def restore(self, sandbox_id: str, plan: SandboxPlan, snapshot: SnapshotRef) -> None:
        self.restored.append((sandbox_id, snapshot))
        self.processes.clear()
        self._put_files(sandbox_id, dict(self.snapshot_images[snapshot]))

    async def remove_snapshot(self, snapshot: SnapshotRef) -> None:
        self.snapshot_images.pop(snapshot, None)

    async def snapshots(self) -> list[SnapshotImage]:
        return [SnapshotImage(ref=ref, created=None, usage_bytes=None) for ref in self.snapshot_images]

    def reserve_subnet(self, sandbox_id: str) -> str:
        return self.subnets.reserve(sandbox_id)

    async def create(
        self, sandbox_id: str, plan: SandboxPlan, source: SnapshotRef | str | None = None
    ) -> None:
        self.sources[sandbox_id] = source
        if isinstance(source, str):
            self._put_files(sandbox_id, self._files_of(source))
        elif source is not None:
            self._put_files(sandbox_id, dict(self.snapshot_images[source]))
        self.sandboxes[sandbox_id] = plan
        if self.create_gate is not None:
            await self.create_gate.wait()
        if self.create_error is not None:
            raise self.create_error

    async def adapt(self, sandbox_id: str, started: SandboxPlan, plan: SandboxPlan) -> None:
        if self.adapt_error is not None:
            raise self.adapt_error
        assert self.sandboxes[sandbox_id] == started
        self.adapted.append(sandbox_id)
        self.sandboxes[sandbox_id] = plan

    async def adopt(self, sandbox_id: str, plan: SandboxPlan) -> None:
        if sandbox_id in self.adopt_errors:
            raise self.adopt_errors[sandbox_id]
        self.adopted.append(sandbox_id)
        if plan.egress is not None and plan.egress.subnet is not None:
            self.subnets.claim(sandbox_id, plan.egress.subnet)

    async def kill(self, sandbox_id: str) -> None:
        self.killed.append(sandbox_id)
        if self.sandboxes.pop(sandbox_id, None) is not None:  # not running, not removed either
            self.leftover_ids.add(sandbox_id)

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

    async def usage(self, sandbox_id: str) -> MeasuredUsage:
        return self.measured.get(sandbox_id, MeasuredUsage())

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
        signal = self.backend.ended.get(process_id)
        return ProcessState(process_id, spec.argv, signal is None, None, signal, False, False, False)

    async def read(
        self, process_id: str, stdout_offset: int, stderr_offset: int, max_bytes: int, tail: bool = False
    ) -> ProcessOutput:
        self._check()
        written = self.backend.process_output
        start = max(stdout_offset, len(written) - max_bytes) if tail else stdout_offset
        output = written[start : start + max_bytes]
        return ProcessOutput(self._state(process_id), output, b"", start + len(output), stderr_offset)

    async def write(self, process_id: str, data: bytes, close: bool) -> int:
        self._check()
        self._state(process_id)
        return len(data)

    async def kill(self, process_id: str, signal: int, wait: float = 0.0) -> ProcessState:
        """As the supervisor: a signal the process does not survive ends it before the answer."""
        self._check()
        self._state(process_id)
        if signal not in self.backend.ignored_signals | {19, 18} and process_id not in self.backend.ended:
            self.backend.ended[process_id] = signal
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

    # -- file tools: a flat map of paths to bytes; a directory is any prefix of a stored path --

    def _file(self, path: str) -> bytes:
        self._check()
        data = self.backend.files.get((self.sandbox_id, path))
        if data is None:
            raise CopyRefused(f"{path} does not exist in the sandbox")
        return data

    def _is_directory(self, path: str) -> bool:
        prefix = path.rstrip("/") + "/"
        return any(s == self.sandbox_id and p.startswith(prefix) for s, p in self.backend.files)

    async def read_slice(
        self, path: str, offset: int, limit: int | None, max_bytes: int, encoding: str
    ) -> FileSlice:
        data = self._file(path)
        binary = encoding == "base64" or (encoding == "auto" and b"\x00" in data[:8192])
        if binary:
            piece = data[offset : offset + min(limit or max_bytes, max_bytes)]
            end = offset + len(piece)
            return FileSlice(True, piece, offset, end, end, len(data), end >= len(data), False, 0o644, 0.0)
        lines = data.splitlines(keepends=True)[offset:]
        chosen: list[bytes] = []
        for line in lines[: limit or len(lines)]:
            if sum(map(len, chosen)) + len(line) > max_bytes:
                break
            chosen.append(line)
        piece = b"".join(chosen)
        start = sum(map(len, data.splitlines(keepends=True)[:offset]))
        end = start + len(piece)
        return FileSlice(
            False,
            piece,
            offset,
            offset + text_lines(piece),
            end,
            len(data),
            end >= len(data),
            False,
            0o644,
            0.0,
        )

    async def write_file(self, path: str, data: bytes, mode: int | None, make_parents: bool) -> FileWritten:
        self._check()
        created = (self.sandbox_id, path) not in self.backend.files
        self.backend.files[(self.sandbox_id, path)] = data
        return FileWritten(size=len(data), mode=0o644 if mode is None else mode, created=created)

    async def edit_file(self, path: str, old: str, new: str, count: int, max_bytes: int) -> FileEdited:
        data = self._file(path)
        if len(data) > max_bytes:
            raise TooLarge(f"{path} is {len(data)} bytes, more than the limit of {max_bytes}")
        found = data.count(old.encode())
        if found == 0:
            raise CopyRefused(f"the text to replace was not found in {path}")
        if found != count:
            raise CopyRefused(f"the text to replace occurs {found} times in {path}, not {count}")
        edited = data.replace(old.encode(), new.encode())
        self.backend.files[(self.sandbox_id, path)] = edited
        return FileEdited(replaced=found, size=len(edited))

    async def list_files(self, path: str, pattern: str | None, depth: int, max_entries: int) -> FileListing:
        self._check()
        if not self._is_directory(path):
            raise CopyRefused(f"{path} is not a directory")
        prefix = path.rstrip("/") + "/"
        names = sorted(
            p.removeprefix(prefix)
            for s, p in self.backend.files
            if s == self.sandbox_id and p.startswith(prefix)
        )
        entries = [
            FileEntry(name, "file", len(self.backend.files[(self.sandbox_id, prefix + name)]), 0o644, 0.0)
            for name in names
            if name.count("/") < depth
        ]
        return FileListing(entries=tuple(entries[:max_entries]), truncated=len(entries) > max_entries)

    async def read_tree(
        self,
        path: str,
        max_bytes: int,
        max_entries: int,
        on_entry: Callable[[TreeEntry], Awaitable[None]],
        on_data: Callable[[bytes], Awaitable[None]],
    ) -> TreeRead:
        listing = await self.list_files(path, None, 64, max_entries)
        total = 0
        made: set[str] = set()
        for entry in listing.entries:
            parts = entry.path.split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in made:
                    made.add(directory)
                    await on_entry(TreeEntry(directory, True, 0o755, 0))
            data = self._file(path.rstrip("/") + "/" + entry.path)
            total += len(data)
            await on_entry(TreeEntry(entry.path, False, 0o644, len(data)))
            if data:
                await on_data(data)
        return TreeRead(files=len(listing.entries), directories=len(made), bytes=total, skipped=0)

    async def extract_tar(self, archive: str, destination: str, max_bytes: int) -> TreeWritten:
        import io
        import tarfile

        data = self.backend.files.pop((self.sandbox_id, archive))
        files = directories = total = 0
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                if member.isdir():
                    directories += 1
                    continue
                source = tar.extractfile(member)
                assert source is not None
                content = source.read()
                total += len(content)
                self.backend.files[(self.sandbox_id, destination.rstrip("/") + "/" + member.name)] = content
                files += 1
        return TreeWritten(files=files, directories=directories, bytes=total)

    async def connect(self, port: int) -> anyio.abc.ByteStream:
        """As the supervisor does: a stream to what listens on ``port``, or ExecFailed if nothing does."""
        self._check()
        stand_in = self.backend.listening.get((self.sandbox_id, port))
        if stand_in is None:
            raise ExecFailed(f"nothing listens on port {port} in the sandbox (127.0.0.1 or ::1)")
        return await anyio.connect_tcp("127.0.0.1", stand_in)
