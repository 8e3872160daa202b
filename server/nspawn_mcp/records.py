"""What the server keeps about each sandbox: its record in memory and ``meta.json`` on disk.

The file lets a restarted server adopt the sandboxes it made (their plan, owner and
times); a sandbox running without one was half-made and is removed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from .models import Limits, Mount, SandboxInfo
from .policy import BindMount, EgressPlan, ResolvedLimits, SandboxPlan

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


class MetaStore:
    """``meta.json`` per sandbox, so a restarted server can adopt what it made."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def save(self, sandbox: SandboxRecord) -> None:
        folder = self._directory / sandbox.sandbox_id
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {
            "owner": sandbox.owner,
            "plan": asdict(sandbox.plan),
            "created_at": sandbox.created_at.isoformat(),
            "expires_at": sandbox.expires_at.isoformat(),
        }
        temporary = folder / "meta.json.tmp"
        temporary.write_text(json.dumps(data))
        temporary.replace(folder / "meta.json")

    def load(self, sandbox_id: str) -> SandboxRecord | None:
        try:
            data = json.loads((self._directory / sandbox_id / "meta.json").read_text())
            plan = data["plan"]
            return SandboxRecord(
                sandbox_id=sandbox_id,
                plan=SandboxPlan(
                    policy=plan["policy"],
                    image=plan["image"],
                    limits=ResolvedLimits(**plan["limits"]),
                    network=plan["network"],
                    allowed_host_roots=tuple(plan["allowed_host_roots"]),
                    mounts=tuple(BindMount(**mount) for mount in plan.get("mounts", ())),
                    egress=_load_egress(plan.get("egress")),
                ),
                created_at=datetime.fromisoformat(data["created_at"]),
                expires_at=datetime.fromisoformat(data["expires_at"]),
                state="running",
                owner=str(data.get("owner", "local")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _load_egress(data: dict[str, Any] | None) -> EgressPlan | None:
    if data is None:
        return None
    return EgressPlan(
        rules=tuple((str(cidr), tuple(ports)) for cidr, ports in data["rules"]),
        domains=tuple(data["domains"]),
        domain_ports=tuple(data["domain_ports"]),
        upstream_dns=data["upstream_dns"],
        private_dns_answers=bool(data["private_dns_answers"]),
        subnet=data["subnet"],
    )
