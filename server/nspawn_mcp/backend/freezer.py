"""Freezing a sandbox's processes for the instant of a snapshot, so that it is consistent.

A snapshot of a running sandbox's filesystem is a btrfs snapshot, atomic for the
filesystem but not for the programs writing to it: one that appends to two files in
turn could be caught with the second ahead of the first. With every process of the
sandbox stopped at a system-call boundary, a snapshot holds what the programs had
written up to one instant, and nothing after it.

Two mechanisms, picked by the host's cgroup layout (:func:`host_freezer`):

- cgroup v2 (unified): systemd's ``FreezeUnit`` / ``ThawUnit`` of the sandbox's service
  (its reply comes once every process is frozen).
- cgroup v1 or hybrid, where systemd cannot freeze units: the kernel's v1 freezer,
  which systemd does not manage. Each sandbox gets a freezer cgroup of its own,
  ``<freezer>/nspawnmcp/<id>``, the first time it is frozen: its processes are moved
  there, in passes until one finds none left behind (a process forked meanwhile by
  one not yet moved), and whatever they start later inherits the cgroup. Freezing is
  writing ``FROZEN`` to its ``freezer.state`` and waiting for the kernel to report it.
  Sandboxes never snapshotted pay nothing for it (creates stay as fast).

Freezes of one sandbox nest (:meth:`Freezer.frozen` counts them): concurrent snapshots
and forks thaw it once the last one is done.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import anyio
import anyio.to_thread

from ..errors import BackendError
from ..naming import PARENT_SLICE, freezer_group, sandbox_of_freezer_group, service_unit, slice_unit

__all__ = ["CgroupFreezer", "FreezeMechanism", "Freezer", "UnitFreezer", "host_freezer"]

log = logging.getLogger(__name__)

_ROOT = Path("/sys/fs/cgroup")
_FREEZE_TIMEOUT = 5.0
_POLL = 0.0005
_PASSES = 20


class _Units(Protocol):
    async def freeze_unit(self, name: str) -> None: ...
    async def thaw_unit(self, name: str) -> None: ...


class FreezeMechanism(Protocol):
    """How a sandbox's processes are stopped and let go again."""

    async def freeze(self, sandbox_id: str) -> None: ...
    async def thaw(self, sandbox_id: str) -> None: ...
    async def remove(self, sandbox_id: str) -> None:
        """The sandbox's processes are gone: drop what :meth:`enroll` made. Idempotent."""
        ...

    def leftovers(self) -> set[str]:
        """Sandboxes that still have something of this mechanism's (a freezer cgroup)."""
        ...


class UnitFreezer:
    """cgroup v2: systemd freezes the sandbox's service and everything in it."""

    def __init__(self, units: _Units) -> None:
        self._units = units

    async def freeze(self, sandbox_id: str) -> None:
        await self._units.freeze_unit(service_unit(sandbox_id))

    async def thaw(self, sandbox_id: str) -> None:
        await self._units.thaw_unit(service_unit(sandbox_id))

    async def remove(self, sandbox_id: str) -> None:
        return None

    def leftovers(self) -> set[str]:
        return set()


class CgroupFreezer:
    """cgroup v1: a freezer cgroup per sandbox, outside systemd's care."""

    def __init__(self, root: Path = _ROOT) -> None:
        self._freezer = root / "freezer"
        self._systemd = root / "systemd"

    def _group(self, sandbox_id: str) -> Path:
        return self._freezer / freezer_group(sandbox_id)

    def _service_group(self, sandbox_id: str) -> Path:
        return self._systemd / PARENT_SLICE / slice_unit(sandbox_id) / service_unit(sandbox_id)

    def _move_all(self, sandbox_id: str) -> None:
        """Every process of the sandbox's service into its freezer cgroup."""
        group = self._group(sandbox_id)
        service = self._service_group(sandbox_id)
        if not service.is_dir():
            raise FileNotFoundError(service)
        group.mkdir(parents=True, exist_ok=True)
        procs = group / "cgroup.procs"
        # A process forked by one not yet moved is left behind by a pass: passes repeat until one
        # finds nothing to move; then every process is in, and every later one inherits it.
        for _ in range(_PASSES):
            inside = set(procs.read_text().split())
            moved = 0
            for directory, _dirs, _files in os.walk(service):
                for pid in (Path(directory) / "cgroup.procs").read_text().split():
                    if pid in inside:
                        continue
                    try:
                        procs.write_text(pid)
                    except ProcessLookupError:
                        continue  # it ended meanwhile
                    moved += 1
            if moved == 0:
                return
        raise BackendError(f"sandbox {sandbox_id} starts processes too fast to be frozen; try again")

    async def _set(self, sandbox_id: str, state: str) -> None:
        path = self._group(sandbox_id) / "freezer.state"
        try:
            if state == "FROZEN":
                await anyio.to_thread.run_sync(self._move_all, sandbox_id)
            await anyio.to_thread.run_sync(path.write_text, state)
            with anyio.fail_after(_FREEZE_TIMEOUT):
                # the kernel says when it is done only in this file: no event to wait for
                while (await anyio.to_thread.run_sync(path.read_text)).strip() != state:  # noqa: ASYNC110
                    await anyio.sleep(_POLL)
        except FileNotFoundError:
            raise BackendError(f"sandbox {sandbox_id} cannot be frozen: it is not running") from None
        except TimeoutError:
            raise BackendError(f"sandbox {sandbox_id}'s processes did not stop in time; try again") from None

    async def freeze(self, sandbox_id: str) -> None:
        await self._set(sandbox_id, "FROZEN")

    async def thaw(self, sandbox_id: str) -> None:
        await self._set(sandbox_id, "THAWED")

    def _remove(self, sandbox_id: str) -> None:
        group = self._group(sandbox_id)
        with contextlib.suppress(FileNotFoundError):
            (group / "freezer.state").write_text("THAWED")  # a frozen process would never end
        try:
            group.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            log.warning("the freezer cgroup of %s still has processes; left in place", sandbox_id)

    async def remove(self, sandbox_id: str) -> None:
        await anyio.to_thread.run_sync(self._remove, sandbox_id)

    def leftovers(self) -> set[str]:
        parent = self._group("x").parent
        if not parent.is_dir():
            return set()
        found = {sandbox_of_freezer_group(entry.name) for entry in parent.iterdir() if entry.is_dir()}
        return {sandbox_id for sandbox_id in found if sandbox_id is not None}


def host_freezer(units: _Units, root: Path = _ROOT) -> FreezeMechanism | None:
    """The mechanism this host offers; None if neither (snapshots are then taken unfrozen)."""
    if (root / "cgroup.controllers").exists():
        return UnitFreezer(units)
    if (root / "freezer").is_dir() and os.access(root / "freezer", os.W_OK):
        return CgroupFreezer(root)
    log.warning("no cgroup freezer on this host: snapshots of running sandboxes are taken unfrozen")
    return None


class Freezer:
    """Nested freezes of sandboxes: the first freezes, the last one out thaws."""

    def __init__(self, mechanism: FreezeMechanism | None) -> None:
        self.mechanism = mechanism
        self._holders: dict[str, int] = {}
        self._locks: dict[str, anyio.Lock] = {}

    @contextlib.asynccontextmanager
    async def frozen(self, sandbox_id: str) -> AsyncIterator[None]:
        """Every process of the sandbox is stopped inside the block (thawed after it, shielded)."""
        mechanism = self.mechanism
        if mechanism is None:
            yield
            return
        lock = self._locks.setdefault(sandbox_id, anyio.Lock())
        async with lock:
            if self._holders.get(sandbox_id, 0) == 0:
                try:
                    await mechanism.freeze(sandbox_id)
                except BaseException:
                    with anyio.CancelScope(shield=True), contextlib.suppress(BackendError):
                        await mechanism.thaw(sandbox_id)  # half frozen must not stay so
                    raise
            self._holders[sandbox_id] = self._holders.get(sandbox_id, 0) + 1
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                async with lock:
                    self._holders[sandbox_id] -= 1
                    if self._holders[sandbox_id] == 0:
                        del self._holders[sandbox_id]
                        await mechanism.thaw(sandbox_id)

    def forget(self, sandbox_id: str) -> None:
        """The sandbox is gone (nobody holds it frozen)."""
        if sandbox_id not in self._holders:
            self._locks.pop(sandbox_id, None)
