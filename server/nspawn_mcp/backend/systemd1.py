"""Client for ``org.freedesktop.systemd1`` (PID 1): transient units and their jobs."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from dbus_fast import Message, Variant

from ..errors import BackendError, NoSuchObject
from .bus import Bus
from .properties import encode

__all__ = ["Systemd", "UnitStatus"]

_DEST = "org.freedesktop.systemd1"
_PATH = "/org/freedesktop/systemd1"
_MANAGER = "org.freedesktop.systemd1.Manager"

_REMEMBERED_JOBS = 4096


@dataclass(frozen=True)
class UnitStatus:
    name: str
    load_state: str
    active_state: str
    sub_state: str


def _variants(properties: Mapping[str, object]) -> list[list[object]]:
    return [[key, Variant(signature, value)] for key, signature, value in encode(properties)]


class Systemd:
    """Starts and stops transient units and waits for their jobs to finish."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._waiters: dict[str, anyio.Event] = {}
        # JobRemoved can be handled before the coroutine that started the job
        # resumes, so results are remembered until collected (bounded).
        self._results: OrderedDict[str, str] = OrderedDict()
        self._forgotten: set[str] = set()
        """Jobs whose result nobody will ask for (:meth:`forget_job`): not remembered when they end."""

    @classmethod
    async def attach(cls, bus: Bus) -> Systemd:
        systemd = cls(bus)
        bus.add_signal_handler(systemd._on_signal)
        await bus.add_match(f"type='signal',sender='{_DEST}',interface='{_MANAGER}',member='JobRemoved'")
        await systemd._manager("Subscribe")
        return systemd

    def _on_signal(self, message: Message) -> None:
        if message.interface != _MANAGER or message.member != "JobRemoved":
            return
        _job_id, job_path, _unit, result = message.body
        if job_path in self._forgotten:
            self._forgotten.discard(job_path)
            return
        self._results[job_path] = result
        while len(self._results) > _REMEMBERED_JOBS:
            self._results.popitem(last=False)
        waiter = self._waiters.get(job_path)
        if waiter is not None:
            waiter.set()

    async def _manager(
        self,
        member: str,
        signature: str = "",
        *body: Any,
        operation: str | None = None,
        unix_fds: Sequence[int] = (),
    ) -> Any:
        reply = await self._bus.call(
            destination=_DEST,
            path=_PATH,
            interface=_MANAGER,
            member=member,
            signature=signature,
            body=body,
            operation=operation,
            unix_fds=unix_fds,
        )
        return reply[0] if reply else None

    async def _wait_job(self, job_path: str, timeout: float, what: str) -> str:
        if job_path not in self._results:
            event = self._waiters.setdefault(job_path, anyio.Event())
            try:
                with anyio.fail_after(timeout):
                    await event.wait()
            except TimeoutError:
                raise BackendError(
                    f"{what}: systemd did not finish in {timeout:g} s", retryable=True
                ) from None
            finally:
                self._waiters.pop(job_path, None)
        return self._results.pop(job_path)

    async def start_transient_unit(
        self,
        name: str,
        properties: Mapping[str, object],
        *,
        aux: Mapping[str, Mapping[str, object]] | None = None,
        fds: Sequence[int] = (),
        timeout: float = 60.0,
    ) -> None:
        """Start ``name`` (and the ``aux`` units it needs); wait for the job; raise if it failed.

        ``fds`` travel with the call; a property of type ``h`` names one by its index.
        """
        job = await self.submit_transient_unit(name, properties, aux=aux, fds=fds)
        await self.finish_start(name, job, timeout)

    async def submit_transient_unit(
        self,
        name: str,
        properties: Mapping[str, object],
        *,
        aux: Mapping[str, Mapping[str, object]] | None = None,
        fds: Sequence[int] = (),
    ) -> str:
        """Ask for ``name`` to be started, as :meth:`start_transient_unit`, and return at once with the
        job (systemd holds the ``fds`` from now on); :meth:`finish_start` waits for it."""
        what = f"starting {name}"
        job: str = await self._manager(
            "StartTransientUnit",
            "ssa(sv)a(sa(sv))",
            name,
            "fail",
            _variants(properties),
            [[aux_name, _variants(aux_properties)] for aux_name, aux_properties in (aux or {}).items()],
            operation=what,
            unix_fds=fds,
        )
        return job

    def forget_job(self, job: str) -> None:
        """Nobody will wait for ``job`` (the caller learnt its outcome otherwise): keep no result of it."""
        if self._results.pop(job, None) is None:
            self._forgotten.add(job)
            while len(self._forgotten) > _REMEMBERED_JOBS:
                self._forgotten.pop()

    async def finish_start(self, name: str, job: str, timeout: float = 60.0) -> None:
        """Wait for the start job of ``name``; raise if it failed."""
        what = f"starting {name}"
        result = await self._wait_job(job, timeout, what)
        if result != "done":
            raise BackendError(f"{what} failed: {result}")

    async def start_unit(self, name: str, *, timeout: float = 120.0) -> None:
        """Start an installed unit and wait for its job; NoSuchObject if there is no such unit file."""
        what = f"starting {name}"
        job = await self._manager("StartUnit", "ss", name, "replace", operation=what)
        result = await self._wait_job(job, timeout, what)
        if result != "done":
            raise BackendError(f"{what} failed: {result}")

    async def stop_unit(self, name: str, *, timeout: float = 30.0) -> None:
        """Stop ``name`` and wait; a unit that is already gone counts as stopped."""
        what = f"stopping {name}"
        try:
            job = await self._manager("StopUnit", "ss", name, "replace", operation=what)
        except NoSuchObject:
            return
        result = await self._wait_job(job, timeout, what)
        if result not in ("done", "canceled"):
            raise BackendError(f"{what} failed: {result}")

    async def set_unit_properties(self, name: str, properties: Mapping[str, object]) -> None:
        """Change properties of a running unit until it stops (``systemctl set-property --runtime``)."""
        await self._manager(
            "SetUnitProperties", "sba(sv)", name, True, _variants(properties), operation=f"changing {name}"
        )

    async def freeze_unit(self, name: str) -> None:
        """Freeze every process of ``name`` (cgroup v2 only); the reply comes once they are frozen."""
        await self._manager("FreezeUnit", "s", name, operation=f"freezing {name}")

    async def thaw_unit(self, name: str) -> None:
        await self._manager("ThawUnit", "s", name, operation=f"thawing {name}")

    async def kill_unit(self, name: str, signal: int) -> None:
        """Send ``signal`` to every process of ``name``'s cgroup, sub-cgroups included (``KillUnit``
        with ``who=all``); a unit that is not loaded has none."""
        with contextlib.suppress(NoSuchObject):
            await self._manager("KillUnit", "ssi", name, "all", signal, operation=f"killing {name}")

    async def reset_failed(self, name: str) -> None:
        with contextlib.suppress(BackendError):  # not loaded (NoSuchObject) or not failed: nothing to do
            await self._manager("ResetFailedUnit", "s", name, operation=f"resetting {name}")

    async def list_units(self, patterns: list[str]) -> list[UnitStatus]:
        rows = await self._manager("ListUnitsByPatterns", "asas", [], patterns, operation="listing units")
        return [UnitStatus(name=r[0], load_state=r[2], active_state=r[3], sub_state=r[4]) for r in rows]

    async def unit_properties(self, name: str, interface: str, props: Sequence[str]) -> dict[str, Any]:
        """Several properties of one unit (one lookup, then one Get each)."""
        path = await self._manager("GetUnit", "s", name, operation=f"looking up {name}")
        found = {}
        for prop in props:
            found[prop] = await self._bus.get_property(
                destination=_DEST,
                path=path,
                interface=interface,
                name=prop,
                operation=f"reading {prop} of {name}",
            )
        return found

    async def unit_property(self, name: str, interface: str, prop: str) -> Any:
        path = await self._manager("GetUnit", "s", name, operation=f"looking up {name}")
        return await self._bus.get_property(
            destination=_DEST,
            path=path,
            interface=interface,
            name=prop,
            operation=f"reading {prop} of {name}",
        )
