"""Use cases of the file tools: read, write, edit and list files inside a sandbox.

Every operation goes through the sandbox's own supervisor (``sandbox/fileops.py``),
so it reads and writes exactly what root inside may, no more: paths are resolved
by the sandbox's kernel view, and a symlink planted inside leads only to the
sandbox's own files. Each reaches the sandbox through
:meth:`SandboxService.file_access`, which checks ownership and audits.

Sizes are capped by the policy's ``files`` rules; a refusal names the path and
the rule, and says how to proceed.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Literal

from .errors import InvalidRequest, PolicyRefused, TooLarge
from .models import FileContent, FileEditResult, FileEntryInfo, FileList, FileWriteResult
from .policy import check_container_path
from .service import SandboxService

__all__ = ["SandboxFiles", "human_size", "numbered"]

Encoding = Literal["auto", "text", "base64"]
_MAX_DEPTH = 32


def human_size(size: int) -> str:
    """``size`` in IEC units, as policies write them: 512 bytes, 3.2 MiB, 1 GiB."""
    if size < 1024:
        return f"{size} bytes"
    value, unit = size / 1024, "KiB"
    for larger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


def numbered(data: bytes, first: int) -> str:
    """Lines as ``cat -n`` shows them (number, tab, line), numbered from ``first``; bytes that are not
    UTF-8 replaced."""
    lines = data.decode("utf-8", errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return "".join(f"{number:6}\t{line}\n" for number, line in enumerate(lines, first))


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


class SandboxFiles:
    """The file tools of one service."""

    def __init__(self, service: SandboxService) -> None:
        self._service = service

    async def read(
        self,
        sandbox_id: str,
        path: str,
        offset: int = 0,
        limit: int | None = None,
        encoding: Encoding = "auto",
    ) -> FileContent:
        """A piece of a file: numbered lines of text, or base64 of a binary file (``encoding='auto'``
        decides by the first 8 KiB), at most the policy's ``files.max_read_bytes``."""
        path = check_container_path(path)
        async with self._service.file_access("read_file", sandbox_id, path=path[:4096]) as (jail, rules):
            piece = await jail.read_slice(path, offset, limit, rules.max_read_bytes, encoding)
        return FileContent(
            path=path,
            encoding="base64" if piece.binary else "text",
            content=base64.b64encode(piece.data).decode()
            if piece.binary
            else numbered(piece.data, offset + 1),
            offset=offset,
            next_offset=None if piece.eof else piece.next_offset,
            truncated=not piece.eof,
            size_bytes=piece.size,
            remaining_bytes=max(piece.size - piece.end, 0),
            line_cut=piece.line_cut,
            end_byte=piece.end,
            mode=f"{piece.mode:04o}",
            mtime=_stamp(piece.mtime),
        )

    async def read_whole(self, sandbox_id: str, path: str) -> bytes | str:
        """A whole file (the resource): text if it looks like text, else bytes; refused beyond
        ``files.max_read_bytes``."""
        path = check_container_path(path)
        async with self._service.file_access("read_resource", sandbox_id, path=path[:4096]) as (jail, rules):
            cap = rules.max_read_bytes
            piece = await jail.read_slice(path, 0, None, cap, "auto")
        if not piece.eof:
            raise PolicyRefused(
                f"sandbox file {path} is {human_size(piece.size)}, more than this policy's "
                f"files.max_read_bytes of {human_size(cap)}; read it in pieces with the read_file tool "
                "(offset/limit)",
                rule="files.max_read_bytes",
            )
        return piece.data if piece.binary else piece.data.decode("utf-8", errors="replace")

    async def write(
        self,
        sandbox_id: str,
        path: str,
        content: str,
        encoding: Literal["utf-8", "base64"] = "utf-8",
        mode: str | None = None,
        make_parents: bool = False,
    ) -> FileWriteResult:
        """Replace or create a file atomically (a reader sees the old file or the new one, never a part)."""
        path = check_container_path(path)
        data = _decode_content(content, encoding)
        permissions = _parse_mode(mode)
        async with self._service.file_access("write_file", sandbox_id, path=path[:4096], bytes=len(data)) as (
            jail,
            rules,
        ):
            if len(data) > rules.max_write_bytes:
                raise PolicyRefused(
                    f"the content for {path} is {human_size(len(data))}, more than this policy's "
                    f"files.max_write_bytes of {human_size(rules.max_write_bytes)}; copy larger files in "
                    "with copy_file",
                    rule="files.max_write_bytes",
                )
            written = await jail.write_file(path, data, permissions, make_parents)
        return FileWriteResult(
            path=path, bytes=written.size, mode=f"{written.mode:04o}", created=written.created
        )

    async def edit(self, sandbox_id: str, path: str, old: str, new: str, count: int = 1) -> FileEditResult:
        """Replace exactly ``count`` occurrences of ``old`` with ``new``, atomically; refuse other counts."""
        path = check_container_path(path)
        if not old:
            raise InvalidRequest("old must not be empty: give the exact text to replace")
        if old == new:
            raise InvalidRequest("old and new are the same: nothing would change")
        async with self._service.file_access("edit_file", sandbox_id, path=path[:4096]) as (jail, rules):
            try:
                edited = await jail.edit_file(path, old, new, count, rules.max_write_bytes)
            except TooLarge:
                raise PolicyRefused(
                    f"sandbox file {path} is (or would become) more than this policy's files.max_write_bytes "
                    f"of {human_size(rules.max_write_bytes)}; edit it with a command (exec_in_sandbox)",
                    rule="files.max_write_bytes",
                ) from None
        return FileEditResult(path=path, replaced=edited.replaced, bytes=edited.size)

    async def list(
        self,
        sandbox_id: str,
        path: str,
        pattern: str | None = None,
        depth: int = 1,
        max_entries: int | None = None,
    ) -> FileList:
        """Entries under a directory (symlinks shown with their target, never followed)."""
        path = check_container_path(path)
        if not 1 <= depth <= _MAX_DEPTH:
            raise InvalidRequest(f"depth must be between 1 and {_MAX_DEPTH}")
        async with self._service.file_access("list_files", sandbox_id, path=path[:4096]) as (jail, rules):
            cap = min(max_entries or rules.max_list_entries, rules.max_list_entries)
            listing = await jail.list_files(path, pattern, depth, cap)
        return FileList(
            path=path,
            entries=[
                FileEntryInfo(
                    path=entry.path,
                    type=entry.type,  # type: ignore[arg-type]  # one of protocol.FILE_TYPES, checked there
                    size=entry.size,
                    mode=f"{entry.mode:04o}",
                    mtime=_stamp(entry.mtime),
                    target=entry.target,
                )
                for entry in listing.entries
            ],
            truncated=listing.truncated,
        )


def _decode_content(content: str, encoding: str) -> bytes:
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except ValueError:
            raise InvalidRequest("content is not valid base64 (encoding='base64')") from None
    return content.encode("utf-8", errors="surrogatepass")


def _parse_mode(mode: str | None) -> int | None:
    if mode is None:
        return None
    try:
        value = int(mode, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o7777:
        raise InvalidRequest(f"mode {mode[:16]!r} is not octal permission bits like '644' or '0755'")
    return value
