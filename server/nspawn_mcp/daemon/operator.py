"""The operator's requests on the daemon's socket (pure: encode, decode, bounds).

An operator is root on the daemon's host. ``nspawn-mcp list`` and ``nspawn-mcp destroy``
connect to the daemon's socket like a front end, with ``"operator": true`` in the hello
(see :mod:`.handshake`); the daemon admits that only from a peer whose uid, as the kernel
reports it, is 0 (:func:`nspawn_mcp.daemon.sessions.admit`). Then, instead of MCP, each
side sends one JSON line at a time::

    operator -> {"op": "list"}
    daemon   -> {"ok": true, "sandboxes": [{"sandbox_id": "sbx-1a2b3c4d", "owner": "uid:1000", ...}]}
    operator -> {"op": "destroy", "sandbox_id": "sbx-1a2b3c4d"}
    daemon   -> {"ok": true}
             or {"ok": false, "error": "no live sandbox sbx-1a2b3c4d; `nspawn-mcp list` shows them"}

Both sides decode what the other sends here, and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime

from ..naming import SANDBOX_ID
from ..records import LiveSandbox

__all__ = [
    "MAX_REPLY",
    "MAX_REQUEST",
    "DestroyRequest",
    "ListRequest",
    "LiveSandbox",
    "OperatorError",
    "OperatorRequest",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
]

MAX_REQUEST = 1024
MAX_REPLY = 16 << 20
"""A listing of thousands of sandboxes fits."""


class OperatorError(ValueError):
    """A request or reply that is not what the protocol says, or the daemon's refusal."""


@dataclass(frozen=True)
class ListRequest:
    pass


@dataclass(frozen=True)
class DestroyRequest:
    sandbox_id: str


OperatorRequest = ListRequest | DestroyRequest


def _line(body: dict[str, object]) -> bytes:
    return json.dumps(body, separators=(",", ":"), default=str).encode() + b"\n"


def _object(line: bytes, limit: int) -> dict[str, object]:
    if len(line) > limit:
        raise OperatorError(f"a line longer than {limit} bytes")
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise OperatorError("a line that is not JSON") from None
    if not isinstance(value, dict):
        raise OperatorError("a line that is not a JSON object")
    return value


def encode_request(request: OperatorRequest) -> bytes:
    if isinstance(request, DestroyRequest):
        return _line({"op": "destroy", "sandbox_id": request.sandbox_id})
    return _line({"op": "list"})


def decode_request(line: bytes) -> OperatorRequest:
    body = _object(line, MAX_REQUEST)
    op = body.get("op")
    if op == "list" and body.keys() == {"op"}:
        return ListRequest()
    if op == "destroy" and body.keys() == {"op", "sandbox_id"}:
        sandbox_id = body["sandbox_id"]
        if not isinstance(sandbox_id, str) or not SANDBOX_ID.fullmatch(sandbox_id):
            raise OperatorError("sandbox_id must look like sbx-1a2b3c4d")
        return DestroyRequest(sandbox_id)
    raise OperatorError('the request must be {"op": "list"} or {"op": "destroy", "sandbox_id": ID}')


def encode_reply(reply: list[LiveSandbox] | str | None) -> bytes:
    """A listing, a done (None), or (a string) a refusal."""
    if isinstance(reply, str):
        return _line({"ok": False, "error": reply})
    if reply is None:
        return _line({"ok": True})
    rows = [
        asdict(row) | {"created_at": row.created_at.isoformat(), "expires_at": row.expires_at.isoformat()}
        for row in reply
    ]
    return _line({"ok": True, "sandboxes": rows})


def _optional_int(row: dict[str, object], key: str) -> int | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise OperatorError(f"{key} must be a count")
    return value


def _sandbox(row: object) -> LiveSandbox:
    if not isinstance(row, dict):
        raise OperatorError("a sandbox that is not an object")
    texts = {
        key: row.get(key) for key in ("sandbox_id", "owner", "policy", "image", "created_at", "expires_at")
    }
    if not all(isinstance(value, str) and len(value) < 256 for value in texts.values()):
        raise OperatorError("a sandbox without its id, owner, policy, image or times")
    connected, pooled = row.get("connected"), row.get("pooled", False)
    if not isinstance(connected, bool) or not isinstance(pooled, bool):
        raise OperatorError("connected and pooled must be true or false")
    try:
        created, expires = (datetime.fromisoformat(str(texts[key])) for key in ("created_at", "expires_at"))
    except ValueError:
        raise OperatorError("created_at and expires_at must be ISO 8601 times") from None
    return LiveSandbox(
        sandbox_id=str(texts["sandbox_id"]),
        owner=str(texts["owner"]),
        policy=str(texts["policy"]),
        image=str(texts["image"]),
        created_at=created,
        expires_at=expires,
        memory_bytes=_optional_int(row, "memory_bytes"),
        cpu_nsec=_optional_int(row, "cpu_nsec"),
        tasks=_optional_int(row, "tasks"),
        connected=connected,
        pooled=pooled,
    )


def decode_reply(line: bytes) -> list[LiveSandbox] | None:
    """A listing, or None for a done; raises OperatorError with the daemon's reason if it refused."""
    body = _object(line, MAX_REPLY)
    if body.get("ok") is not True:
        error = body.get("error")
        raise OperatorError(str(error)[:1000] if isinstance(error, str) else "the daemon refused the request")
    rows = body.get("sandboxes")
    if rows is None:
        return None
    if not isinstance(rows, list):
        raise OperatorError("sandboxes must be a list")
    return [_sandbox(row) for row in rows]
