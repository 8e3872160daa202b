"""The real backend: sandboxes as systemd-nspawn services, driven over D-Bus.

Steps of a create, each undone by :meth:`NspawnBackend.destroy`:

1. machined ``CloneImage`` of the template: a btrfs snapshot (copy-on-write), and
   ``SetImageLimit`` where the policy caps disk use.
2. systemd ``StartTransientUnit`` of the nspawn service, with the sandbox's slice
   (which carries MemoryMax / TasksMax / CPUQuota) as an auxiliary unit. The
   service is Type=notify, so the job completes once the container runs. The
   supervisor's listening socket is made here, in a directory only the host's root
   can reach, and passed to the service as its standard input; a ``ping`` answered
   means the sandbox accepts commands.
3. The plan's host binds, attached to the running sandbox by a helper (:mod:`.binds`).
4. For egress policies: the veth's addresses, the nftables rules, the resolver and
   the server-name check (:mod:`.network`), and the sandbox's resolv.conf.

A snapshot of a running sandbox (``CloneImage`` read-only, of its own image) is taken
with its processes frozen (:mod:`.freezer`). A fork
is a create whose first step clones a snapshot, or the running sandbox's own image,
instead of the template; a restore stops the service, puts a clone of the snapshot in
place of the sandbox's image and starts it again.
"""

from __future__ import annotations

import contextlib
import logging
import py_compile
import shutil
import signal
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import anyio
import anyio.to_thread

from ..errors import BackendError, NoSuchObject, SandboxGone
from ..images.hints import not_installed
from ..layout import Layout
from ..naming import (
    SANDBOX_ID,
    UNIT_PATTERNS,
    fork_image,
    kept_image,
    machine_name,
    sandbox_of_machine,
    sandbox_of_unit,
    service_unit,
    slice_unit,
    snapshot_image,
    snapshot_of_image,
    snapshot_of_kept_image,
    template_image,
    template_of_image,
)
from ..policy import EgressPlan, SandboxPlan
from .api import MeasuredUsage, SnapshotImage, SnapshotRef, TemplateImage
from .binds import attach_binds
from .bus import Bus
from .cgroups import cpu_usage_nsec, oom_kill_count
from .freezer import Freezer, host_freezer
from .jail import JailClient
from .machine1 import Machined
from .network import EgressNetwork
from .systemd1 import Systemd
from .units import SandboxPaths, build_units, slice_caps

__all__ = ["NspawnBackend", "install_supervisor"]

log = logging.getLogger(__name__)

_READY_TIMEOUT = 15.0
_UNKNOWN_SIZE = (1 << 64) - 1
"""What machined and systemd report for a figure they cannot tell (``UINT64_MAX``)."""
_SLICE_INTERFACE = "org.freedesktop.systemd1.Slice"
_SUPERVISOR_FILES = ("supervisor.py", "protocol.py", "fileops.py")


def install_supervisor(layout: Layout) -> None:
    """Put the current supervisor and its protocol where sandboxes bind them from (atomically), compiled.

    The bytecode saves each sandbox compiling them at start (about 7 ms); an image
    whose python3 is not the server's minor version just compiles them.
    """
    package = resources.files("nspawn_mcp") / "sandbox"
    layout.lib_dir.mkdir(parents=True, exist_ok=True)
    for name in _SUPERVISOR_FILES:
        target = layout.lib_dir / name
        temporary = layout.lib_dir / f".{name}.tmp"
        temporary.write_bytes((package / name).read_bytes())
        temporary.chmod(0o644)
        temporary.replace(target)
        py_compile.compile(str(target), doraise=True)
    for compiled in (layout.lib_dir / "__pycache__").glob("*.pyc"):
        compiled.chmod(0o644)


def _snapshot_image(snapshot: SnapshotRef) -> str:
    """The machined image a snapshot is stored as."""
    if snapshot.kind == "kept":
        return template_image(kept_image(snapshot.sandbox_id, snapshot.name))
    if snapshot.kind == "fork":
        return fork_image(snapshot.sandbox_id, snapshot.name)
    return snapshot_image(snapshot.sandbox_id, snapshot.name)


def _snapshot_of(image: str) -> SnapshotRef | None:
    """The snapshot a machined image stores; None for any other image."""
    parsed = snapshot_of_image(image)
    if parsed is not None:
        sandbox_id, name, fork = parsed
        return SnapshotRef(sandbox_id, name, "fork" if fork else "snapshot")
    template = template_of_image(image)
    kept = snapshot_of_kept_image(template) if template is not None else None
    return SnapshotRef(kept[0], kept[1], "kept") if kept is not None else None


def _listening_socket(path: Path) -> socket.socket:
    """The supervisor's socket, made by the server where only the host's root can reach it."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(str(path))
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    return listener


class NspawnBackend:
    def __init__(
        self,
        bus: Bus,
        systemd: Systemd,
        machined: Machined,
        layout: Layout,
        network: EgressNetwork | None = None,
        proc_root: Path = Path("/proc"),
        freezer: Freezer | None = None,
    ) -> None:
        self._freezer = freezer or Freezer(host_freezer(systemd))
        self._bus = bus
        self._systemd = systemd
        self._machined = machined
        self._layout = layout
        self._network = network
        self._proc_root = proc_root

    @classmethod
    async def connect(
        cls,
        address: str,
        layout: Layout,
        *,
        on_machine_removed: Callable[[str], None] | None = None,
        network: EgressNetwork | None = None,
        proc_root: Path = Path("/proc"),
    ) -> NspawnBackend:
        """Connect to the bus at ``address``; ``on_machine_removed`` hears of every machine that goes.

        ``proc_root``: where the PIDs the daemons report (a machine's leader) are found.
        """
        bus = await Bus.connect(address)
        systemd = await Systemd.attach(bus)
        machined = await Machined.attach(bus, on_machine_removed)
        for directory in (layout.sandboxes_dir, layout.staging_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # what a killed server was copying in is of no use to anyone now
        for leftover in layout.staging_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        install_supervisor(layout)
        return cls(bus, systemd, machined, layout, network, proc_root)

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
        return {image.name for image in await self.images()}

    async def images(self) -> list[TemplateImage]:
        found = []
        for image in await self._machined.list_images():
            name = template_of_image(image.name)
            if name is None:
                continue
            usage = image.usage_bytes if image.usage_bytes < _UNKNOWN_SIZE else None
            created = (
                datetime.fromtimestamp(image.created_usec / 1e6, UTC) if image.created_usec > 0 else None
            )
            found.append(TemplateImage(name=name, usage_bytes=usage, created=created))
        return sorted(found, key=lambda image: image.name)

    def _paths(self, sandbox_id: str) -> SandboxPaths:
        root = self._layout.machines_dir / machine_name(sandbox_id)
        return SandboxPaths(root=str(root), lib_dir=str(self._layout.lib_dir))

    async def create(
        self, sandbox_id: str, plan: SandboxPlan, source: SnapshotRef | str | None = None
    ) -> None:
        self._layout.sandbox_dir(sandbox_id).mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            if isinstance(source, str):  # a running sandbox's current filesystem
                async with self._freezer.frozen(source):
                    await self._machined.clone_image(machine_name(source), machine_name(sandbox_id))
            else:
                origin = template_image(plan.image) if source is None else _snapshot_image(source)
                await self._machined.clone_image(origin, machine_name(sandbox_id))
        except NoSuchObject:
            if source is None:
                raise BackendError(not_installed(plan.image)) from None
            raise BackendError(f"the sandbox {sandbox_id} was to start from is gone") from None
        await self._start(sandbox_id, plan)

    async def _start(self, sandbox_id: str, plan: SandboxPlan) -> None:
        """Start the sandbox on its (freshly cloned) image; return once it accepts commands."""
        if plan.limits.disk_bytes is not None:
            await self._limit_disk(sandbox_id, plan.limits.disk_bytes)

        units = build_units(sandbox_id, plan, self._paths(sandbox_id))
        with _listening_socket(self._layout.control_socket(sandbox_id)) as listener:
            job = await self._systemd.submit_transient_unit(
                units.service_name,
                {**units.service_properties, "StandardInputFileDescriptor": 0},
                aux={units.slice_name: units.slice_properties},
                fds=[listener.fileno()],
            )
        # From here systemd holds the only listening socket: a unit that fails closes it, which ends
        # the ping. An answer proves what the job's end would (the unit runs, the container is up,
        # the supervisor accepts commands), and comes first: the job is not waited for.
        try:
            await self.jail(sandbox_id).ping(_READY_TIMEOUT)
        except SandboxGone:
            raise BackendError(f"sandbox {sandbox_id} did not become ready") from None
        finally:
            self._systemd.forget_job(job)
        if not plan.mounts and plan.egress is None:
            return
        leader = await self._machined.machine_leader(machine_name(sandbox_id))
        if plan.mounts:
            await attach_binds(self._proc_root / str(leader), plan.mounts)
        if plan.egress is not None:
            await self._attach_network(sandbox_id, plan.egress, leader)

    async def _limit_disk(self, sandbox_id: str, disk_bytes: int) -> None:
        try:
            await self._machined.set_image_limit(machine_name(sandbox_id), disk_bytes)
        except NoSuchObject:
            raise  # the snapshot went: not a matter of quotas
        except BackendError:
            raise BackendError(
                "this policy caps disk use, but disk quotas are off on this host's image pool: "
                "the operator can run `nspawn-mcp setup`, which enables them"
            ) from None

    async def adapt(self, sandbox_id: str, started: SandboxPlan, plan: SandboxPlan) -> None:
        if slice_caps(plan.limits) != slice_caps(started.limits):
            await self._systemd.set_unit_properties(slice_unit(sandbox_id), slice_caps(plan.limits))
        # one policy's plans: a disk cap is never lifted (no maximum means no default either)
        if plan.limits.disk_bytes is not None and plan.limits.disk_bytes != started.limits.disk_bytes:
            await self._limit_disk(sandbox_id, plan.limits.disk_bytes)
        if plan.egress is not None:
            leader = await self._machined.machine_leader(machine_name(sandbox_id))
            await self._attach_network(sandbox_id, plan.egress, leader)

    def reserve_subnet(self, sandbox_id: str) -> str:
        return self._egress().reserve(sandbox_id)

    def _egress(self) -> EgressNetwork:
        if self._network is None:
            raise BackendError("egress networking is not available in this server")
        return self._network

    async def _attach_network(self, sandbox_id: str, plan: EgressPlan, leader: int) -> None:
        resolver = await self._egress().attach(sandbox_id, plan, leader)
        resolv = self._layout.sandbox_dir(sandbox_id) / "resolv.conf"
        resolv.write_text(f"nameserver {resolver}\noptions edns0\n")
        await self._machined.copy_to_machine(machine_name(sandbox_id), str(resolv), "/etc/resolv.conf")

    async def adopt(self, sandbox_id: str, plan: SandboxPlan) -> None:
        if self._freezer.mechanism is not None:  # a daemon killed during a snapshot left it frozen
            with contextlib.suppress(BackendError):  # (or it was made before snapshots existed)
                await self._freezer.mechanism.thaw(sandbox_id)
        if plan.egress is not None and self._network is not None:
            await self._network.serve(sandbox_id, plan.egress)

    async def kill(self, sandbox_id: str) -> None:
        # Everything of a sandbox runs in its service's cgroup (nspawn --keep-unit): nspawn, its stub
        # init, the supervisor and every command, in the sub-cgroups the supervisor makes too.
        await self._systemd.kill_unit(service_unit(sandbox_id), signal.SIGKILL)

    async def destroy(self, sandbox_id: str) -> None:
        await self._stop(sandbox_id)
        if self._network is not None:  # its veth went with the service
            self._network.release(sandbox_id)
        with contextlib.suppress(NoSuchObject):
            await self._machined.remove_image(machine_name(sandbox_id))
        shutil.rmtree(self._layout.sandbox_dir(sandbox_id), ignore_errors=True)

    async def _stop(self, sandbox_id: str) -> None:
        """Stop everything that runs of the sandbox (its network's subnet stays held)."""
        if self._network is not None:
            await self._network.detach(sandbox_id)
        await self._systemd.stop_unit(service_unit(sandbox_id))
        await self._systemd.reset_failed(service_unit(sandbox_id))
        await self._systemd.stop_unit(slice_unit(sandbox_id))
        await self._systemd.reset_failed(slice_unit(sandbox_id))
        if self._freezer.mechanism is not None:
            await self._freezer.mechanism.remove(sandbox_id)
        self._freezer.forget(sandbox_id)

    async def snapshot(self, snapshot: SnapshotRef) -> None:
        async with self._freezer.frozen(snapshot.sandbox_id):
            await self._machined.clone_image(
                machine_name(snapshot.sandbox_id), _snapshot_image(snapshot), read_only=True
            )

    async def restore(self, sandbox_id: str, plan: SandboxPlan, snapshot: SnapshotRef) -> None:
        await self._stop(sandbox_id)
        with contextlib.suppress(NoSuchObject):
            await self._machined.remove_image(machine_name(sandbox_id))
        try:
            await self._machined.clone_image(_snapshot_image(snapshot), machine_name(sandbox_id))
        except NoSuchObject:
            raise BackendError(f"snapshot {snapshot.name!r} of {sandbox_id} is gone") from None
        await self._start(sandbox_id, plan)
        # machined signalled the old machine's removal before this reply: the handler has seen it
        # (while the service still counted the sandbox as restarting), not after the restore
        await self._machined.machine_leader(machine_name(sandbox_id))

    async def remove_snapshot(self, snapshot: SnapshotRef) -> None:
        with contextlib.suppress(NoSuchObject):
            await self._machined.remove_image(_snapshot_image(snapshot))

    async def snapshots(self) -> list[SnapshotImage]:
        found = []
        for image in await self._machined.list_images():
            ref = _snapshot_of(image.name)
            if ref is None:
                continue
            usage = image.usage_bytes if image.usage_bytes < _UNKNOWN_SIZE else None
            created = (
                datetime.fromtimestamp(image.created_usec / 1e6, UTC) if image.created_usec > 0 else None
            )
            found.append(SnapshotImage(ref=ref, created=created, usage_bytes=usage))
        return found

    async def running(self) -> set[str]:
        ours: set[str] = set()
        for machine in await self._machined.list_machines():
            sandbox_id = sandbox_of_machine(machine.name)
            if sandbox_id is None:
                continue
            try:
                unit = await self._machined.machine_unit(machine.name)
            except NoSuchObject:  # it went meanwhile
                continue
            if unit == service_unit(sandbox_id):
                ours.add(sandbox_id)
        return ours

    async def leftovers(self) -> set[str]:
        names = [image.name for image in await self._machined.list_images()]
        found = {sandbox_of_machine(name) for name in names}
        units = await self._systemd.list_units(list(UNIT_PATTERNS))
        found |= {sandbox_of_unit(unit.name) for unit in units}
        if self._layout.sandboxes_dir.is_dir():
            found |= {
                path.name for path in self._layout.sandboxes_dir.iterdir() if SANDBOX_ID.fullmatch(path.name)
            }
        if self._freezer.mechanism is not None:
            found |= self._freezer.mechanism.leftovers()
        return {sandbox_id for sandbox_id in found if sandbox_id is not None} - await self.running()

    async def oom_kills(self, sandbox_id: str) -> int | None:
        return await anyio.to_thread.run_sync(oom_kill_count, sandbox_id)

    async def usage(self, sandbox_id: str) -> MeasuredUsage:
        try:
            counters = await self._systemd.unit_properties(
                slice_unit(sandbox_id), _SLICE_INTERFACE, ("MemoryCurrent", "CPUUsageNSec", "TasksCurrent")
            )
        except NoSuchObject:  # not loaded: nothing runs in it
            counters = {}
        try:
            disk: int | None = await self._machined.image_usage(machine_name(sandbox_id))
        except NoSuchObject:
            disk = None

        def known(value: object) -> int | None:
            return value if isinstance(value, int) and value < _UNKNOWN_SIZE else None

        cpu = known(counters.get("CPUUsageNSec"))
        if cpu is None:  # systemd cannot tell on cgroup v1 (the box): the kernel's counters
            cpu = await anyio.to_thread.run_sync(cpu_usage_nsec, sandbox_id)
        return MeasuredUsage(
            memory_bytes=known(counters.get("MemoryCurrent")),
            cpu_nsec=cpu,
            tasks=known(counters.get("TasksCurrent")),
            disk_bytes=known(disk),
        )

    def jail(self, sandbox_id: str) -> JailClient:
        return JailClient(self._layout.control_socket(sandbox_id), sandbox_id)

    async def copy_in(self, sandbox_id: str, host_source: Path, container_destination: str) -> None:
        await self._machined.copy_to_machine(
            machine_name(sandbox_id), str(host_source), container_destination
        )
