"""The first exchange on a connection to the daemon's socket (pure: encode, decode, bounds).

A front end sends one JSON line, the daemon answers with one, then both carry MCP
(JSON-RPC, one message per line) until either side closes::

    front end -> {"nspawn_mcp": 1, "session": "<32 hex>", "workdir": "/home/me/project",
                  "options": ["--policy-dir", "/etc/nspawn-mcp/policies"]}
    daemon    -> {"ok": true, "identity": "uid:0", "version": "0.4.0", "mount_namespace": "mnt:[4026531832]"}
              or {"ok": false, "error": "why"}

``session`` names the front end's connection across daemon restarts: a front end that
reconnects with the same one gets its sandboxes back. ``workdir`` counts only for root
peers (whose word is as good as anything the daemon could check); everybody else may not
name host paths. ``options`` are the daemon options the front end was given (it would have
started the daemon with them): a daemon running with others refuses, rather than serve the
client under rules it did not ask for. Identity is never part of the hello: the daemon takes
it from the socket.

``"operator": true`` asks for the operator's requests (:mod:`.operator`) instead of MCP:
``nspawn-mcp list`` and ``destroy``. The daemon admits it only from a peer of uid 0
(:func:`nspawn_mcp.daemon.sessions.admit`); asking is not being.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

__all__ = ["PROTOCOL", "Hello", "HelloError", "Welcome", "decode_hello", "decode_welcome", "encode"]

PROTOCOL = 1
MAX_LINE = 8192
_SESSION = re.compile(r"^[0-9a-f]{32}$")


class HelloError(ValueError):
    """A hello or welcome line that is not what the protocol says."""


@dataclass(frozen=True)
class Hello:
    session: str
    workdir: str | None = None
    options: tuple[str, ...] | None = None
    """None: whatever the running daemon was started with."""
    operator: bool = False
    """The operator's requests instead of MCP (admitted from root peers only)."""


@dataclass(frozen=True)
class Welcome:
    identity: str
    version: str
    mount_namespace: str


def encode(message: Hello | Welcome | str) -> bytes:
    """The line for a hello, a welcome, or (a plain string) a refusal."""
    if isinstance(message, Hello):
        body: dict[str, object] = {"nspawn_mcp": PROTOCOL, "session": message.session}
        if message.workdir is not None:
            body["workdir"] = message.workdir
        if message.options is not None:
            body["options"] = list(message.options)
        if message.operator:
            body["operator"] = True
    elif isinstance(message, Welcome):
        body = {
            "ok": True,
            "identity": message.identity,
            "version": message.version,
            "mount_namespace": message.mount_namespace,
        }
    else:
        body = {"ok": False, "error": message}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def _object(line: bytes) -> dict[str, object]:
    if len(line) > MAX_LINE:
        raise HelloError(f"the first line is longer than {MAX_LINE} bytes")
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise HelloError("the first line is not JSON") from None
    if not isinstance(value, dict):
        raise HelloError("the first line is not a JSON object")
    return value


def decode_hello(line: bytes) -> Hello:
    body = _object(line)
    if body.get("nspawn_mcp") != PROTOCOL:
        raise HelloError(f"not an nspawn-mcp front end of protocol {PROTOCOL} (is it the same version?)")
    session = body.get("session")
    if not isinstance(session, str) or not _SESSION.match(session):
        raise HelloError("session must be 32 lowercase hex digits")
    workdir = body.get("workdir")
    if workdir is not None and not (
        isinstance(workdir, str) and workdir.startswith("/") and len(workdir) < 4096
    ):
        raise HelloError("workdir must be an absolute path")
    options = body.get("options")
    if options is not None and not (
        isinstance(options, list) and len(options) < 256 and all(isinstance(o, str) for o in options)
    ):
        raise HelloError("options must be a list of strings")
    operator = body.get("operator", False)
    if not isinstance(operator, bool):
        raise HelloError("operator must be true or false")
    return Hello(
        session=session,
        workdir=workdir,
        options=None if options is None else tuple(options),
        operator=operator,
    )


def decode_welcome(line: bytes) -> Welcome:
    """The daemon's answer; raises HelloError with the daemon's reason if it refused."""
    body = _object(line)
    if body.get("ok") is not True:
        error = body.get("error")
        raise HelloError(str(error) if isinstance(error, str) else "the daemon refused the connection")
    fields = (body.get("identity"), body.get("version"), body.get("mount_namespace"))
    if not all(isinstance(field, str) for field in fields):
        raise HelloError("the daemon's answer lacks identity, version or mount_namespace")
    identity, version, mount_namespace = (str(field) for field in fields)
    return Welcome(identity=identity, version=version, mount_namespace=mount_namespace)
