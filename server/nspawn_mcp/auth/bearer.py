"""The token file behind the MCP SDK's own bearer authentication of the HTTP transport.

The SDK does the HTTP part: its ``BearerAuthBackend`` reads ``Authorization: Bearer``,
asks :class:`BearerTokenVerifier`, and its ``RequireAuthMiddleware`` answers 401 to
a request without a valid token, before any MCP message is read. An MCP session is
bound to the identity that opened it (another token gets 404 for that session id).

Wiring (SDK 2.3: ``MCPServer.streamable_http_app`` takes no verifier; the server does)::

    mcp = MCPServer("nspawn-mcp", token_verifier=BearerTokenVerifier(store),
                    auth=http_auth_settings("http://host:port"), ...)
    app = mcp.streamable_http_app(host=host, transport_security=transport_security(host, port))

In a tool, :func:`current_identity` is the caller's identity (None on stdio and the
unix socket, which have no bearer token). Scopes are not used: what an identity may do
is its policies, enforced by us (``TokenIdentity.may_use``), not by the SDK.
"""

from __future__ import annotations

import hashlib

import anyio.to_thread
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from pydantic import AnyHttpUrl

from .tokens import TokenIdentity, TokenStore

__all__ = ["BearerTokenVerifier", "IdentityAccessToken", "current_identity", "http_auth_settings"]


class IdentityAccessToken(AccessToken):
    """What the SDK keeps for an authenticated request: our identity, and in ``token`` the token's
    SHA-256 (as in the token file), never the token itself."""

    identity: TokenIdentity


class BearerTokenVerifier:
    """The SDK's ``TokenVerifier`` over a :class:`TokenStore`: ``client_id`` is the identity's name.

    No expiry and no scopes (a token is valid until removed); the file is checked in a worker
    thread so a re-read never blocks the event loop.
    """

    def __init__(self, store: TokenStore) -> None:
        self._store = store

    async def verify_token(self, token: str) -> AccessToken | None:
        identity = await anyio.to_thread.run_sync(self._store.verify, token)
        if identity is None:
            return None
        return IdentityAccessToken(
            token=hashlib.sha256(token.encode()).hexdigest(),
            client_id=identity.name,
            scopes=[],
            identity=identity,
        )


def http_auth_settings(url: str) -> AuthSettings:
    """The ``AuthSettings`` the SDK needs before it uses a token verifier at all.

    Resource-server metadata (RFC 9728) is not published (``resource_server_url=None``): there is
    no OAuth authorization server to point clients to; tokens are issued by ``nspawn-mcp token
    add``. ``issuer_url`` is required by the model but unused without an authorization-server
    provider; it is set to the server's own ``url``.
    """
    return AuthSettings(issuer_url=AnyHttpUrl(url), resource_server_url=None, required_scopes=None)


def current_identity() -> TokenIdentity | None:
    """The bearer identity of the request being served, or None (not HTTP, or not our verifier)."""
    token = get_access_token()
    return token.identity if isinstance(token, IdentityAccessToken) else None
