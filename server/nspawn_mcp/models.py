"""What the tools return: the structured results agents read."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CopyResult",
    "DestroyResult",
    "ExecResult",
    "ExposedPort",
    "FileContent",
    "FileEditResult",
    "FileEntryInfo",
    "FileList",
    "FileWriteResult",
    "ForkResult",
    "ImageList",
    "ImageSummary",
    "Limits",
    "Mount",
    "OsRelease",
    "PolicyDocument",
    "ProcessInfo",
    "ProcessList",
    "ProcessOutputResult",
    "RestoreResult",
    "SandboxInfo",
    "SandboxList",
    "SandboxStatus",
    "SandboxUsage",
    "SnapshotDeleted",
    "SnapshotInfo",
    "SnapshotList",
    "StdinWritten",
    "UnexposedPort",
]


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True)


class Limits(_Result):
    memory_mb: int = Field(description="memory cap (MemoryMax), MiB")
    cpus: float = Field(description="CPU cap, in CPUs")
    max_processes: int = Field(description="process/thread cap (TasksMax)")
    ttl_seconds: int = Field(description="the sandbox is destroyed this long after creation")
    disk_mb: int | None = Field(default=None, description="quota on the sandbox's filesystem, image included")


class Mount(_Result):
    host: str = Field(description="the host path, as resolved")
    sandbox: str
    writable: bool


class ExposedPort(_Result):
    sandbox_port: int = Field(description="the TCP port inside the sandbox (on its loopback)")
    host: str = Field(description="the host address the forward listens on")
    host_port: int = Field(description="the host port the forward listens on")
    address: str = Field(description="where to connect: host:port ([host]:port for IPv6)")


class UnexposedPort(_Result):
    sandbox_id: str
    sandbox_port: int
    unexposed: bool


class SandboxInfo(_Result):
    sandbox_id: str
    image: str
    policy: str
    limits: Limits
    mounts: list[Mount] = Field(default_factory=list)
    ports: list[ExposedPort] = Field(
        default_factory=list, description="ports exposed with expose_port, and where on the host"
    )
    env: list[str] = Field(
        default_factory=list, description="names of the environment variables set at create for every command"
    )

    created_at: str = Field(description="ISO 8601, UTC")
    expires_at: str = Field(description="ISO 8601, UTC")


class SandboxList(_Result):
    sandboxes: list[SandboxInfo]


class ExecResult(_Result):
    exit_code: int | None = Field(
        default=None, description="the command's exit status; absent if it was killed by a signal"
    )
    signal: int | None = Field(default=None, description="the signal that killed the command, if any")
    stdout: str = Field(description="standard output, UTF-8 (invalid bytes replaced)")
    stderr: str = Field(description="standard error, UTF-8 (invalid bytes replaced)")
    timed_out: bool = Field(
        description="the command hit its timeout and was killed, with everything it started"
    )
    truncated: bool = Field(
        description="stdout and stderr together were more than the policy's exec.max_output_bytes; "
        "`kept` says which end is shown"
    )
    kept: Literal["head", "tail"] | None = Field(
        default=None, description="when truncated: the start (head) or the end (tail) of the output was kept"
    )
    oom_killed: bool = Field(default=False, description="the sandbox's memory cap was hit while it ran")
    duration_ms: float
    stdout_base64: str | None = Field(
        default=None, description="exact stdout bytes, when base64 was requested"
    )
    stderr_base64: str | None = Field(
        default=None, description="exact stderr bytes, when base64 was requested"
    )
    process_id: str | None = Field(
        default=None,
        description="background=true only: the command is running; use read_process_output with this id",
    )


class ProcessInfo(_Result):
    process_id: str
    command: list[str]
    running: bool = Field(description="still running when this answer was made")
    exit_code: int | None = Field(
        default=None, description="once ended: its exit status, unless a signal ended it"
    )
    signal: int | None = Field(default=None, description="once ended: the signal that ended it")
    timed_out: bool
    truncated: bool = Field(description="output beyond the policy's cap for background processes was dropped")
    signalled: str | None = Field(
        default=None,
        description="kill_process only: the signal sent, e.g. 'TERM'; `running` is the state after waiting "
        "briefly for the process to end",
    )


class ProcessList(_Result):
    processes: list[ProcessInfo]


class ProcessOutputResult(_Result):
    process: ProcessInfo
    stdout: str
    stderr: str
    next_cursor: str = Field(description="pass as `since` to read only what comes after")
    skipped_bytes: int | None = Field(
        default=None,
        description="keep='tail' only: output bytes after `since` that were skipped to show the end",
    )
    more: bool = Field(description="more output is already available: read again right away")


class StdinWritten(_Result):
    process_id: str
    written: int = Field(description="bytes accepted now; write the rest again if it is less than sent")
    closed: bool


class CopyResult(_Result):
    direction: Literal["to_sandbox", "from_sandbox"]
    source: str
    destination: str
    bytes: int = Field(description="bytes of file content copied (a directory's files summed)")
    sha256: str | None = Field(default=None, description="of the file copied; none for a directory")
    files: int | None = Field(default=None, description="a directory: regular files copied")
    directories: int | None = Field(
        default=None, description="a directory: directories made, itself included"
    )
    skipped: int | None = Field(
        default=None,
        description="a directory: entries left out because they are not regular files or directories "
        "(symlinks, devices, FIFOs, sockets): they are never followed or recreated",
    )
    skipped_examples: list[str] = Field(default_factory=list, description="some of the entries left out")


class FileContent(_Result):
    path: str
    encoding: Literal["text", "base64"] = Field(
        description="text: `content` is lines numbered like `cat -n` (number, tab, line), and offsets count "
        "lines; base64: `content` is the bytes, base64-encoded, and offsets count bytes"
    )
    content: str
    offset: int = Field(description="where this piece starts: lines skipped (text) or a byte offset (base64)")
    next_offset: int | None = Field(
        default=None, description="pass as `offset` to read on; absent at the end of the file"
    )
    truncated: bool = Field(description="the file goes on after this piece")
    size_bytes: int = Field(description="the file's size")
    remaining_bytes: int = Field(description="bytes of the file after this piece")
    line_cut: bool = Field(
        default=False,
        description="text: one line was longer than the policy's files.max_read_bytes and only its start "
        "is shown; read the rest with encoding='base64' from byte offset `end_byte`",
    )
    end_byte: int = Field(description="the byte offset just after this piece")
    mode: str = Field(description="permission bits, octal, like '0644'")
    mtime: str = Field(description="last modification, ISO 8601, UTC")


class FileWriteResult(_Result):
    path: str
    bytes: int
    mode: str = Field(description="permission bits of the file now, octal")
    created: bool = Field(description="the file did not exist before")


class FileEditResult(_Result):
    path: str
    replaced: int = Field(description="occurrences replaced")
    bytes: int = Field(description="the file's size now")


class FileEntryInfo(_Result):
    path: str = Field(description="relative to the directory listed")
    type: Literal["file", "directory", "symlink", "fifo", "socket", "char_device", "block_device", "other"]
    size: int
    mode: str = Field(description="permission bits, octal")
    mtime: str = Field(description="ISO 8601, UTC")
    target: str | None = Field(default=None, description="a symlink's target as written (never followed)")


class FileList(_Result):
    path: str
    entries: list[FileEntryInfo]
    truncated: bool = Field(
        description="more entries exist than were returned (the policy's files.max_list_entries, or "
        "`max_entries`); narrow with `pattern` or `depth`, or list a subdirectory"
    )


class PolicyDocument(_Result):
    name: str
    policy: dict[str, Any] = Field(
        description="the effective policy: defaults and maxima, exec, files, network"
    )
    available: list[str] = Field(description="every policy this server offers")


class DestroyResult(_Result):
    sandbox_id: str
    destroyed: bool


class OsRelease(_Result):
    """From the image's os-release, as set-up read it."""

    pretty_name: str | None = Field(default=None, description="e.g. 'Debian GNU/Linux 12 (bookworm)'")
    id: str | None = Field(default=None, description="e.g. 'debian'")
    version: str | None = Field(default=None, description="e.g. '12'")


class ImageSummary(_Result):
    name: str = Field(description="what create_sandbox(image=...) takes")
    description: str = ""
    size_mb: float | None = Field(default=None, description="disk use as the image pool counts it, if known")
    created_at: str | None = Field(default=None, description="ISO 8601, UTC: when this version was made")
    os_release: OsRelease | None = None
    packages: list[str] = Field(default_factory=list, description="packages its recipe added to the base")
    source: Literal["recipe", "import", "snapshot"] | None = Field(
        default=None,
        description="built from a recipe, imported by the operator, or a snapshot kept as an image; "
        "null if not recorded",
    )
    policies: list[str] = Field(description="the policies you may use that allow this image")
    default_policy_allows: bool = Field(
        description="create_sandbox(image=NAME) works without naming a policy"
    )


class ImageList(_Result):
    images: list[ImageSummary]
    not_installed: list[str] = Field(
        default_factory=list,
        description="images a policy you may use allows but this host does not have (yet)",
    )


class SandboxUsage(_Result):
    """What the sandbox uses now, as systemd and machined count it; null where they cannot tell."""

    memory_mb: float | None = Field(
        default=None, description="memory in use (the slice's MemoryCurrent), MiB"
    )
    cpu_seconds: float | None = Field(
        default=None, description="CPU time used so far, all processes together"
    )
    processes: int | None = Field(default=None, description="processes and threads running (TasksCurrent)")
    disk_mb: float | None = Field(
        default=None, description="disk used by its filesystem, image included, MiB"
    )


class SandboxStatus(_Result):
    """A sandbox now: what ``sandbox://{sandbox_id}`` shows its owner."""

    sandbox_id: str
    status: Literal["running", "stopped"] = Field(
        description="stopped: it stopped on its own (crash, OOM) and is about to be removed"
    )
    image: str
    policy: str
    network: str = Field(description="the policy's network mode: none, or egress to named hosts")
    limits: Limits
    usage: SandboxUsage
    created_at: str = Field(description="ISO 8601, UTC")
    expires_at: str = Field(description="ISO 8601, UTC; extend_sandbox pushes it out")
    expires_in_seconds: int = Field(description="seconds left before it is destroyed automatically")
    ports: list[ExposedPort] = Field(default_factory=list, description="ports exposed with expose_port")
    mounts: list[Mount] = Field(default_factory=list)
    env: list[str] = Field(default_factory=list, description="names of the variables set at create")


class SnapshotInfo(_Result):
    sandbox_id: str
    name: str = Field(description="what fork_sandbox(snapshot=...), restore_sandbox and delete_snapshot take")
    created_at: str = Field(description="ISO 8601, UTC")
    kept_as_image: str | None = Field(
        default=None,
        description="the image it is kept as: it outlives the sandbox, and create_sandbox(image=...) "
        "under the same policy starts from it",
    )


class SnapshotList(_Result):
    snapshots: list[SnapshotInfo]


class SnapshotDeleted(_Result):
    sandbox_id: str
    name: str
    deleted: bool


class ForkResult(_Result):
    sandboxes: list[SandboxInfo] = Field(description="the new sandboxes, yours, each with its own limits")


class RestoreResult(_Result):
    sandbox_id: str
    snapshot: str
    gone_processes: list[str] = Field(
        default_factory=list,
        description="background processes (process_id) that were running and are gone: every process "
        "was ended and the sandbox started again on the snapshot",
    )
