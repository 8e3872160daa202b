"""Client of the exec supervisor that runs inside each sandbox.

Talks the JSON-lines protocol described in ``nspawn_mcp/sandbox/supervisor.py``
over the Unix socket the supervisor creates in the sandbox's control directory.
Closing the connection of a running ``exec`` (for example when the MCP request is
cancelled) makes the supervisor kill the command and everything it started.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from ..errors import ExecFailed, InvalidRequest, NotFound, SandboxGone
from .api import CommandOutcome, CommandSpec, OutputChunk, ProcessOutput, ProcessState

__all__ = ["JailClient"]

_GRACE_SECONDS = 10.0
_CONTROL_TIMEOUT = 30.0
_LINE_LIMIT = 256 << 20

OutputHandler = Callable[[OutputChunk], Awaitable[None]]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _command_request(op: str, spec: CommandSpec, *, timeout: float | None) -> dict[str, Any]:
    return {
        "op": op,
        "argv": list(spec.argv),
        "cwd": spec.cwd,
        "env": dict(spec.env),
        "user": spec.user,
        "stdin_b64": _b64(spec.stdin),
        "timeout": timeout,
        "max_output": spec.max_output_bytes,
    }


def _state(reply: dict[str, Any]) -> ProcessState:
    return ProcessState(
        process_id=str(reply["process_id"]),
        argv=tuple(reply["argv"]),
        running=bool(reply["running"]),
        exit_code=reply["exit_code"],
        signal=reply["signal"],
        timed_out=bool(reply["timed_out"]),
        stdout_truncated=bool(reply["stdout_truncated"]),
        stderr_truncated=bool(reply["stderr_truncated"]),
    )


def _raise_for(reply: dict[str, Any]) -> None:
    if "error" not in reply:
        return
    message = str(reply.get("message") or reply["error"])
    if reply["error"] == "no_such_process":
        raise NotFound(f"{message}; list_processes shows this sandbox's background processes")
    if reply["error"] == "bad_user":
        raise InvalidRequest(message)
    raise ExecFailed(message)


class JailClient:
    """The requests one sandbox's supervisor answers."""

    def __init__(self, socket_path: Path) -> None:
        self._socket_path = socket_path

    async def _request(
        self, request: dict[str, Any], *, timeout: float, on_event: OutputHandler | None = None
    ) -> dict[str, Any]:
        try:
            stream = await anyio.connect_unix(str(self._socket_path))
        except OSError:
            raise SandboxGone("the sandbox is not accepting commands (it may have stopped)") from None
        async with stream:
            # The supervisor enforces a command's own timeout; this bound only
            # guards against a supervisor that stopped answering.
            with anyio.move_on_after(timeout) as scope:
                await stream.send(json.dumps(request).encode() + b"\n")
                buffer = bytearray()
                while True:
                    while b"\n" not in buffer:
                        try:
                            chunk = await stream.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                            raise SandboxGone("the sandbox stopped while the request was running") from None
                        buffer += chunk
                        if len(buffer) > _LINE_LIMIT:
                            raise ExecFailed("the sandbox sent an oversized reply")
                    line, _, rest = bytes(buffer).partition(b"\n")
                    buffer = bytearray(rest)
                    message: dict[str, Any] = json.loads(line)
                    if message.get("event") != "output":
                        break
                    if on_event is not None:
                        await on_event(
                            OutputChunk(
                                stdout=base64.b64decode(message["stdout_b64"]),
                                stderr=base64.b64decode(message["stderr_b64"]),
                            )
                        )
            if scope.cancelled_caught:
                raise SandboxGone("the sandbox stopped answering (supervisor unresponsive)")
        _raise_for(message)
        return message

    async def run(self, spec: CommandSpec, on_output: OutputHandler | None = None) -> CommandOutcome:
        request = _command_request("exec", spec, timeout=spec.timeout_seconds)
        request["stream"] = on_output is not None
        reply = await self._request(
            request, timeout=spec.timeout_seconds + _GRACE_SECONDS, on_event=on_output
        )
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

    async def spawn(self, spec: CommandSpec, timeout: float | None) -> str:
        reply = await self._request(
            _command_request("spawn", spec, timeout=timeout), timeout=_CONTROL_TIMEOUT
        )
        return str(reply["process_id"])

    async def read(
        self, process_id: str, stdout_offset: int, stderr_offset: int, max_bytes: int
    ) -> ProcessOutput:
        reply = await self._request(
            {
                "op": "read",
                "process_id": process_id,
                "stdout_offset": stdout_offset,
                "stderr_offset": stderr_offset,
                "max_bytes": max_bytes,
            },
            timeout=_CONTROL_TIMEOUT,
        )
        return ProcessOutput(
            state=_state(reply),
            stdout=base64.b64decode(reply["stdout_b64"]),
            stderr=base64.b64decode(reply["stderr_b64"]),
            next_stdout_offset=int(reply["next_stdout_offset"]),
            next_stderr_offset=int(reply["next_stderr_offset"]),
        )

    async def write(self, process_id: str, data: bytes, close: bool) -> int:
        reply = await self._request(
            {"op": "write", "process_id": process_id, "data_b64": _b64(data), "close": close},
            timeout=_CONTROL_TIMEOUT,
        )
        return int(reply["written"])

    async def kill(self, process_id: str, signal: int) -> ProcessState:
        reply = await self._request(
            {"op": "kill", "process_id": process_id, "signal": signal}, timeout=_CONTROL_TIMEOUT
        )
        return _state(reply)

    async def list(self) -> list[ProcessState]:
        reply = await self._request({"op": "list"}, timeout=_CONTROL_TIMEOUT)
        return [_state(item) for item in reply["processes"]]
