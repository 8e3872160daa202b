"""End-to-end: ``nspawn-mcp serve`` as a subprocess, driven by the real MCP client over stdio."""

from __future__ import annotations

import os
import subprocess
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
        stop_box(layout)  # the daemon, a unit of the box, goes with it


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def stop_daemon() -> None:
    subprocess.run([str(SERVER), "daemon", "stop"], check=True, capture_output=True)


@pytest.fixture
def daemon_with_policies(box_lifetime: None, tmp_path: Path) -> Iterator[Path]:
    """A policy directory for the test; the daemon is restarted to load it (and afterwards without it).

    The daemon runs with the options it was started with; a front end that asks for others is
    refused, so the test stops it first (sandboxes survive that; the next daemon adopts them).
    """
    policies = tmp_path / "policies"
    policies.mkdir()
    stop_daemon()
    yield policies
    stop_daemon()


@pytest.fixture
async def client(box_lifetime: None, workdir: Path) -> AsyncIterator[Client]:
    params = StdioServerParameters(command=str(SERVER), args=["serve"], cwd=str(workdir))
    async with Client(params) as connected:
        yield connected
