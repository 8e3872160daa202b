"""What the daemon keeps about each sandbox: its record in memory and ``<id>.json`` on disk.

The records directory holds one file per sandbox, written atomically before the
sandbox is started, again once it is completely made and when its destruction starts,
and removed after everything else of it is gone. It lets a restarted daemon adopt the
sandboxes it made (their plan, owner and times); a sandbox running without one, or
whose record says it was still being made or already being destroyed, is half-made or
half-destroyed and is removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from .models import ExposedPort, Limits, Mount, SandboxInfo
from .policy import SandboxPlan

__all__ = ["Exposure", "LiveSandbox", "MetaStore", "SandboxRecord", "Stage", "State"]

_MiB = 1 << 20

State = Literal["creating", "running", "destroying", "gone"]
Stage = Literal["creating", "running", "destroying"]
"""Where a sandbox's life stood when its record was last written ("gone" is known in memory only)."""


@dataclass(frozen=True)
class Exposure:
    """A port of the sandbox forwarded from a host address (expose_port)."""

    sandbox_port: int
    host: str
    host_port: int

    def info(self) -> ExposedPort:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return ExposedPort(
            sandbox_port=self.sandbox_port,
            host=self.host,
            host_port=self.host_port,
            address=f"{shown}:{self.host_port}",
        )


@dataclass(frozen=True)
class LiveSandbox:
    """One live sandbox as the operator sees it."""

    sandbox_id: str
    owner: str
    """The client identity that made it: ``uid:N`` or ``token:NAME``."""
    policy: str
    image: str
    created_at: datetime
    expires_at: datetime
    memory_bytes: int | None
    """Memory its slice uses now; None where systemd does not say."""
    cpu_nsec: int | None
    """CPU time its slice has used; None where systemd does not say."""
    tasks: int | None
    """Processes and threads in it now (the supervisor's included)."""
    connected: bool
    """Whether its owner's connection is there (False: kept past a disconnect, or an HTTP client)."""
    pooled: bool = False
    """A warm-pool sandbox waiting for a create (or being started for one): nobody's yet; its
    ``owner`` is empty, and its ``expires_at`` is when the pool replaces it."""


@dataclass
class SandboxRecord:
    sandbox_id: str
    plan: SandboxPlan
    created_at: datetime
    expires_at: datetime
    state: State = "creating"
    oom_kills_seen: int = 0
    owner: str = "local"
    """The identity of the client that made it (see :mod:`nspawn_mcp.identity`)."""
    session: str | None = None
    """The stdio connection it belongs to; None once kept past its client's disconnect (or for HTTP)."""
    last_used: datetime | None = None
    """When a tool call last used it (for the policy's idle timeout); None: at creation."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables of every command in it (create_sandbox's ``env``)."""
    ports: dict[int, Exposure] = field(default_factory=dict)
    """Its exposed ports, by sandbox port."""

    def info(self) -> SandboxInfo:
        limits = self.plan.limits
        return SandboxInfo(
            sandbox_id=self.sandbox_id,
            image=self.plan.image,
            policy=self.plan.policy,
            limits=Limits(
                memory_mb=limits.memory_bytes // _MiB,
                cpus=limits.cpus,
                max_processes=limits.processes,
                ttl_seconds=limits.ttl_seconds,
                disk_mb=None if limits.disk_bytes is None else limits.disk_bytes // _MiB,
            ),
            mounts=[Mount(host=m.source, sandbox=m.target, writable=m.writable) for m in self.plan.mounts],
            ports=[self.ports[port].info() for port in sorted(self.ports)],
            env=sorted(self.env),
            created_at=self.created_at.isoformat(timespec="milliseconds"),
            expires_at=self.expires_at.isoformat(timespec="milliseconds"),
        )


class _Meta(BaseModel):
    """What a record file holds: written and read through the model, so no field is dropped."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    owner: str
    session: str | None = None
    plan: SandboxPlan
    created_at: datetime
    expires_at: datetime
    stage: Stage = "running"
    """"creating" until the sandbox is completely made (its binds, its network may be missing), and
    "destroying" from when its destruction starts (they may be gone already): a daemon that died in
    either left it half-made. Records written before this field existed count as "running"."""
    env: dict[str, str] = {}
    ports: tuple[Exposure, ...] = ()


_META = TypeAdapter(_Meta)


class MetaStore:
    """One JSON file per sandbox in a directory of its own, so a restarted daemon can adopt what it made."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def _path(self, sandbox_id: str) -> Path:
        return self._directory / f"{sandbox_id}.json"

    def save(self, sandbox: SandboxRecord) -> None:
        """Atomically: a reader (or a restarted daemon) sees the old record or the new one, whole."""
        self._directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        meta = _Meta(
            owner=sandbox.owner,
            session=sandbox.session,
            plan=sandbox.plan,
            created_at=sandbox.created_at,
            expires_at=sandbox.expires_at,
            stage="running" if sandbox.state == "gone" else sandbox.state,
            env=sandbox.env,
            ports=tuple(sandbox.ports[port] for port in sorted(sandbox.ports)),
        )
        # Not fsynced (it cost each create about 5 ms): a daemon that dies loses nothing it wrote,
        # and a host that loses power loses the sandboxes too, whose remains reconcile removes
        # (a record left empty or torn reads as none, which is such a remain).
        temporary = self._directory / f".{sandbox.sandbox_id}.json.tmp"
        temporary.write_bytes(_META.dump_json(meta))
        temporary.replace(self._path(sandbox.sandbox_id))

    def load(self, sandbox_id: str) -> SandboxRecord | None:
        try:
            meta = _META.validate_json(self._path(sandbox_id).read_bytes())
        except (OSError, ValidationError):
            return None
        return SandboxRecord(
            sandbox_id=sandbox_id,
            plan=meta.plan,
            created_at=meta.created_at,
            expires_at=meta.expires_at,
            state=meta.stage,
            owner=meta.owner,
            session=meta.session,
            env=dict(meta.env),
            ports={exposure.sandbox_port: exposure for exposure in meta.ports},
        )

    def remove(self, sandbox_id: str) -> None:
        self._path(sandbox_id).unlink(missing_ok=True)

    def discard_unfinished(self) -> None:
        """Remove the temporary files of saves a dead daemon did not finish (the daemon's lock says no
        other one is saving)."""
        if self._directory.is_dir():
            for temporary in self._directory.glob(".sbx-*.json.tmp"):
                temporary.unlink(missing_ok=True)

    def ids(self) -> set[str]:
        """The sandboxes that have a record (including ones whose making was interrupted)."""
        if not self._directory.is_dir():
            return set()
        return {path.name.removesuffix(".json") for path in self._directory.glob("sbx-*.json")}
