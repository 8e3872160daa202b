"""Wiring for a running server: find the bus (booting the private systemd where
PID 1 is not systemd), connect the backend, adopt existing sandboxes, reap."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread

from .audit import AuditLog
from .backend.network import EgressNetwork
from .backend.nspawn import NspawnBackend
from .box import host_runs_systemd, start_box, system_bus_address
from .forwards import PortForwards
from .images import Catalog
from .layout import Layout
from .policy import PolicySet
from .policy.loader import shipped_policy_dir
from .pool import pool_specs
from .service import SandboxService

__all__ = ["Daemons", "ServerConfig", "find_daemons", "open_service"]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    layout: Layout = field(default_factory=Layout.from_env)
    policy_dirs: tuple[Path, ...] = ()
    max_sandboxes: int = 64
    warm_pool: bool = True
    """Keep the sandboxes the policies' ``[pool]`` sections ask for started ahead of demand."""
    audit_log: Path | None = None
    """Where decisions are logged (JSON lines); None: ``audit.jsonl`` in the state directory."""

    def load_policies(self) -> PolicySet:
        return PolicySet.load([*self.policy_dirs, shipped_policy_dir()])


@dataclass(frozen=True)
class Daemons:
    """Where systemd and machined are: their bus, and their /proc."""

    bus_address: str
    proc_root: Path = Path("/proc")
    """Where the PIDs they report (such as a machine's leader) are found."""
    box_pid: int | None = None
    """The private systemd's host PID, where it is the one in use."""

    @property
    def in_box(self) -> bool:
        return self.box_pid is not None

    @property
    def journal_dir(self) -> Path:
        """Where their journal is, seen from the host."""
        root = Path("/") if self.box_pid is None else Path(f"/proc/{self.box_pid}/root")
        return root / "run" / "log" / "journal"


def find_daemons(layout: Layout) -> Daemons:
    """The system bus to use: an explicit address, the host's, or the private box's."""
    explicit = os.environ.get("NSPAWN_MCP_BUS_ADDRESS")
    if explicit:
        return Daemons(explicit)
    if host_runs_systemd():
        return Daemons(system_bus_address())
    box = start_box(layout)
    log.info("using the private systemd (pid %d)", box.pid)
    return Daemons(box.bus_address, Path(f"/proc/{box.pid}/root/proc"), box_pid=box.pid)


@asynccontextmanager
async def open_service(config: ServerConfig, policies: PolicySet) -> AsyncIterator[SandboxService]:

    daemons = await anyio.to_thread.run_sync(find_daemons, config.layout)
    service_box: list[SandboxService] = []

    def machine_removed(name: str) -> None:
        if service_box:
            service_box[0].machine_removed(name)

    audit = AuditLog(config.audit_log or config.layout.state_dir / "audit.jsonl")
    async with anyio.create_task_group() as tasks:
        network = EgressNetwork(tasks, daemons.proc_root, config.layout.state_dir)
        backend = await NspawnBackend.connect(
            daemons.bus_address,
            config.layout,
            on_machine_removed=machine_removed,
            network=network,
            proc_root=daemons.proc_root,
        )

        try:
            # each forward has an error boundary of its own; all end with the task group
            forwards = PortForwards(tasks, lambda sandbox_id, port: backend.jail(sandbox_id).connect(port))
            service = SandboxService(
                backend,
                policies,
                records_dir=config.layout.records_dir,
                max_sandboxes=config.max_sandboxes,
                audit=audit,
                catalog=Catalog(config.layout.images_dir),
                forwards=forwards,
                pool=pool_specs(policies) if config.warm_pool else [],
            )
            service_box.append(service)
            await service.reconcile()
            await network.prune({sandbox.sandbox_id for sandbox in service.list()})

            tasks.start_soon(service.run_reaper)
            tasks.start_soon(service.pool.run)
            tasks.start_soon(service.run_cleanup)
            tasks.start_soon(service.events.run)
            yield service
        finally:
            if service_box:
                with anyio.CancelScope(shield=True):
                    await service_box[0].pool.stop()  # pooled sandboxes belong to no one: removed
            tasks.cancel_scope.cancel()
            backend.close()
            audit.close()
