"""The HTTP transport's gate, through the SDK's own Starlette app: the bearer token (401 before any MCP
message is read), the identity a tool sees, and the Host header check (DNS rebinding) for every bind."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx2
import pytest
from inline_snapshot import snapshot
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import TextContent
from starlette.applications import Starlette

from nspawn_mcp.auth import (
    BearerTokenVerifier,
    TokenStore,
    current_identity,
    http_auth_settings,
    transport_security,
)

pytestmark = pytest.mark.anyio

HOST, PORT = "127.0.0.1", 8765
URL = f"http://{HOST}:{PORT}/mcp"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}
MCP_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


@pytest.fixture
def store(tmp_path: Path) -> TokenStore:
    return TokenStore(tmp_path / "tokens.toml")


def build_app(store: TokenStore) -> Starlette:
    mcp: MCPServer[object] = MCPServer(
        "auth-test",
        token_verifier=BearerTokenVerifier(store),
        auth=http_auth_settings(f"http://{HOST}:{PORT}"),
    )

    @mcp.tool()
    async def whoami(ctx: Context[object]) -> str:
        """The three ways a tool can learn the caller's token identity."""
        access = get_access_token()
        user = getattr(ctx.request_context.request, "user", None)
        identity = current_identity()
        return json.dumps(
            {
                "get_access_token": access.client_id if access else None,
                "request.user": getattr(user, "username", None),
                "current_identity": [identity.name, list(identity.policies)] if identity else None,
            }
        )

    return mcp.streamable_http_app(host=HOST, transport_security=transport_security(HOST, PORT))


@asynccontextmanager
async def serving(store: TokenStore, token: str | None = None) -> AsyncIterator[httpx2.AsyncClient]:
    """The app with its session manager running, and an HTTP client talking to it in process."""
    app = build_app(store)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with (
        app.router.lifespan_context(app),
        httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=app), base_url=f"http://{HOST}:{PORT}", headers=headers
        ) as http,
    ):
        yield http


async def test_no_token_and_a_wrong_token_get_401_before_any_mcp(store: TokenStore) -> None:
    token = store.add("alice")
    with anyio.fail_after(10):
        async with serving(store) as http:
            missing = await http.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
            wrong = await http.post(
                "/mcp", json=INITIALIZE, headers={**MCP_HEADERS, "authorization": f"Bearer {token}x"}
            )
            not_bearer = await http.post(
                "/mcp", json=INITIALIZE, headers={**MCP_HEADERS, "authorization": f"Basic {token}"}
            )
    for response in (missing, wrong, not_bearer):
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
        assert "mcp-session-id" not in response.headers


async def test_the_right_token_initializes(store: TokenStore) -> None:
    token = store.add("alice")
    with anyio.fail_after(10):
        async with serving(store, token) as http:
            response = await http.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
    assert response.status_code == 200
    assert response.headers["mcp-session-id"]
    assert '"serverInfo"' in response.text


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_tool_sees_the_token_identity(store: TokenStore, mode: str) -> None:
    """Both protocol eras: the SDK carries the request's context variables into the tool's task."""
    store.add("bob")
    token = store.add("alice", ["default"])
    with anyio.fail_after(10):
        async with (
            serving(store, token) as http,
            Client(streamable_http_client(URL, http_client=http), mode=mode) as client,
        ):
            result = await client.call_tool("whoami", {})
    assert not result.is_error
    assert isinstance(result.content[0], TextContent)
    assert json.loads(result.content[0].text) == {
        "get_access_token": "alice",
        "request.user": "alice",
        "current_identity": ["alice", ["default"]],
    }


async def test_a_removed_token_is_refused_on_its_next_request(store: TokenStore) -> None:
    token = store.add("alice")
    with anyio.fail_after(10):
        async with serving(store, token) as http:
            opened = await http.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
            store.remove("alice")
            session = {"mcp-session-id": opened.headers["mcp-session-id"]}
            after = await http.post(
                "/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "ping"}, headers={**MCP_HEADERS, **session}
            )
    assert opened.status_code == 200
    assert after.status_code == 401


async def test_a_session_is_usable_only_with_the_token_that_opened_it(store: TokenStore) -> None:
    alice = store.add("alice")
    bob = store.add("bob")
    with anyio.fail_after(10):
        async with serving(store, alice) as http:
            opened = await http.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
            session = {"mcp-session-id": opened.headers["mcp-session-id"]}
            as_bob = await http.post(
                "/mcp",
                json={"jsonrpc": "2.0", "id": 2, "method": "ping"},
                headers={**MCP_HEADERS, **session, "authorization": f"Bearer {bob}"},
            )
    assert as_bob.status_code == 404


async def test_a_foreign_host_header_is_refused_even_with_a_token(store: TokenStore) -> None:
    token = store.add("alice")
    with anyio.fail_after(10):
        async with serving(store, token) as http:
            rebound = await http.post(
                "/mcp", json=INITIALIZE, headers={**MCP_HEADERS, "host": "evil.example"}
            )
            rebound_port = await http.post(
                "/mcp", json=INITIALIZE, headers={**MCP_HEADERS, "host": f"evil.example:{PORT}"}
            )
            other_port = await http.post(
                "/mcp", json=INITIALIZE, headers={**MCP_HEADERS, "host": f"{HOST}:1"}
            )
            foreign_origin = await http.post(
                "/mcp", json=INITIALIZE, headers={**MCP_HEADERS, "origin": "http://evil.example"}
            )
            by_localhost = await http.post(
                "/mcp", json=INITIALIZE, headers={**MCP_HEADERS, "host": f"localhost:{PORT}"}
            )
    assert (rebound.status_code, rebound_port.status_code, other_port.status_code) == (421, 421, 421)
    assert foreign_origin.status_code == 403
    assert by_localhost.status_code == 200


def test_allowed_hosts_for_every_bind() -> None:
    """The bind with its port; loopback names for loopback; the operator's names, at the port and bare."""
    binds: dict[str, tuple[str, tuple[str, ...]]] = {
        "loopback": ("127.0.0.1", ()),
        "loopback v6": ("::1", ()),
        "loopback v6 bracketed": ("[::1]", ()),
        "localhost": ("localhost", ()),
        "one address": ("192.0.2.7", ()),
        "one address and a name": ("192.0.2.7", ("mcp.example.com",)),
        "every v4 address": ("0.0.0.0", ("mcp.example.com", "mcp.example.com:443")),
        "every address": ("::", ("Mcp.Example.com", "[2001:db8::1]:9000", "192.0.2.8", "2001:db8::2")),
        "a name": ("mcp.internal", ()),
    }
    allowed = {}
    for label, (host, names) in binds.items():
        settings = transport_security(host, 8000, names)
        assert settings.enable_dns_rebinding_protection
        assert settings.allowed_origins == [
            f"{scheme}://{name}" for name in settings.allowed_hosts for scheme in ("http", "https")
        ]
        allowed[label] = settings.allowed_hosts
    assert allowed == snapshot(
        {
            "loopback": ["127.0.0.1:8000", "localhost:8000"],
            "loopback v6": ["[::1]:8000", "localhost:8000"],
            "loopback v6 bracketed": ["[::1]:8000", "localhost:8000"],
            "localhost": ["localhost:8000", "127.0.0.1:8000", "[::1]:8000"],
            "one address": ["192.0.2.7:8000"],
            "one address and a name": ["192.0.2.7:8000", "mcp.example.com:8000", "mcp.example.com"],
            "every v4 address": [
                "localhost:8000",
                "127.0.0.1:8000",
                "mcp.example.com:8000",
                "mcp.example.com",
                "mcp.example.com:443",
            ],
            "every address": [
                "localhost:8000",
                "127.0.0.1:8000",
                "[::1]:8000",
                "mcp.example.com:8000",
                "mcp.example.com",
                "[2001:db8::1]:9000",
                "192.0.2.8:8000",
                "192.0.2.8",
                "[2001:db8::2]:8000",
                "[2001:db8::2]",
            ],
            "a name": ["mcp.internal:8000"],
        }
    )


@pytest.mark.parametrize(
    ("host", "port", "allowed", "message"),
    [
        ("0.0.0.0", 8000, (), r"binding 0.0.0.0 answers on every address.*name the host names"),
        ("::", 8000, (), r"binding \[::\] answers on every address"),
        ("127.0.0.1", 0, (), r"port 0 is not in 1..65535"),
        ("127.0.0.1", 70000, (), r"port 70000"),
        ("bad_name", 8000, (), r"'bad_name' is not a host name or an IP address"),
        ("0.0.0.0", 8000, ("evil.example/x",), r"allowed host 'evil.example/x' is not a host name"),
        ("0.0.0.0", 8000, ("a.example:http",), r"the port must be a number"),
        ("0.0.0.0", 8000, ("a.example:0",), r"port 0 is not in"),
        ("0.0.0.0", 8000, ("[2001:db8::1",), r"write an IPv6 address as \[address\]"),
        ("0.0.0.0", 8000, ("0.0.0.0",), r"clients never name the unspecified address"),
        ("0.0.0.0", 8000, ("*",), r"'\*' is not a host name"),
    ],
)
def test_bad_binds_and_names_are_refused(
    host: str, port: int, allowed: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        transport_security(host, port, allowed)
