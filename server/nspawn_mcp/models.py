"""What the tools return: the structured results agents read."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CopyResult",
    "DestroyResult",
    "ExecResult",
    "ExposedPort",
    "Limits",
    "Mount",
    "PolicyDocument",
    "ProcessInfo",
    "ProcessList",
    "ProcessOutputResult",
    "SandboxInfo",
    "SandboxList",
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
    exit_code: int | None = Field(description="the command's exit status; null if it was killed by a signal")
    signal: int | None = Field(default=None, description="the signal that killed the command, if any")
    stdout: str = Field(description="standard output, UTF-8 (invalid bytes replaced)")
    stderr: str = Field(description="standard error, UTF-8 (invalid bytes replaced)")
    timed_out: bool = Field(
        description="the command hit its timeout and was killed, with everything it started"
    )
    truncated: bool = Field(description="stdout or stderr was cut at the policy's output cap")
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
    running: bool
    exit_code: int | None
    signal: int | None
    timed_out: bool
    truncated: bool = Field(description="output beyond the policy's cap for background processes was dropped")


class ProcessList(_Result):
    processes: list[ProcessInfo]


class ProcessOutputResult(_Result):
    process: ProcessInfo
    stdout: str
    stderr: str
    next_cursor: str = Field(description="pass as `since` to read only what comes after")
    more: bool = Field(description="more output is already available: read again right away")


class StdinWritten(_Result):
    process_id: str
    written: int = Field(description="bytes accepted now; write the rest again if it is less than sent")
    closed: bool


class CopyResult(_Result):
    direction: Literal["to_sandbox", "from_sandbox"]
    source: str
    destination: str
    bytes: int
    sha256: str


class PolicyDocument(_Result):
    name: str
    policy: dict[str, Any] = Field(
        description="the effective policy: defaults and maxima, exec, files, network"
    )
    available: list[str] = Field(description="every policy this server offers")


class DestroyResult(_Result):
    sandbox_id: str
    destroyed: bool
