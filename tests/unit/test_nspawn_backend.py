"""The real backend's reading of what the daemons answer: which names are its own, and what
"no such object" means where it asks.

Stand-ins answer in place of the daemons (the bus itself is exercised by the integration
tests): listings for the names; for errors, a bus that replies with D-Bus error names
mapped by the real :mod:`~nspawn_mcp.backend.dbus_errors`, read by the real clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from nspawn_mcp.backend.api import TemplateImage
from nspawn_mcp.backend.bus import Bus
from nspawn_mcp.backend.dbus_errors import map_dbus_error
from nspawn_mcp.backend.machine1 import ImageInfo, Machined, MachineInfo
from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.backend.systemd1 import Systemd, UnitStatus
from nspawn_mcp.errors import BackendError, NoSuchObject, NotFound
from nspawn_mcp.layout import Layout
from nspawn_mcp.policy import CreateRequest, Policy, resolve_create

pytestmark = pytest.mark.anyio

A, B, C, D = "sbx-0000000a", "sbx-0000000b", "sbx-0000000c", "sbx-0000000d"
PLAN = resolve_create("default", Policy(), CreateRequest(), cwd="/srv")


@dataclass
class Listings:
    images: list[str] = field(default_factory=list)
    machines: dict[str, str] = field(default_factory=dict)
    """machine name -> its unit"""
    units: list[str] = field(default_factory=list)
    patterns: list[list[str]] = field(default_factory=list)

    usage: dict[str, tuple[int, int]] = field(default_factory=dict)
    """image name -> (usage, creation in µs) as ListImages reports them; default: unknown (UINT64_MAX, 0)"""

    async def list_images(self) -> list[ImageInfo]:
        unknown = ((1 << 64) - 1, 0)
        return [ImageInfo(name, "subvolume", False, *self.usage.get(name, unknown)) for name in self.images]

    async def list_machines(self) -> list[MachineInfo]:
        return [MachineInfo(name, "container", "systemd-nspawn") for name in self.machines]

    async def machine_unit(self, name: str) -> str:
        return self.machines[name]

    async def list_units(self, patterns: list[str]) -> list[UnitStatus]:
        self.patterns.append(patterns)
        return [UnitStatus(name, "loaded", "active", "running") for name in self.units]


def backend(listings: Listings, tmp_path: Path) -> NspawnBackend:
    stand_in = cast(Any, listings)
    layout = Layout(state_dir=tmp_path, machines_dir=tmp_path / "machines")
    return NspawnBackend(cast(Bus, None), cast(Systemd, stand_in), cast(Machined, stand_in), layout)


async def test_images_offered_are_the_templates_by_their_image_name(tmp_path: Path) -> None:
    listings = Listings(images=["nspawn-mcp-default", "nspawn-mcp-python", A, "debian", ".host"])
    assert await backend(listings, tmp_path).available_images() == {"default", "python"}


async def test_images_report_size_and_creation_without_paths_and_leave_imports_in_progress_out(
    tmp_path: Path,
) -> None:
    listings = Listings(
        images=[
            "nspawn-mcp-python",
            "nspawn-mcp-default",
            "nspawnmcp-import-tree-default",  # being imported: not an image yet
            "nspawnmcp-import-raw-tools",
            A,
            ".host",
        ],
        usage={"nspawn-mcp-default": (300 << 20, 1_700_000_000_000_000)},
    )
    images = await backend(listings, tmp_path).images()
    assert images == [
        TemplateImage(
            "default", usage_bytes=300 << 20, created=datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
        ),
        TemplateImage("python", usage_bytes=None, created=None),
    ]


async def test_running_sandboxes_are_our_machines_run_by_our_service(tmp_path: Path) -> None:
    listings = Listings(
        machines={
            A: "nspawn-mcp-sbx-0000000a.service",
            B: "systemd-nspawn@sbx-0000000b.service",  # same name, someone else's unit
            C: "nspawn-mcp-sbx-0000000a.service",  # not its own service
            "debian": "systemd-nspawn@debian.service",
        }
    )
    assert await backend(listings, tmp_path).running() == {A}


async def test_leftovers_are_our_remains_of_every_kind_without_a_running_sandbox(tmp_path: Path) -> None:
    (tmp_path / "sandboxes" / D).mkdir(parents=True)
    (tmp_path / "sandboxes" / "not-a-sandbox").mkdir()
    listings = Listings(
        images=[A, "nspawn-mcp-default", "debian"],
        units=["nspawn-mcp-sbx-0000000b.service", "nspawnmcp-0000000c.slice", "nspawnmcp.slice", "x.service"],
        machines={A: "nspawn-mcp-sbx-0000000a.service"},
    )
    assert await backend(listings, tmp_path).leftovers() == {B, C, D}  # A is running
    assert listings.patterns == [["nspawn-mcp-sbx-*.service", "nspawnmcp-*.slice"]]
    listings.machines.clear()
    assert await backend(listings, tmp_path).leftovers() == {A, B, C, D}


# -- what the daemons' "no such object" means ------------------------------------------------


@dataclass
class ScriptedBus:
    """Answers each method with an error reply (by D-Bus error name) or a body, through the real
    error mapping; records the calls."""

    errors: dict[str, str]
    replies: dict[str, list[Any]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    async def call(self, *, member: str, operation: str | None = None, **_: object) -> list[Any]:
        self.calls.append(member)
        if member in self.errors:
            raise map_dbus_error(self.errors[member], "raw text with /host/paths", operation or member)
        return self.replies.get(member, [])


def real_clients(bus: ScriptedBus, tmp_path: Path) -> NspawnBackend:
    on_bus = cast(Bus, bus)
    layout = Layout(state_dir=tmp_path, machines_dir=tmp_path / "machines")
    return NspawnBackend(on_bus, Systemd(on_bus), Machined(on_bus), layout)


@pytest.mark.parametrize(
    "name",
    [
        "org.freedesktop.machine1.NoSuchMachine",
        "org.freedesktop.machine1.NoSuchImage",
        "org.freedesktop.systemd1.NoSuchUnit",
        "org.freedesktop.systemd1.LoadFailed",
        "org.freedesktop.DBus.Error.FileNotFound",
        "System.Error.ENOENT",
    ],
)
def test_a_daemons_missing_object_is_a_backend_error_never_a_missing_sandbox(name: str) -> None:
    error = map_dbus_error(name, "raw text with /host/paths", "removing image sbx-0000000a")
    assert isinstance(error, NoSuchObject)
    assert isinstance(error, BackendError)
    assert not isinstance(error, NotFound)
    assert str(error).startswith("removing image sbx-0000000a failed: ")
    assert "/host/paths" not in str(error)
    assert "sandbox" not in str(error).removeprefix("removing image sbx-0000000a")


async def test_a_missing_template_image_tells_the_agent_how_the_operator_makes_it(tmp_path: Path) -> None:
    bus = ScriptedBus(errors={"CloneImage": "org.freedesktop.machine1.NoSuchImage"})
    with pytest.raises(BackendError, match=r"image 'default' is allowed but not installed on this host; .*"):
        await real_clients(bus, tmp_path).create(A, PLAN)
    assert bus.calls == ["CloneImage"]


async def test_destroying_a_half_made_sandbox_passes_over_what_the_daemons_do_not_have(
    tmp_path: Path,
) -> None:
    bus = ScriptedBus(
        errors={
            "StopUnit": "org.freedesktop.systemd1.NoSuchUnit",
            "ResetFailedUnit": "org.freedesktop.systemd1.NoSuchUnit",
            "RemoveImage": "org.freedesktop.machine1.NoSuchImage",
        }
    )
    await real_clients(bus, tmp_path).destroy(A)
    assert bus.calls == ["StopUnit", "ResetFailedUnit", "StopUnit", "ResetFailedUnit", "RemoveImage"]


async def test_other_failures_of_destroy_still_reach_the_caller(tmp_path: Path) -> None:
    bus = ScriptedBus(
        errors={
            "StopUnit": "org.freedesktop.systemd1.NoSuchUnit",
            "RemoveImage": "org.freedesktop.DBus.Error.AccessDenied",
        }
    )
    with pytest.raises(BackendError, match=r"removing image sbx-0000000a: access denied"):
        await real_clients(bus, tmp_path).destroy(A)


async def test_a_machine_that_goes_while_being_listed_is_not_running(tmp_path: Path) -> None:
    bus = ScriptedBus(
        errors={"GetMachine": "org.freedesktop.machine1.NoSuchMachine"},
        replies={"ListMachines": [[[A, "container", "systemd-nspawn", "", "/org/m/a"]]]},
    )
    assert await real_clients(bus, tmp_path).running() == set()
