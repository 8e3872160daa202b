"""Client of the exec supervisor that runs inside each sandbox.

Talks the one-JSON-line protocol described in ``nspawn_mcp/sandbox/supervisor.py``
over the Unix socket the supervisor creates in the sandbox's control directory.
Closing the connection (for example when the MCP request is cancelled) makes the
supervisor kill the command's process group.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import anyio

from ..errors import ExecFailed, SandboxGone
from .api import CommandOutcome, CommandSpec

__all__ = ["run_command"]

_GRACE_SECONDS = 10.0
_LINE_LIMIT = 256 << 20


async def run_command(socket_path: Path, spec: CommandSpec) -> CommandOutcome:
    request = {
        "argv": list(spec.argv),
        "cwd": spec.cwd,
        "env": dict(spec.env),
        "stdin_b64": base64.b64encode(spec.stdin).decode("ascii"),
        "timeout": spec.timeout_seconds,
        "max_output": spec.max_output_bytes,
    }
    try:
        stream = await anyio.connect_unix(str(socket_path))
    except OSError:
        raise SandboxGone("the sandbox is not accepting commands (it may have stopped)") from None
    async with stream:
        # The supervisor enforces the command's timeout; this bound only guards
        # against a supervisor that stopped answering.
        with anyio.move_on_after(spec.timeout_seconds + _GRACE_SECONDS) as scope:
            await stream.send(json.dumps(request).encode() + b"\n")
            buffer = bytearray()
            while not buffer.endswith(b"\n"):
                try:
                    chunk = await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    raise SandboxGone("the sandbox stopped while the command was running") from None
                buffer += chunk
                if len(buffer) > _LINE_LIMIT:
                    raise ExecFailed("the sandbox sent an oversized reply")
        if scope.cancelled_caught:
            raise SandboxGone("the sandbox stopped answering (supervisor unresponsive)")
    return _parse_reply(json.loads(buffer))


def _parse_reply(reply: dict[str, Any]) -> CommandOutcome:
    if "error" in reply:
        raise ExecFailed(str(reply.get("message") or reply["error"]))
    return CommandOutcome(
        exit_code=reply["exit_code"],
        signal=reply["signal"],
        stdout=base64.b64decode(reply["stdout_b64"]),
        stderr=base64.b64decode(reply["stderr_b64"]),
        stdout_truncated=bool(reply["stdout_truncated"]),
        stderr_truncated=bool(reply["stderr_truncated"]),
        timed_out=bool(reply["timed_out"]),
        duration_ms=float(reply["duration_ms"]),
    )
