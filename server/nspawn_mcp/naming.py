"""Names this server gives to what it creates on the host, and how it recognises them.

Machine names double as network-interface suffixes (``ve-<name>``, 15 characters at
most), so sandbox ids are kept to 12 characters. Everything the server creates
carries a fixed prefix, which is how a restarted server finds its own sandboxes
and leaves everybody else's alone.
"""

from __future__ import annotations

import re
import secrets

from .errors import InvalidRequest

__all__ = [
    "SANDBOX_ID",
    "new_sandbox_id",
    "parse_sandbox_id",
    "service_unit",
    "slice_unit",
    "template_image",
]

SANDBOX_ID = re.compile(r"^sbx-[0-9a-f]{8}$")
PARENT_SLICE = "nspawnmcp.slice"


def new_sandbox_id() -> str:
    return "sbx-" + secrets.token_hex(4)


def parse_sandbox_id(value: str) -> str:
    """Validate an id an agent sent; the message says what an id looks like."""
    if not SANDBOX_ID.match(value):
        shown = (
            value
            if len(value) <= 40 and value.isprintable()
            else value[:40].encode("unicode_escape").decode()
        )
        raise InvalidRequest(
            f"invalid sandbox_id {shown!r}: ids look like 'sbx-1a2b3c4d' (from create_sandbox)"
        )
    return value


def service_unit(sandbox_id: str) -> str:
    return f"nspawn-mcp-{sandbox_id}.service"


def slice_unit(sandbox_id: str) -> str:
    # A dash in a slice name means nesting: this lands under nspawnmcp.slice.
    return f"nspawnmcp-{sandbox_id.removeprefix('sbx-')}.slice"


def template_image(image: str) -> str:
    return f"nspawn-mcp-{image}"
