"""End-to-end: ``nspawn-mcp serve`` as a subprocess, driven by the real MCP client over stdio."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

from nspawn_mcp.box import find_box, host_runs_systemd, stop_box
from nspawn_mcp.layout import Layout

SERVER = Path(sys.executable).parent / "nspawn-mcp"


@pytest.fixture(scope="session")
def box_lifetime() -> Iterator[None]:
    """The server starts (or joins) the private systemd; stop it after the session if it was not running."""
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (run `make test` as root)")
    layout = Layout.from_env()
    started_here = not host_runs_systemd() and find_box(layout) is None
    yield
    if started_here:
        stop_box(layout)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
async def client(box_lifetime: None, workdir: Path) -> AsyncIterator[Client]:
    params = StdioServerParameters(command=str(SERVER), args=["serve"], cwd=str(workdir))
    async with Client(params) as connected:
        yield connected
