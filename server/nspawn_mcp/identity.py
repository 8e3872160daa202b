"""Who is calling: the client a request comes from, as the daemon established it.

Identity comes from the connection, never from what a request says about itself:

- a stdio front end's connection to the daemon's socket is ``uid:N`` (the peer's uid,
  from ``SO_PEERCRED``), and its ``session`` is the front end's connection, which its
  sandboxes belong to while it lasts;
- an HTTP client is ``token:NAME``, the name of the bearer token it presented; it has
  no session (HTTP requests do not tell when a client has gone);
- ``operator`` is root on the host, connected with ``nspawn-mcp list`` / ``destroy``: it
  sees and may destroy every sandbox (admitted by :func:`nspawn_mcp.daemon.sessions.admit`);
- ``local`` is the process itself (tests).

What the client calls itself (MCP ``clientInfo``) is only a ``label`` for the logs.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["LOCAL", "OPERATOR", "Client", "current_client"]


@dataclass(frozen=True)
class Client:
    identity: str
    """Who: ``uid:N``, ``token:NAME``, ``operator`` or ``local``. Quotas and the rate limit key on it."""
    session: str | None = None
    """The stdio connection the client's sandboxes belong to; None for HTTP and local callers."""
    policies: frozenset[str] | None = None
    """The policies this client may use; None: every policy."""
    workdir: str | None = None
    """The client's working directory on the daemon's host, which relative host paths (and a policy's
    relative directories) are relative to: a root stdio peer's own, as the kernel reports it; "/" for
    HTTP clients (only absolute directories then count). None: the client may not name host paths."""
    label: str = ""
    """What the client calls itself (``clientInfo.name``), for logs only."""

    def __str__(self) -> str:
        return f"{self.identity} ({self.label})" if self.label else self.identity


LOCAL = Client("local")
OPERATOR = Client("operator", label="nspawn-mcp operator command")

current_client: ContextVar[Client] = ContextVar("nspawn_mcp_client", default=LOCAL)
"""The client of the request being served; set once per connection by the daemon."""
