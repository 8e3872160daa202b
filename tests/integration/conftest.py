"""Integration tests run against the real systemd + dbus + machined.

On a host whose PID 1 is not systemd, the session boots the project's private
systemd (the same code path as ``nspawn-mcp serve``) and stops it afterwards if
it started it. These tests need root and an installed template (``make setup``);
without them they fail, they never skip.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.backend.network import EgressNetwork
from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.box import find_box, host_runs_systemd, stop_box
from nspawn_mcp.layout import Layout
from nspawn_mcp.naming import new_sandbox_id
from nspawn_mcp.policy import BindMount, CreateRequest, Policy, SandboxPlan, resolve_create
from nspawn_mcp.runtime import Daemons, find_daemons
from tests.netns import outside_hosts


@dataclass(frozen=True)
class HostView:
    """What the host sees of the daemons' world (through the box's root when there is one)."""

    root: Path

    @property
    def machines_dir(self) -> Path:
        return self.root / "var/lib/machines"

    def process_status(self, pid: int) -> str:
        """``/proc/PID/status`` of a PID as the daemons number it."""
        return (self.root / "proc" / str(pid) / "status").read_text()

    def mountinfo(self) -> str:
        source = self.root.parent / "mountinfo" if self.root != Path("/") else Path("/proc/self/mountinfo")
        return source.read_text()

    @staticmethod
    def cgroup_file(unit_path: str, v1_controller: str, v1_name: str, v2_name: str) -> Path:
        unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        if unified:
            return Path("/sys/fs/cgroup") / unit_path / v2_name
        return Path("/sys/fs/cgroup") / v1_controller / unit_path / v1_name


@pytest.fixture(scope="session")
def layout() -> Layout:
    return Layout.from_env()


@pytest.fixture(scope="session")
def daemons(layout: Layout) -> Iterator[Daemons]:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (run `make test` as root)")
    started_here = not host_runs_systemd() and find_box(layout) is None
    yield find_daemons(layout)
    if started_here:
        stop_box(layout)


@pytest.fixture(scope="session")
def host(daemons: Daemons, layout: Layout) -> HostView:
    box = find_box(layout)
    return HostView(root=Path(f"/proc/{box.pid}/root") if box else Path("/"))


@pytest.fixture
async def backend(daemons: Daemons, layout: Layout) -> AsyncIterator[NspawnBackend]:
    connected = await NspawnBackend.connect(daemons.bus_address, layout, proc_root=daemons.proc_root)
    try:
        if "default" not in await connected.available_images():
            pytest.fail("the 'default' image is not installed: run `make setup`")
        yield connected
    finally:
        connected.close()


DISK_QUOTA_POLICY = Policy.model_validate({"limits": {"max": {"disk": "4GiB"}}})


def plan(mounts: tuple[BindMount, ...] = (), policy: Policy | None = None, **request: object) -> SandboxPlan:
    """A plan from ``policy`` (by default the default one); ``mounts`` are taken as allowed and resolved."""
    if policy is None:
        policy = DISK_QUOTA_POLICY if "disk_mb" in request else Policy()
    resolved = resolve_create("default", policy, CreateRequest(**request), cwd="/srv")  # type: ignore[arg-type]
    return replace(resolved, mounts=mounts)


Factory = Callable[..., Awaitable[str]]


@asynccontextmanager
async def sandbox_factory(backend: NspawnBackend) -> AsyncIterator[Factory]:
    """Create sandboxes with the real backend; whatever is left is destroyed on exit."""
    made: dict[str, SandboxPlan] = {}

    async def make(
        mounts: tuple[BindMount, ...] = (), policy: Policy | None = None, **request: object
    ) -> str:
        sandbox_id = new_sandbox_id()
        the_plan = plan(mounts, policy, **request)
        if the_plan.egress is not None:
            subnet = backend.reserve_subnet(sandbox_id)
            the_plan = replace(the_plan, egress=replace(the_plan.egress, subnet=subnet))
        made[sandbox_id] = the_plan
        await backend.create(sandbox_id, the_plan)
        return sandbox_id

    try:
        yield make
    finally:
        for sandbox_id in made:
            await backend.destroy(sandbox_id)


@pytest.fixture
async def make_sandbox(backend: NspawnBackend) -> AsyncIterator[Factory]:
    async with sandbox_factory(backend) as make:
        yield make


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with outside_hosts(tmp_path_factory.mktemp("outside") / "seen.log") as log:
        yield log


@pytest.fixture
async def egress_backend(daemons: Daemons, layout: Layout) -> AsyncIterator[NspawnBackend]:
    async with anyio.create_task_group() as tasks:
        backend = await NspawnBackend.connect(
            daemons.bus_address,
            layout,
            network=EgressNetwork(tasks, daemons.proc_root, layout.state_dir),
            proc_root=daemons.proc_root,
        )
        yield backend
        backend.close()
        tasks.cancel_scope.cancel()
