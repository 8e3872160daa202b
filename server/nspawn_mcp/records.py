"""What the server keeps about each sandbox: its record in memory and ``meta.json`` on disk.

The file lets a restarted server adopt the sandboxes it made (their plan, owner and
times); a sandbox running without one was half-made and is removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from .models import Limits, Mount, SandboxInfo
from .policy import SandboxPlan

__all__ = ["MetaStore", "SandboxRecord", "State"]

_MiB = 1 << 20

State = Literal["creating", "running", "destroying", "gone"]


@dataclass
class SandboxRecord:
    sandbox_id: str
    plan: SandboxPlan
    created_at: datetime
    expires_at: datetime
    state: State = "creating"
    oom_kills_seen: int = 0
    owner: str = "local"

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
            created_at=self.created_at.isoformat(timespec="milliseconds"),
            expires_at=self.expires_at.isoformat(timespec="milliseconds"),
        )


class _Meta(BaseModel):
    """What ``meta.json`` holds: written and read through the model, so no field is dropped."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    owner: str
    plan: SandboxPlan
    created_at: datetime
    expires_at: datetime


_META = TypeAdapter(_Meta)


class MetaStore:
    """``meta.json`` per sandbox, so a restarted server can adopt what it made."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def save(self, sandbox: SandboxRecord) -> None:
        folder = self._directory / sandbox.sandbox_id
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        meta = _Meta(
            owner=sandbox.owner,
            plan=sandbox.plan,
            created_at=sandbox.created_at,
            expires_at=sandbox.expires_at,
        )
        temporary = folder / "meta.json.tmp"
        temporary.write_bytes(_META.dump_json(meta))
        temporary.replace(folder / "meta.json")

    def load(self, sandbox_id: str) -> SandboxRecord | None:
        try:
            meta = _META.validate_json((self._directory / sandbox_id / "meta.json").read_bytes())
        except (OSError, ValidationError):
            return None
        return SandboxRecord(
            sandbox_id=sandbox_id,
            plan=meta.plan,
            created_at=meta.created_at,
            expires_at=meta.expires_at,
            state="running",
            owner=meta.owner,
        )
