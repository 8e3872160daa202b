"""The real backend: sandboxes as systemd-nspawn services, driven over D-Bus.

Steps of a create, each undone by :meth:`NspawnBackend.destroy`:

1. machined ``CloneImage`` of the template: a btrfs snapshot (copy-on-write), and
   ``SetImageLimit`` where the policy caps disk use.
2. systemd ``StartTransientUnit`` of the nspawn service, with the sandbox's slice
   (which carries MemoryMax / TasksMax / CPUQuota) as an auxiliary unit. The
   service is Type=notify, so the job completes once the container runs; then the
   exec supervisor's socket appearing means it accepts commands.
3. For egress policies: the veth's addresses, the nftables rules, the resolver and
   the server-name check (:mod:`.network`), and the sandbox's resolv.conf.
"""

from __future__ import annotations

import contextlib
import logging
import os
import py_compile
import shutil
from collections.abc import Callable
from dataclasses import replace
from importlib import resources
from pathlib import Path

import anyio
import anyio.to_thread

from .. import hostfs
from ..errors import BackendError, NotFound
from ..layout import Layout
from ..naming import SANDBOX_ID, service_unit, slice_unit, template_image
from ..policy import BindMount, EgressPlan, SandboxPlan
from .bus import Bus
from .cgroups import oom_kill_count
from .egress import endpoints
from .jail import JailClient
from .machine1 import Machined
from .network import EgressNetwork
from .systemd1 import Systemd
from .units import SUPERVISOR_SOCKET, SandboxPaths, build_units

__all__ = ["NspawnBackend", "install_supervisor"]

log = logging.getLogger(__name__)

_IMAGE_PREFIX = "nspawn-mcp-"
_READY_TIMEOUT = 15.0
_READY_POLL = 0.002


def install_supervisor(layout: Layout) -> None:
    """Put the current supervisor.py where sandboxes bind it from (atomically), compiled.

    The bytecode saves each sandbox compiling the supervisor at start (about 7 ms);
    an image whose python3 is not the server's minor version just compiles it.
    """
    source = resources.files("nspawn_mcp") / "sandbox" / "supervisor.py"
    layout.lib_dir.mkdir(parents=True, exist_ok=True)
    target = layout.lib_dir / "supervisor.py"
    temporary = layout.lib_dir / ".supervisor.py.tmp"
    temporary.write_bytes(source.read_bytes())
    temporary.chmod(0o644)
    temporary.replace(target)
    py_compile.compile(str(target), doraise=True)
    for compiled in (layout.lib_dir / "__pycache__").glob("*.pyc"):
        compiled.chmod(0o644)


class NspawnBackend:
    def __init__(
        self,
        bus: Bus,
        systemd: Systemd,
        machined: Machined,
        layout: Layout,
        host_view: Path | None = None,
        network: EgressNetwork | None = None,
        daemons_root: Path = Path("/"),
    ) -> None:
        self._bus = bus
        self._systemd = systemd
        self._machined = machined
        self._layout = layout
        self._host_view = host_view
        # the host's tree as the daemons' mount namespace has it, reachable from here
        self._daemons_view = daemons_root / str(host_view).lstrip("/") if host_view else Path("/")
        self._network = network

    @classmethod
    async def connect(
        cls,
        address: str,
        layout: Layout,
        *,
        on_machine_removed: Callable[[str], None] | None = None,
        host_view: Path | None = None,
        network: EgressNetwork | None = None,
        daemons_root: Path = Path("/"),
    ) -> NspawnBackend:
        """Connect to the bus at ``address``; ``on_machine_removed`` hears of every machine that goes.

        ``host_view``: where the daemons see the host's tree, when they run in the
        private systemd's mount namespace (whose /tmp is not the host's).
        """
        bus = await Bus.connect(address)
        systemd = await Systemd.attach(bus)
        machined = await Machined.attach(bus, on_machine_removed)
        for directory in (layout.sandboxes_dir, layout.staging_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        install_supervisor(layout)
        return cls(bus, systemd, machined, layout, host_view, network, daemons_root)

    def close(self) -> None:
        self._bus.disconnect()

    @property
    def systemd(self) -> Systemd:
        return self._systemd

    @property
    def machined(self) -> Machined:
        return self._machined

    @property
    def staging_dir(self) -> Path:
        return self._layout.staging_dir

    async def available_images(self) -> set[str]:
        return {
            image.name.removeprefix(_IMAGE_PREFIX)
            for image in await self._machined.list_images()
            if image.name.startswith(_IMAGE_PREFIX)
        }

    def _paths(self, sandbox_id: str) -> SandboxPaths:
        return SandboxPaths(
            root=str(self._layout.machines_dir / sandbox_id),
            control_dir=str(self._layout.control_dir(sandbox_id)),
            lib_dir=str(self._layout.lib_dir),
        )

    async def create(self, sandbox_id: str, plan: SandboxPlan) -> None:
        control = self._layout.control_dir(sandbox_id)
        control.mkdir(parents=True, exist_ok=False)
        # The sandbox's root (an unprivileged uid on the host) creates its socket
        # here; the 0700 parent keeps other host users out.
        control.chmod(0o1777)
        try:
            await self._machined.clone_image(template_image(plan.image), sandbox_id)
        except NotFound:
            raise BackendError(
                f"image {plan.image!r} is not installed on this host; run `nspawn-mcp setup`"
            ) from None
        if plan.limits.disk_bytes is not None:
            try:
                await self._machined.set_image_limit(sandbox_id, plan.limits.disk_bytes)
            except BackendError:
                raise BackendError(
                    "this policy caps disk use, but disk quotas are off on this host's image pool: "
                    "the operator can run `nspawn-mcp setup`, which enables them"
                ) from None

        mounts = tuple([await anyio.to_thread.run_sync(self._recheck, mount) for mount in plan.mounts])
        units = build_units(sandbox_id, replace(plan, mounts=mounts), self._paths(sandbox_id))
        await self._systemd.start_transient_unit(
            units.service_name, units.service_properties, aux={units.slice_name: units.slice_properties}
        )
        await self._wait_until_ready(sandbox_id)

        if plan.egress is not None:
            await self._attach_network(sandbox_id, plan.egress)

    async def _attach_network(self, sandbox_id: str, plan: EgressPlan) -> None:
        if self._network is None:
            raise BackendError("egress networking is not available in this server")
        leader = await self._machined.machine_leader(sandbox_id)
        await self._network.attach(sandbox_id, plan, leader)
        assert plan.subnet is not None
        host_end, _ = endpoints(plan.subnet)
        resolv = self._layout.sandbox_dir(sandbox_id) / "resolv.conf"
        resolv.write_text(f"nameserver {host_end}\noptions edns0\n")
        await self._machined.copy_to_machine(sandbox_id, str(resolv), "/etc/resolv.conf")

    async def adopt(self, sandbox_id: str, plan: SandboxPlan) -> None:
        if plan.egress is not None and self._network is not None:
            await self._network.serve(sandbox_id, plan.egress)

    def _recheck(self, mount: BindMount) -> BindMount:
        """Check the bind's source once more, as the daemons see it, just before nspawn binds it.

        It must still lead, beneath its allowed root, to the very object the policy
        checked. nspawn takes a path (a descriptor of another mount namespace cannot
        be bound there), so a swap after this check and before the bind is not caught.
        """
        hostfs.check_same_beneath(
            str(self._daemons_view / mount.root.lstrip("/")),
            os.path.relpath(mount.source, mount.root),
            os.stat(mount.source),
        )
        if self._host_view is None:
            return mount
        return replace(mount, source=str(self._host_view) + mount.source)

    async def _wait_until_ready(self, sandbox_id: str) -> None:
        """The container is up once its unit started; the supervisor needs a moment more.

        nspawn takes READY=1 only from the container's PID 1 (its stub init under
        ``--as-pid2``), so readiness is the supervisor's socket appearing.
        """
        socket_path = self._layout.control_dir(sandbox_id) / SUPERVISOR_SOCKET
        with anyio.move_on_after(_READY_TIMEOUT):
            while not socket_path.exists():  # noqa: ASYNC110 - a file appearing sets no event
                await anyio.sleep(_READY_POLL)
            return
        raise BackendError(f"sandbox {sandbox_id} did not become ready in {_READY_TIMEOUT:g} s")

    async def destroy(self, sandbox_id: str) -> None:
        if self._network is not None:
            await self._network.detach(sandbox_id)
        await self._systemd.stop_unit(service_unit(sandbox_id))
        await self._systemd.reset_failed(service_unit(sandbox_id))
        await self._systemd.stop_unit(slice_unit(sandbox_id))
        await self._systemd.reset_failed(slice_unit(sandbox_id))
        with contextlib.suppress(NotFound):
            await self._machined.remove_image(sandbox_id)
        shutil.rmtree(self._layout.sandbox_dir(sandbox_id), ignore_errors=True)

    async def running(self) -> set[str]:
        ours: set[str] = set()
        for machine in await self._machined.list_machines():
            if not SANDBOX_ID.match(machine.name):
                continue
            try:
                unit = await self._machined.machine_unit(machine.name)
            except NotFound:
                continue
            if unit == service_unit(machine.name):
                ours.add(machine.name)
        return ours

    async def leftovers(self) -> set[str]:
        found = {image.name for image in await self._machined.list_images() if SANDBOX_ID.match(image.name)}
        units = await self._systemd.list_units(["nspawn-mcp-sbx-*.service", "nspawnmcp-*.slice"])
        for unit in units:
            name = unit.name.removesuffix(".service").removesuffix(".slice")
            name = name.removeprefix("nspawn-mcp-").removeprefix("nspawnmcp-")
            candidate = name if name.startswith("sbx-") else f"sbx-{name}"
            if SANDBOX_ID.match(candidate):
                found.add(candidate)
        if self._layout.sandboxes_dir.is_dir():
            found |= {p.name for p in self._layout.sandboxes_dir.iterdir() if SANDBOX_ID.match(p.name)}
        return found - await self.running()

    async def oom_kills(self, sandbox_id: str) -> int | None:
        return await anyio.to_thread.run_sync(oom_kill_count, sandbox_id)

    def jail(self, sandbox_id: str) -> JailClient:
        return JailClient(self._layout.control_dir(sandbox_id) / SUPERVISOR_SOCKET)

    async def copy_in(self, sandbox_id: str, host_source: Path, container_destination: str) -> None:
        await self._machined.copy_to_machine(sandbox_id, str(host_source), container_destination)

    async def copy_out(self, sandbox_id: str, container_source: str, host_destination: Path) -> None:
        await self._machined.copy_from_machine(sandbox_id, container_source, str(host_destination))
