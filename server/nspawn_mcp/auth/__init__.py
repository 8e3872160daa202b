"""Who may use the HTTP transport: bearer tokens (a file of hashes).

``tokens`` holds the token file and its verification (no MCP imports).
"""

from .tokens import TokenError, TokenFileError, TokenIdentity, TokenStore

__all__ = [
    "TokenError",
    "TokenFileError",
    "TokenIdentity",
    "TokenStore",
]
