"""Who may touch a sandbox: only the client that made it, whatever the others say about themselves.

Identity comes from the connection (a stdio front end's uid and session, an HTTP client's
bearer token); every other client is told there is no such sandbox, and what a client calls
itself (``clientInfo``) changes nothing.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp_types import Implementation

from tests.e2e.conftest import SERVER, HttpDaemon, call, free_port, http_client, http_daemon, serve

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CLIENT_INFO = "io.modelcontextprotocol/clientInfo"


def _ids(listed: dict[str, object]) -> set[str]:
    sandboxes = listed["sandboxes"]
    assert isinstance(sandboxes, list)
    return {s["sandbox_id"] for s in sandboxes}


async def _refused_everything(client: Client, sandbox: str, host_file: str, **meta: object) -> None:
    """``client`` may not list, exec in, copy to or from, or destroy ``sandbox``: 'no sandbox X' each time."""
    assert sandbox not in _ids(await call(client, "list_sandboxes"))
    no_such = f"no sandbox {sandbox}"
    out = {"source": "/etc/hostname", "destination": host_file, "direction": "from_sandbox"}
    into = {"source": host_file, "destination": "/root/in", "direction": "to_sandbox"}
    attempts: list[tuple[str, dict[str, object]]] = [
        ("exec_in_sandbox", {"sandbox_id": sandbox, "command": "echo pwned > /root/owned"}),
        ("copy_file", {"sandbox_id": sandbox, **out}),
        ("copy_file", {"sandbox_id": sandbox, **into}),
        ("list_processes", {"sandbox_id": sandbox}),
        ("extend_sandbox", {"sandbox_id": sandbox, "seconds": 60}),
        ("destroy_sandbox", {"sandbox_id": sandbox}),
    ]
    for tool, arguments in attempts:
        with anyio.fail_after(60):
            result = await client.call_tool(tool, arguments, meta=meta or None)  # type: ignore[arg-type]
        text = " ".join(getattr(part, "text", "") for part in result.content)
        assert result.is_error, f"{tool} on another client's sandbox succeeded"
        assert no_such in text, f"{tool}: {text}"


async def test_a_stdio_client_cannot_reach_another_ones_sandbox(box_lifetime: None, workdir: Path) -> None:
    params = serve(cwd=workdir)
    # what the second says it is: the process itself (which sees everything), another uid, a token
    spoofed = Implementation(name="local", version="1.0")
    (workdir / "probe.txt").write_text("from the host\n")
    async with Client(params) as first, Client(params, client_info=spoofed) as second:
        sandbox = (await call(first, "create_sandbox"))["sandbox_id"]
        try:
            for label in (None, "local", "uid:0", "token:someone", "mcp"):
                meta = {} if label is None else {CLIENT_INFO: {"name": label, "version": "1.0"}}
                await _refused_everything(second, sandbox, "probe.txt", **meta)
            assert (workdir / "probe.txt").read_text() == "from the host\n"  # nothing copied out over it

            # the owner still can, and nothing the other tried took effect
            assert _ids(await call(first, "list_sandboxes")) == {sandbox}
            ran = await call(first, "exec_in_sandbox", sandbox_id=sandbox, command="ls /root; echo ok")
            assert ran["stdout"] == "ok\n"
            await call(
                first,
                "copy_file",
                sandbox_id=sandbox,
                source="probe.txt",
                destination="/root/probe.txt",
                direction="to_sandbox",
            )
            await call(
                first,
                "copy_file",
                sandbox_id=sandbox,
                source="/root/probe.txt",
                destination="back.txt",
                direction="from_sandbox",
            )
            assert (workdir / "back.txt").read_text() == "from the host\n"

            # and the other way round: the second's own sandbox is its own
            theirs = (await call(second, "create_sandbox"))["sandbox_id"]
            await _refused_everything(first, theirs, "probe.txt")
            assert _ids(await call(second, "list_sandboxes")) == {theirs}
            await call(second, "destroy_sandbox", sandbox_id=theirs)
        finally:
            await call(first, "destroy_sandbox", sandbox_id=sandbox)


@pytest.fixture(scope="module")
def tokens_daemon(box_lifetime: None) -> Iterator[HttpDaemon]:
    """The daemon serving HTTP on loopback, with tokens for identities ``a`` and ``b``."""
    with http_daemon(["a", "b"]) as daemon:
        yield daemon


async def test_http_clients_see_only_their_own_tokens_sandboxes(
    tokens_daemon: HttpDaemon, workdir: Path
) -> None:
    url, tokens = tokens_daemon.url, tokens_daemon.tokens
    stdio = serve(cwd=workdir)
    async with (
        http_client(url, tokens["a"]) as a,
        http_client(url, tokens["b"], client_info=Implementation(name="a", version="1.0")) as b,
        Client(stdio) as local,
    ):
        of_a = (await call(a, "create_sandbox"))["sandbox_id"]
        of_stdio = (await call(local, "create_sandbox"))["sandbox_id"]
        try:
            await _refused_everything(b, of_a, str(workdir / "probe.txt"))
            await _refused_everything(local, of_a, "probe.txt")
            await _refused_everything(a, of_stdio, str(workdir / "probe.txt"))
            assert _ids(await call(a, "list_sandboxes")) == {of_a}
            assert _ids(await call(local, "list_sandboxes")) == {of_stdio}
            assert _ids(await call(b, "list_sandboxes")) == set()
            for client, sandbox in ((a, of_a), (local, of_stdio)):
                ran = await call(client, "exec_in_sandbox", sandbox_id=sandbox, command="echo ok")
                assert ran["stdout"] == "ok\n"
        finally:
            await call(a, "destroy_sandbox", sandbox_id=of_a)
            await call(local, "destroy_sandbox", sandbox_id=of_stdio)


async def test_an_http_client_with_a_token_creates_runs_and_destroys(tokens_daemon: HttpDaemon) -> None:
    async with http_client(tokens_daemon.url, tokens_daemon.tokens["a"]) as client:
        created = await call(client, "create_sandbox")
        sandbox = created["sandbox_id"]
        try:
            ran = await call(client, "exec_in_sandbox", sandbox_id=sandbox, command="echo $((6 * 7))")
            assert (ran["exit_code"], ran["stdout"]) == (0, "42\n")
            assert _ids(await call(client, "list_sandboxes")) == {sandbox}
        finally:  # an HTTP client's sandboxes outlive its connection
            assert await call(client, "destroy_sandbox", sandbox_id=sandbox) == {
                "sandbox_id": sandbox,
                "destroyed": True,
            }
        assert _ids(await call(client, "list_sandboxes")) == set()


async def test_http_without_a_valid_token_gets_401(tokens_daemon: HttpDaemon) -> None:
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "a", "version": "1.0"},
        },
    }
    headers = {"Accept": "application/json, text/event-stream"}
    wrong = "nsm_" + secrets.token_urlsafe(32)
    async with httpx2.AsyncClient(timeout=30) as http:
        for authorization in (None, f"Bearer {wrong}", f"Bearer {tokens_daemon.tokens['a']}x", "Basic YTpi"):
            sent = headers if authorization is None else headers | {"Authorization": authorization}
            with anyio.fail_after(30):
                response = await http.post(tokens_daemon.url, json=initialize, headers=sent)
            assert response.status_code == 401, (authorization, response.status_code, response.text)
        with anyio.fail_after(30):  # the control: the right token is let in
            admitted = await http.post(
                tokens_daemon.url,
                json=initialize,
                headers=headers | {"Authorization": f"Bearer {tokens_daemon.tokens['a']}"},
            )
        assert admitted.status_code == 200, admitted.text


@pytest.mark.parametrize("command", ["serve", "daemon run"])
@pytest.mark.parametrize("tokens_file", ["missing", "empty"])
def test_http_refuses_to_start_without_tokens(tmp_path: Path, command: str, tokens_file: str) -> None:
    # A state directory of its own: the refusal comes before the daemon looks at anything else
    # (its pool, its lock, the box), so the host's daemon and tokens are not touched.
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    environment = os.environ | {"NSPAWN_MCP_STATE_DIR": str(state)}
    if tokens_file == "empty":  # the last token was removed
        for action in ("add", "remove"):
            command_line = [str(SERVER), "token", action, "gone"]
            subprocess.run(command_line, env=environment, check=True, capture_output=True)
        assert (state / "tokens.toml").exists()
    port = free_port()
    refused = subprocess.run(
        [str(SERVER), *command.split(), "--http", f"0.0.0.0:{port}"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == (1 if command == "serve" else 78), (
        refused
    )  # 78: its unit does not restart it
    assert "nspawn-mcp token add" in refused.stderr
    assert str(state / "tokens.toml") in refused.stderr
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"http://127.0.0.1:{port}/mcp", timeout=5)
