"""How a tool's result is sent: the structured content is the result, the text a short summary.

A reply carries the result once, as structured content (``null`` fields left out), and
a few lines of text for people and for clients that show only text: the exit code,
sizes, truncation, the first and last lines of output. Never a second copy of the JSON,
so the output caps bound the whole reply. Pure: no I/O.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from mcp_types import CallToolResult, TextContent
from pydantic import BaseModel

from .models import (
    CopyResult,
    DestroyResult,
    ExecResult,
    ExposedPort,
    FileContent,
    FileEditResult,
    FileList,
    FileWriteResult,
    ForkResult,
    ImageList,
    PolicyDocument,
    ProcessInfo,
    ProcessList,
    ProcessOutputResult,
    RestoreResult,
    SandboxInfo,
    SandboxList,
    SnapshotDeleted,
    SnapshotInfo,
    SnapshotList,
    StdinWritten,
    UnexposedPort,
)

__all__ = ["reply", "structured", "summary"]

EDGE_LINES = 3
"""Lines shown from the start and from the end of each output stream."""
LINE_CHARS = 160
"""A longer line is cut in the summary (never in the structured result)."""
_LISTED = 10

R = TypeVar("R", bound=BaseModel)


def reply(result: BaseModel) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=summary(result))], structured_content=structured(result)
    )


def structured(result: BaseModel) -> dict[str, Any]:
    """The result as JSON data, without ``null`` fields (absent means 'does not apply')."""
    return result.model_dump(mode="json", exclude_none=True)


@functools.singledispatch
def summary(result: BaseModel) -> str:
    """A few lines saying what happened; the structured content has everything."""
    return type(result).__name__


def _summarizes(kind: type[R]) -> Callable[[Callable[[R], str]], Callable[[R], str]]:
    def register(function: Callable[[R], str]) -> Callable[[R], str]:
        summary.register(kind)(function)
        return function

    return register


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    if count < 1 << 20:
        return f"{count / 1024:.1f} KiB"
    return f"{count / (1 << 20):.1f} MiB"


def _cut(line: str) -> str:
    return line if len(line) <= LINE_CHARS else line[:LINE_CHARS] + "..."


def _edges(name: str, text: str) -> list[str]:
    """A stream's first and last lines, indented under its name; nothing for an empty stream."""
    lines = text.splitlines()
    if not lines:
        return []
    if len(lines) <= 2 * EDGE_LINES:
        shown = [_cut(line) for line in lines]
    else:
        skipped = len(lines) - 2 * EDGE_LINES
        shown = [
            *(_cut(line) for line in lines[:EDGE_LINES]),
            f"[... {skipped} more lines ...]",
            *(_cut(line) for line in lines[-EDGE_LINES:]),
        ]
    return [f"{name}:", *("  " + line for line in shown)]


def _streams(stdout: str, stderr: str) -> str:
    sizes = f"stdout {_size(len(stdout.encode()))}, stderr {_size(len(stderr.encode()))}"
    return "\n".join([sizes, *_edges("stdout", stdout), *_edges("stderr", stderr)])


def _ending(exit_code: int | None, signal: int | None, timed_out: bool) -> str:
    if timed_out:
        return "timed out and was killed"
    if signal is not None:
        return f"killed by signal {signal}"
    return f"exit code {exit_code}"


@_summarizes(ExecResult)
def _exec(result: ExecResult) -> str:
    if result.process_id is not None:
        return (
            f"started in the background as {result.process_id}; "
            "read its output with read_process_output, stop it with kill_process"
        )
    head = f"{_ending(result.exit_code, result.signal, result.timed_out)} after {result.duration_ms:.0f} ms"
    if result.oom_killed:
        head += "; the sandbox's memory cap was hit"
    if result.truncated:
        head += f"; output truncated (the {result.kept} kept)"
    return head + "\n" + _streams(result.stdout, result.stderr)


def _state(process: ProcessInfo) -> str:
    if process.running:
        return f"{process.process_id} is running"
    return f"{process.process_id} has ended: {_ending(process.exit_code, process.signal, process.timed_out)}"


@_summarizes(ProcessInfo)
def _process(result: ProcessInfo) -> str:
    state = _state(result)
    if result.signalled is not None:
        if result.running:
            return f"sent SIG{result.signalled} to {result.process_id}; it is still running"
        return f"sent SIG{result.signalled} to {result.process_id}; it has ended: " + _ending(
            result.exit_code, result.signal, result.timed_out
        )
    return state


@_summarizes(ProcessOutputResult)
def _output(result: ProcessOutputResult) -> str:
    head = _state(result.process)
    if result.more:
        head += "; more output is waiting: read again with since=next_cursor"
    if result.skipped_bytes:
        head += f"; {_size(result.skipped_bytes)} skipped to keep the tail"
    return head + "\n" + _streams(result.stdout, result.stderr)


@_summarizes(ProcessList)
def _processes(result: ProcessList) -> str:
    if not result.processes:
        return "no background processes"
    return "\n".join(_state(p) for p in result.processes)


@_summarizes(StdinWritten)
def _stdin(result: StdinWritten) -> str:
    closed = "; stdin closed" if result.closed else ""
    return f"wrote {result.written} bytes to {result.process_id}{closed}"


@_summarizes(SandboxInfo)
def _sandbox(result: SandboxInfo) -> str:
    limits = result.limits
    disk = f", {limits.disk_mb} MiB disk" if limits.disk_mb is not None else ""
    return (
        f"{result.sandbox_id} (image {result.image}, policy {result.policy}): {limits.memory_mb} MiB memory, "
        f"{limits.cpus:g} CPUs, {limits.max_processes} processes{disk}; expires {result.expires_at}"
    )


@_summarizes(SandboxList)
def _sandboxes(result: SandboxList) -> str:
    if not result.sandboxes:
        return "no live sandboxes"
    return f"{len(result.sandboxes)} sandboxes\n" + "\n".join(_sandbox(s) for s in result.sandboxes)


@_summarizes(DestroyResult)
def _destroyed(result: DestroyResult) -> str:
    return f"{result.sandbox_id} destroyed"


@_summarizes(CopyResult)
def _copied(result: CopyResult) -> str:
    what = _size(result.bytes)
    if result.files is not None:
        what = f"{result.files} files, {what}"
    text = f"copied {what} {result.direction.replace('_', ' ')}: {result.source} -> {result.destination}"
    if result.skipped:
        text += f"; {result.skipped} entries skipped (not regular files or directories)"
    return text


@_summarizes(FileContent)
def _read(result: FileContent) -> str:
    unit = "lines" if result.encoding == "text" else "bytes"
    text = f"{result.path}: {result.encoding}, {_size(result.size_bytes)}"
    text += f", from {unit[:-1]} offset {result.offset}"
    if result.truncated:
        text += f"; more follows: read on with offset={result.next_offset}"
    return text


@_summarizes(FileWriteResult)
def _written(result: FileWriteResult) -> str:
    verb = "created" if result.created else "replaced"
    return f"{verb} {result.path}: {_size(result.bytes)}, mode {result.mode}"


@_summarizes(FileEditResult)
def _edited(result: FileEditResult) -> str:
    return f"replaced {result.replaced} occurrence(s) in {result.path}; it is now {_size(result.bytes)}"


@_summarizes(FileList)
def _listed(result: FileList) -> str:
    more = "; truncated: narrow with pattern or depth" if result.truncated else ""
    names = ", ".join(e.path for e in result.entries[:_LISTED])
    extra = f", ... ({len(result.entries) - _LISTED} more)" if len(result.entries) > _LISTED else ""
    return f"{result.path}: {len(result.entries)} entries{more}\n{names}{extra}".rstrip()


@_summarizes(ExposedPort)
def _exposed(result: ExposedPort) -> str:
    return f"sandbox port {result.sandbox_port} is reachable from the host at {result.address}"


@_summarizes(UnexposedPort)
def _unexposed(result: UnexposedPort) -> str:
    return f"sandbox port {result.sandbox_port} of {result.sandbox_id} is no longer exposed"


@_summarizes(PolicyDocument)
def _policy(result: PolicyDocument) -> str:
    network = result.policy.get("network", {}).get("mode", "?")
    return f"policy {result.name} (network: {network}); policies offered: {', '.join(result.available)}"


@_summarizes(ImageList)
def _images(result: ImageList) -> str:
    lines = [
        f"{i.name}: {i.description or 'no description'} (policies: {', '.join(i.policies)})"
        for i in result.images
    ]
    if result.not_installed:
        lines.append("allowed but not installed: " + ", ".join(result.not_installed))
    return "\n".join(lines) or "no images"


@_summarizes(SnapshotInfo)
def _snapshot(result: SnapshotInfo) -> str:
    kept = f", kept as image {result.kept_as_image}" if result.kept_as_image else ""
    return f"snapshot {result.name} of {result.sandbox_id} taken at {result.created_at}{kept}"


@_summarizes(SnapshotList)
def _snapshots(result: SnapshotList) -> str:
    if not result.snapshots:
        return "no snapshots"
    return f"{len(result.snapshots)} snapshots\n" + "\n".join(_snapshot(s) for s in result.snapshots)


@_summarizes(SnapshotDeleted)
def _snapshot_deleted(result: SnapshotDeleted) -> str:
    return f"snapshot {result.name} of {result.sandbox_id} deleted"


@_summarizes(ForkResult)
def _forks(result: ForkResult) -> str:
    return f"{len(result.sandboxes)} forks\n" + "\n".join(_sandbox(s) for s in result.sandboxes)


@_summarizes(RestoreResult)
def _restored(result: RestoreResult) -> str:
    gone = f"; background processes gone: {', '.join(result.gone_processes)}" if result.gone_processes else ""
    return f"{result.sandbox_id} restored to snapshot {result.snapshot}{gone}"
