"""A real MCP client exposes a sandbox's web server through the real daemon, and sets env at create."""

from __future__ import annotations

import anyio
import pytest
from mcp.client import Client

from tests.e2e.conftest import call, error_text, kill_daemon
from tests.web import answered, refused

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SERVE_SITE = (
    'mkdir -p /tmp/site && printf "%s" "$GREETING" > /tmp/site/hello.txt && '
    "exec python3 -m http.server 8000 --bind 127.0.0.1 --directory /tmp/site"
)


async def test_a_web_server_in_a_sandbox_answers_on_its_exposed_port_across_a_daemon_restart(
    client: Client,
) -> None:
    created = await call(client, "create_sandbox", env={"GREETING": "hello through the forward"})
    sandbox = created["sandbox_id"]
    assert created["env"] == ["GREETING"]
    try:
        await call(client, "exec_in_sandbox", sandbox_id=sandbox, command=SERVE_SITE, background=True)
        exposed = await call(client, "expose_port", sandbox_id=sandbox, sandbox_port=8000)
        host, port = exposed["host"], exposed["host_port"]
        assert exposed["address"] == f"127.0.0.1:{port}"
        assert (await answered(host, port)).endswith(b"hello through the forward")
        listed = (await call(client, "list_sandboxes"))["sandboxes"]
        assert [p["address"] for p in listed[0]["ports"]] == [exposed["address"]]

        refusal = await error_text(
            client, "expose_port", sandbox_id=sandbox, sandbox_port=9000, host_address="0.0.0.0"
        )
        assert "0.0.0.0 is not allowed for exposed ports; allowed: 127.0.0.1" in refusal

        kill_daemon()  # the restarted daemon listens again on the same host port
        with anyio.fail_after(30):
            while (listing := await client.call_tool("list_sandboxes", {})).is_error:
                await anyio.sleep(0.1)  # a call that met the restart says so; the next one is served
        assert listing.structured_content is not None
        listed = listing.structured_content["sandboxes"]
        assert [p["address"] for p in listed[0]["ports"]] == [exposed["address"]]
        assert (await answered(host, port)).endswith(b"hello through the forward")

        await call(client, "unexpose_port", sandbox_id=sandbox, sandbox_port=8000)
        assert await refused(host, port)
    finally:
        await call(client, "destroy_sandbox", sandbox_id=sandbox)
