"""nspawn-mcp: disposable Linux sandboxes for AI agents, as an MCP server.

Sandboxes are systemd-nspawn containers registered with systemd-machined, driven
over D-Bus. The public API of the package is deliberately small: the server is
used through its command line (``nspawn-mcp serve``) and over MCP.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
