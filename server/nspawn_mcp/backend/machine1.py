"""Client for ``org.freedesktop.machine1`` (systemd-machined): machines, images, copies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dbus_fast import Message

from .bus import Bus

__all__ = ["ImageInfo", "MachineInfo", "Machined"]

_DEST = "org.freedesktop.machine1"
_PATH = "/org/freedesktop/machine1"
_MANAGER = "org.freedesktop.machine1.Manager"
_COPY_REPLACE = 1


@dataclass(frozen=True)
class MachineInfo:
    name: str
    machine_class: str
    service: str


@dataclass(frozen=True)
class ImageInfo:
    name: str
    image_type: str
    read_only: bool
    usage_bytes: int
    """What machined counts as the image's disk use; ``2**64 - 1`` when it cannot tell."""
    created_usec: int = 0
    """When the image was made, microseconds since the epoch; 0 when unknown."""


class Machined:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    @classmethod
    async def attach(cls, bus: Bus, on_removed: Callable[[str], None] | None = None) -> Machined:
        machined = cls(bus)
        if on_removed is not None:

            def handler(message: Message) -> None:
                if message.interface == _MANAGER and message.member == "MachineRemoved":
                    on_removed(message.body[0])

            bus.add_signal_handler(handler)
            await bus.add_match(
                f"type='signal',sender='{_DEST}',interface='{_MANAGER}',member='MachineRemoved'"
            )
        return machined

    async def _call(self, member: str, signature: str, *body: Any, operation: str) -> list[Any]:
        return await self._bus.call(
            destination=_DEST,
            path=_PATH,
            interface=_MANAGER,
            member=member,
            signature=signature,
            body=body,
            operation=operation,
        )

    async def list_machines(self) -> list[MachineInfo]:
        (rows,) = await self._call("ListMachines", "", operation="listing machines")
        return [MachineInfo(name=r[0], machine_class=r[1], service=r[2]) for r in rows]

    async def machine_unit(self, name: str) -> str:
        return str(await self._machine_property(name, "Unit"))

    async def machine_leader(self, name: str) -> int:
        """Host PID of the machine's init (nspawn's stub init under ``--as-pid2``)."""
        return int(await self._machine_property(name, "Leader"))

    async def _machine_property(self, name: str, prop: str) -> Any:
        (path,) = await self._call("GetMachine", "s", name, operation=f"looking up machine {name}")
        return await self._bus.get_property(
            destination=_DEST,
            path=path,
            interface="org.freedesktop.machine1.Machine",
            name=prop,
            operation=f"reading {prop} of machine {name}",
        )

    async def list_images(self) -> list[ImageInfo]:
        (rows,) = await self._call("ListImages", "", operation="listing images")
        return [
            ImageInfo(name=r[0], image_type=r[1], read_only=r[2], usage_bytes=r[5], created_usec=r[3])
            for r in rows
        ]

    async def image_usage(self, name: str) -> int:
        """The image's disk use as machined counts it (``2**64 - 1`` when it cannot tell)."""
        (path,) = await self._call("GetImage", "s", name, operation=f"looking up image {name}")
        usage = await self._bus.get_property(
            destination=_DEST,
            path=path,
            interface="org.freedesktop.machine1.Image",
            name="Usage",
            operation=f"reading the disk use of image {name}",
        )
        return int(usage)

    async def clone_image(self, source: str, new_name: str, *, read_only: bool = False) -> None:
        """A copy of ``source`` named ``new_name``: a btrfs snapshot on a btrfs pool."""
        await self._call(
            "CloneImage", "ssb", source, new_name, read_only, operation=f"cloning image {source}"
        )

    async def set_image_limit(self, name: str, limit_bytes: int) -> None:
        """A quota on the image's whole filesystem (a btrfs qgroup limit)."""
        await self._call("SetImageLimit", "st", name, limit_bytes, operation=f"limiting image {name}")

    async def remove_image(self, name: str) -> None:

        await self._call("RemoveImage", "s", name, operation=f"removing image {name}")

    async def mark_image_read_only(self, name: str, read_only: bool = True) -> None:
        await self._call(
            "MarkImageReadOnly", "sb", name, read_only, operation=f"marking image {name} read-only"
        )

    async def copy_to_machine(self, name: str, host_source: str, container_destination: str) -> None:
        await self._call(
            "CopyToMachineWithFlags",
            "ssst",
            name,
            host_source,
            container_destination,
            _COPY_REPLACE,
            operation="copying into the sandbox",
        )
