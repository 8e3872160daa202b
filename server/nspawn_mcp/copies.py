"""copy_file's two directions, for files and directories, once the service has checked who asks.

Into a sandbox: a file is staged on the host (confined beneath its allowed root, see
:mod:`hostfs`) and copied in by machined (``CopyToMachine``); a directory is archived on the
host (regular files and directories only, see :mod:`hosttree`), copied in the same way and
unpacked by the sandbox's supervisor inside its jail. Out of a sandbox everything is read by
the supervisor, so only what root inside may read comes out, checked and capped as it comes,
and lands on the host only when complete (a file linked into place, a tree renamed into place).
"""

from __future__ import annotations

import secrets

import anyio
import anyio.to_thread

from . import hostfs, hosttree
from .backend.api import Backend, Jail, TreeEntry
from .errors import CopyRefused
from .models import CopyResult
from .policy import HostTarget
from .sandbox.protocol import MAX_TREE_ENTRIES

__all__ = ["copy_in", "copy_out"]


async def copy_in(
    backend: Backend, sandbox_id: str, jail: Jail, target: HostTarget, destination: str, limit: int
) -> CopyResult:
    """The host file or directory ``target`` to ``destination`` in the sandbox, at most ``limit`` bytes."""
    if await anyio.to_thread.run_sync(hosttree.is_directory, target):
        return await _tree_in(backend, sandbox_id, jail, target, destination, limit)
    with hostfs.staging_area(backend.staging_dir) as area:
        staged, stats = await anyio.to_thread.run_sync(hostfs.stage_from_host, target, area, limit)
        await backend.copy_in(sandbox_id, staged, destination)
    return CopyResult(
        direction="to_sandbox",
        source=target.path,
        destination=destination,
        bytes=stats.bytes,
        sha256=stats.sha256,
    )


async def copy_out(jail: Jail, source: str, target: HostTarget, limit: int) -> CopyResult:
    """The sandbox's file or directory ``source`` to the host path ``target``, at most ``limit`` bytes."""
    if await _is_directory(jail, source):
        return await _tree_out(jail, source, target, limit)
    publication = await anyio.to_thread.run_sync(hostfs.Publication, target, limit, f"sandbox path {source}")
    try:

        async def sink(data: bytes) -> None:
            await anyio.to_thread.run_sync(publication.write, data)

        done = await jail.read_file(source, limit, sink)
        stats = await anyio.to_thread.run_sync(publication.publish, done.mode)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(publication.discard)
    return CopyResult(
        direction="from_sandbox",
        source=source,
        destination=target.path,
        bytes=stats.bytes,
        sha256=stats.sha256,
    )


async def _tree_in(
    backend: Backend, sandbox_id: str, jail: Jail, target: HostTarget, destination: str, limit: int
) -> CopyResult:
    archive = f"/var/tmp/.nspawn-mcp-copy-{secrets.token_hex(8)}.tar"
    with hostfs.staging_area(backend.staging_dir) as area:
        staged, stats = await anyio.to_thread.run_sync(hosttree.stage_tree_from_host, target, area, limit)
        await backend.copy_in(sandbox_id, staged, archive)
    written = await jail.extract_tar(archive, destination, limit)
    return CopyResult(
        direction="to_sandbox",
        source=target.path,
        destination=destination,
        bytes=written.bytes,
        files=written.files,
        directories=written.directories + 1,
        skipped=stats.skipped,
        skipped_examples=list(stats.skipped_examples),
    )


async def _tree_out(jail: Jail, source: str, target: HostTarget, limit: int) -> CopyResult:
    """Streamed by the supervisor as bounded entries, built under a hidden directory, renamed into place."""
    publication = await anyio.to_thread.run_sync(hosttree.TreePublication, target, limit)
    try:

        async def on_entry(entry: TreeEntry) -> None:
            await anyio.to_thread.run_sync(publication.add, entry)

        async def on_data(data: bytes) -> None:
            await anyio.to_thread.run_sync(publication.write, data)

        done = await jail.read_tree(source, limit, MAX_TREE_ENTRIES, on_entry, on_data)
        await anyio.to_thread.run_sync(publication.publish)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(publication.discard)
    return CopyResult(
        direction="from_sandbox",
        source=source,
        destination=target.path,
        bytes=done.bytes,
        files=done.files,
        directories=done.directories + 1,
        skipped=done.skipped,
        skipped_examples=list(done.skipped_examples),
    )


async def _is_directory(jail: Jail, path: str) -> bool:
    """Whether a sandbox path is a directory, as root inside sees it."""
    try:
        await jail.list_files(path, None, 1, 0)
    except CopyRefused:
        return False
    return True
