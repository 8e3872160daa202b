"""End-to-end: ``nspawn-mcp serve`` as a subprocess, driven by the real MCP client over stdio
(and over streamable HTTP, which the daemon serves itself)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from nspawn_mcp.box import find_box, host_runs_systemd, stop_box
from nspawn_mcp.layout import Layout
from tests.e2e.node.node_tools import NodeTools, NodeToolsError
from tests.e2e.node.node_tools import ensure as ensure_node_tools

SERVER = Path(sys.executable).parent / "nspawn-mcp"
_PASSED_ENVIRONMENT = (
    "PYTHONPATH",
    "NSPAWN_MCP_STATE_DIR",
    "NSPAWN_MCP_RUNTIME_DIR",
    "NSPAWN_MCP_BUS_ADDRESS",
)
CALL_TIMEOUT = 60.0
"""The longest any tool call of these tests may take: a client never hangs."""


def serve(*arguments: str, cwd: Path) -> StdioServerParameters:
    """``nspawn-mcp serve ARGUMENTS`` in ``cwd``, for a stdio client.

    The SDK starts it with a few safe variables only; this test run's ``PYTHONPATH`` (the code
    under test, which the front end hands on to a daemon it starts) and where the state is are
    passed too.
    """
    environment = {key: os.environ[key] for key in _PASSED_ENVIRONMENT if key in os.environ}
    return StdioServerParameters(
        command=str(SERVER), args=["serve", *arguments], cwd=str(cwd), env=environment
    )


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """The structured result of a tool call that must succeed."""
    with anyio.fail_after(CALL_TIMEOUT):
        result = await client.call_tool(tool, arguments)
    text = " ".join(getattr(part, "text", "") for part in result.content)
    assert not result.is_error, text
    assert result.structured_content is not None
    return dict(result.structured_content)


async def error_text(client: Client, tool: str, **arguments: Any) -> str:
    """The message of a tool call that must fail."""
    with anyio.fail_after(CALL_TIMEOUT):
        result = await client.call_tool(tool, arguments)
    text = " ".join(getattr(part, "text", "") for part in result.content)
    assert result.is_error, f"{tool} succeeded: {result.structured_content}"
    return text


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


def daemon_pids() -> list[int]:
    """The daemon's process, found as the host sees it (it runs in the private systemd)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if b"nspawn_mcp\0daemon\0run" in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
    return found


def kill_daemon() -> None:
    pids = daemon_pids()
    assert pids, "no daemon to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


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
    async with Client(serve(cwd=workdir)) as connected:
        yield connected


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def add_token(name: str) -> str:
    """A bearer token for ``name``, made by the command an operator uses."""
    made = subprocess.run([str(SERVER), "token", "add", name], check=True, capture_output=True, text=True)
    return made.stdout.strip()


def remove_token(name: str) -> None:
    subprocess.run([str(SERVER), "token", "remove", name], check=True, capture_output=True)


@dataclass(frozen=True)
class HttpDaemon:
    url: str
    """The MCP endpoint, ``http://127.0.0.1:PORT/mcp``."""
    tokens: dict[str, str]
    """The tokens made for the test: name -> token."""


@contextlib.contextmanager
def http_daemon(token_names: Sequence[str], options: Sequence[str] = ()) -> Iterator[HttpDaemon]:
    """The daemon restarted to serve HTTP (with ``options`` too), with tokens for ``token_names``.

    The names get a random suffix, so a test never takes or removes an operator's token; the
    tokens are removed and the daemon stopped afterwards (the next front end starts it as usual).
    """
    suffix = secrets.token_hex(3)
    tokens: dict[str, str] = {}
    try:
        for name in token_names:
            tokens[name] = add_token(f"{name}-{suffix}")
        stop_daemon()
        address = f"127.0.0.1:{free_port()}"
        started = subprocess.run(
            [str(SERVER), "serve", "--http", address, *options], capture_output=True, text=True, timeout=120
        )
        assert started.returncode == 0, f"serve --http {address} failed: {started.stderr}"
        yield HttpDaemon(f"http://{address}/mcp", tokens)
    finally:
        stop_daemon()
        for name in tokens:
            remove_token(f"{name}-{suffix}")


@contextlib.asynccontextmanager
async def http_client(url: str, token: str, **options: Any) -> AsyncIterator[Client]:
    """An MCP client of the daemon's streamable HTTP endpoint, presenting ``token``."""
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as http,
        Client(streamable_http_client(url, http_client=http), **options) as connected,
    ):
        yield connected


@pytest.fixture(scope="session")
def node_tools() -> NodeTools:
    """Node 22, the MCP Inspector and the conformance suite, as pinned in tests/e2e/node (``make node``)."""
    try:
        return ensure_node_tools()
    except NodeToolsError as exc:
        pytest.fail(str(exc))
