"""What the real backend claims as its own, from what machined and systemd list.

The two D-Bus clients are replaced by stand-ins that answer listings (the bus itself is
exercised by the integration tests); what is tested is which names count as ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from nspawn_mcp.backend.bus import Bus
from nspawn_mcp.backend.machine1 import ImageInfo, Machined, MachineInfo
from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.backend.systemd1 import Systemd, UnitStatus
from nspawn_mcp.layout import Layout

pytestmark = pytest.mark.anyio

A, B, C, D = "sbx-0000000a", "sbx-0000000b", "sbx-0000000c", "sbx-0000000d"


@dataclass
class Listings:
    images: list[str] = field(default_factory=list)
    machines: dict[str, str] = field(default_factory=dict)
    """machine name -> its unit"""
    units: list[str] = field(default_factory=list)
    patterns: list[list[str]] = field(default_factory=list)

    async def list_images(self) -> list[ImageInfo]:
        return [ImageInfo(name, "subvolume", False, 0) for name in self.images]

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
