"""Who may use the HTTP transport: bearer tokens (a file of hashes) and the Host headers it answers.

``tokens`` holds the token file and its verification (no MCP imports); ``bearer`` puts it behind
the MCP SDK's bearer authentication; ``hosts`` builds the DNS-rebinding settings for a bind.
"""

from .bearer import BearerTokenVerifier, IdentityAccessToken, current_identity, http_auth_settings
from .hosts import transport_security
from .tokens import TokenError, TokenFileError, TokenIdentity, TokenStore

__all__ = [
    "BearerTokenVerifier",
    "IdentityAccessToken",
    "TokenError",
    "TokenFileError",
    "TokenIdentity",
    "TokenStore",
    "current_identity",
    "http_auth_settings",
    "transport_security",
]
