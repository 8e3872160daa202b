"""Host binds of a running sandbox, attached by the helper in :mod:`.attach`.

The server is multithreaded, so it cannot enter a sandbox's mount namespace itself;
it runs ``python -I -m nspawn_mcp.backend.attach`` (its own interpreter and code),
sends one request and reads one bounded reply, which is mapped here to the
project's errors. See :mod:`.attach` for what the helper does and why.
"""

from __future__ import annotations

import logging
import posixpath
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from ..errors import BackendError, PolicyRefused
from ..policy import BindMount
from .attach import MAX_REPLY_BYTES, AttachReply, AttachRequest, BindSpec

__all__ = ["attach_binds", "attach_request"]

log = logging.getLogger(__name__)

_TIMEOUT = 20.0
HELPER = (sys.executable, "-I", "-m", "nspawn_mcp.backend.attach")


def attach_request(leader: Path, mounts: Sequence[BindMount]) -> AttachRequest:
    """What the helper is asked to do for the sandbox whose init is ``/proc/LEADER`` = ``leader``.

    Each mount's ``root`` and ``source`` are the real paths :func:`~nspawn_mcp.hostfs.resolve_bind_source`
    found (no symlink left in them), which the helper walks again without following any.
    """
    specs = []
    for mount in mounts:
        if mount.inode == 0:
            raise BackendError(f"the bind at {mount.target} was not checked on the host")
        relative = posixpath.relpath(mount.source, mount.root)
        if relative == ".." or relative.startswith("../"):
            # root and source must both be the real paths the check found (hostfs.resolve_bind_source)
            log.error("bind source %s is not beneath its root %s", mount.source, mount.root)
            raise BackendError(f"the bind at {mount.target} was not resolved beneath its allowed root")
        specs.append(
            BindSpec(
                root=mount.root,
                relative=relative,
                device=mount.device,
                inode=mount.inode,
                target=mount.target,
                writable=mount.writable,
                noexec=mount.noexec,
            )
        )
    return AttachRequest(sandbox=str(leader), binds=tuple(specs))


async def attach_binds(leader: Path, mounts: Sequence[BindMount]) -> None:
    """Mount ``mounts`` into the running sandbox whose init's ``/proc`` directory is ``leader``."""
    request = attach_request(leader, mounts)
    reply = await _run_helper(request.encode())
    if reply.kind == "ok":
        return
    log.warning("attaching binds failed (%s): %s %s", reply.kind, reply.message, reply.detail)
    if reply.kind in ("refused", "changed", "missing"):
        raise PolicyRefused(reply.message, rule="mounts.allowed")
    raise BackendError(reply.message or "binding a host directory into the sandbox failed")


async def _run_helper(request: bytes) -> AttachReply:
    output = bytearray()
    try:
        with anyio.fail_after(_TIMEOUT):
            async with await anyio.open_process(
                HELPER, stdin=subprocess.PIPE, stdout=subprocess.PIPE
            ) as helper:
                assert helper.stdin is not None
                assert helper.stdout is not None
                await helper.stdin.send(request)
                await helper.stdin.aclose()
                async for chunk in helper.stdout:
                    output += chunk
                    if len(output) > MAX_REPLY_BYTES:
                        helper.kill()
                        break
    except TimeoutError:
        raise BackendError(
            f"binding host directories took longer than {_TIMEOUT:g} s", retryable=True
        ) from None
    try:
        return AttachReply.decode(bytes(output))
    except (ValueError, KeyError, TypeError):
        log.exception("the bind helper exited with %s and an unreadable reply", helper.returncode)
        raise BackendError("binding a host directory into the sandbox failed") from None
