"""The supervisor's file operations: read, write, edit and list files, and copy trees, as root here.

Runs inside the jail, as part of the supervisor (same process, same seccomp
filter, capabilities, cgroup and mount view), so every path is resolved by the
sandbox's own kernel view: a symlink the sandbox planted, even one aimed at
``/proc/1/root`` or a host path, leads only to the sandbox's own files (or
fails). Nothing here needs to defend the host; it must only do what it is asked,
within the bounds it is given, and never leave half a file behind.

Writes are atomic: the new content goes to a hidden temporary file in the same
directory, is flushed (``fsync``) and renamed over the old file, so a reader
sees the old file or the new one, never a part, and a failed write (a full disk,
a quota) leaves the old file as it was.

Standard library only, importable by Python 3.9 (it runs with the image's
``python3``), like the supervisor and the protocol.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import fnmatch
import json
import os
import secrets
import socket
import stat
import tarfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import protocol
else:
    try:  # imported from the package (tests, type checking)
        from . import protocol
    except ImportError:  # inside a sandbox: protocol.py lies next to this file
        import protocol

__all__ = ["OPERATIONS", "STREAMING", "RequestError"]

_SNIFF = 8192
_CHUNK = 1 << 20
_SCAN_LIMIT = 200_000
"""The most directory entries one listing looks at (a pattern that matches little in a huge tree)."""


RequestError = protocol.RequestError


# -- request fields --------------------------------------------------------------


def _path(request: dict[str, Any], name: str = "path") -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value.startswith("/") or "\x00" in value:
        raise RequestError("bad_request", f"{name} must be an absolute path")
    return value


def _number(request: dict[str, Any], name: str, default: int | None = None) -> int:
    value = request.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RequestError("bad_request", f"{name} must be a non-negative integer")
    return value


# -- errors as the agent reads them ------------------------------------------------


def _os_error(exc: OSError, path: str, doing: str) -> RequestError:
    number = exc.errno or 0
    if number == errno.ENOENT:
        return RequestError("no_such_file", f"{path} does not exist in the sandbox")
    if number in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RequestError("permission_denied", f"cannot {doing} {path}: {os.strerror(number)}")
    if number == errno.ENOTDIR:
        return RequestError("no_such_file", f"a component of {path} is not a directory")
    if number == errno.EISDIR:
        return RequestError("not_regular", f"{path} is a directory")
    if number == errno.ELOOP:
        return RequestError("no_such_file", f"{path} has too many levels of symbolic links")
    return RequestError("io_error", f"cannot {doing} {path}: {os.strerror(number)}")


def _open_regular(path: str, limit: int | None = None) -> tuple[int, os.stat_result]:
    """``path`` opened for reading (symlinks followed, inside the jail), if it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise _os_error(exc, path, "open") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (device, FIFO or socket)"
        raise RequestError("not_regular", f"{path} is {kind}")
    if limit is not None and info.st_size > limit:
        os.close(fd)
        raise RequestError("too_large", f"{path} is {info.st_size} bytes, more than the limit of {limit}")
    os.set_blocking(fd, True)
    return fd, info


def _read_all(fd: int, limit: int, path: str) -> bytes:
    data = bytearray()
    while chunk := os.read(fd, _CHUNK):
        data += chunk
        if len(data) > limit:
            raise RequestError("too_large", f"{path} grew past the limit of {limit} bytes while it was read")
    return bytes(data)


# -- read_slice --------------------------------------------------------------------


def _looks_binary(head: bytes, whole: bool) -> bool:
    """NUL bytes or invalid UTF-8 in the first bytes (a character cut at their end is fine)."""
    if b"\x00" in head:
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=whole)
    except UnicodeDecodeError:
        return True
    return False


def _skip_lines(fd: int, count: int) -> tuple[int, int, bytes]:
    """Read past ``count`` lines: (lines skipped, byte position after them, bytes read beyond it)."""
    skipped, position = 0, 0
    while skipped < count:
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            return skipped, position, b""
        start = 0
        while skipped < count:
            newline = chunk.find(b"\n", start)
            if newline < 0:
                break
            skipped += 1
            start = newline + 1
        if skipped == count:
            return skipped, position + start, chunk[start:]
        position += len(chunk)
    return skipped, position, b""


def op_read_slice(request: dict[str, Any]) -> dict[str, Any]:
    """A piece of a regular file: whole lines of text, or bytes of a binary file."""
    path = _path(request)
    offset = _number(request, "offset", 0)
    limit = request.get("limit")
    max_bytes = _number(request, "max_bytes")
    encoding = request.get("encoding", "auto")
    if limit is not None:
        limit = _number(request, "limit")
    fd, info = _open_regular(path)
    try:
        head = os.pread(fd, _SNIFF, 0)
        binary = encoding == "base64" or (encoding == "auto" and _looks_binary(head, len(head) < _SNIFF))
        if binary:
            want = max_bytes if limit is None else min(limit, max_bytes)
            data = os.pread(fd, want, offset)
            end = offset + len(data)
            size = max(info.st_size, end)
            return protocol.FileSlice(
                binary=True,
                data=data,
                offset=offset,
                next_offset=end,
                end=end,
                size=size,
                eof=end >= size,
                line_cut=False,
                mode=stat.S_IMODE(info.st_mode),
                mtime=info.st_mtime,
            ).to_wire()
        skipped, start, pending = _skip_lines(fd, offset)
        buffer = bytearray(pending)
        lines_wanted = limit if limit is not None else 1 << 62
        exhausted = skipped < offset
        while not exhausted and len(buffer) <= max_bytes and buffer.count(b"\n") < lines_wanted:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                exhausted = True
                break
            buffer += chunk
        # whole lines only: up to the limit of lines, and within max_bytes
        window = bytes(buffer[:max_bytes])
        if limit is None:
            cut = window.rfind(b"\n") + 1
        else:
            cut = 0
            for _ in range(limit):
                newline = window.find(b"\n", cut)
                if newline < 0:
                    break
                cut = newline + 1
        line_cut = False
        lines = buffer.count(b"\n", 0, cut)
        if lines < lines_wanted and cut < len(buffer):
            rest = len(buffer) - cut
            if exhausted and rest <= max_bytes - cut and b"\n" not in buffer[cut:]:
                cut = len(buffer)  # the last line, without a newline
            elif cut == 0:
                cut, line_cut = max_bytes, True  # one line longer than max_bytes: its start
        piece = bytes(buffer[:cut])
        end = start + len(piece)
        size = max(info.st_size, end)
        eof = not line_cut and end >= size
        return protocol.FileSlice(
            binary=False,
            data=piece,
            offset=offset,
            next_offset=offset + protocol.text_lines(piece),
            end=end,
            size=size,
            eof=eof,
            line_cut=line_cut,
            mode=stat.S_IMODE(info.st_mode),
            mtime=info.st_mtime,
        ).to_wire()
    except OSError as exc:
        raise _os_error(exc, path, "read") from None
    finally:
        os.close(fd)


# -- atomic writes -----------------------------------------------------------------


def _replace_atomically(target: str, data: bytes, mode: int | None, like: os.stat_result | None) -> int:
    """Put ``data`` at ``target`` in one rename: a reader sees the old file or the new, never a part.

    The new file keeps the old one's owner and permissions (``mode`` overrides them);
    on any failure the temporary file is removed and the old file is untouched.
    """
    directory, name = os.path.split(target)
    temporary = os.path.join(directory, f".{name[:200]}.nspawn-mcp-{secrets.token_hex(4)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view[:_CHUNK]) :]
            if like is not None:
                os.fchown(fd, like.st_uid, like.st_gid)
            final = mode if mode is not None else (stat.S_IMODE(like.st_mode) if like is not None else 0o644)
            os.fchmod(fd, final)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):
        directory_fd = os.open(directory or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    return final


def _existing(target: str, path: str) -> os.stat_result | None:
    try:
        info = os.stat(target)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _os_error(exc, path, "write") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (device, FIFO or socket)"
        raise RequestError("not_regular", f"{path} is {kind}; only regular files are written")
    return info


def op_write_file(request: dict[str, Any]) -> dict[str, Any]:
    path = _path(request)
    data = protocol._data(request, "data_b64", protocol.MAX_REQUEST_BYTES)
    mode = request.get("mode")
    if mode is not None and (not isinstance(mode, int) or not 0 <= mode <= 0o7777):
        raise RequestError("bad_request", "mode must be between 0 and 0o7777")
    if path.endswith("/"):
        raise RequestError("bad_request", f"{path} names a directory; give a file name")
    target = os.path.realpath(
        path
    )  # symlinks followed inside the jail: they lead only to the sandbox's files
    try:
        if request.get("make_parents"):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        like = _existing(target, path)
        final = _replace_atomically(target, data, mode, like)
    except OSError as exc:
        raise _os_error(exc, path, "write") from None
    return protocol.FileWritten(size=len(data), mode=final, created=like is None).to_wire()


def op_edit_file(request: dict[str, Any]) -> dict[str, Any]:
    """Replace exactly ``count`` occurrences of ``old`` with ``new``; refuse any other number of matches."""
    path = _path(request)
    old, new = request.get("old"), request.get("new")
    count, max_bytes = _number(request, "count", 1), _number(request, "max_bytes")
    if not isinstance(old, str) or not isinstance(new, str) or not old:
        raise RequestError("bad_request", "old must be a non-empty string and new a string")
    target = os.path.realpath(path)
    fd, info = _open_regular(target, max_bytes)
    try:
        content = _read_all(fd, max_bytes, path)
    finally:
        os.close(fd)
    before, after = old.encode("utf-8", "surrogatepass"), new.encode("utf-8", "surrogatepass")
    found = content.count(before)
    if found == 0:
        raise RequestError("no_match", f"the text to replace was not found in {path}; nothing was changed")
    if found != count:
        raise RequestError(
            "ambiguous",
            f"the text to replace occurs {found} times in {path}, not {count}; nothing was changed: include "
            f"more surrounding text to make it unique, or pass count={found} to replace every occurrence",
        )
    edited = content.replace(before, after)
    if len(edited) > max_bytes:
        raise RequestError(
            "too_large", f"{path} would be {len(edited)} bytes, more than the limit of {max_bytes}"
        )
    try:
        _replace_atomically(target, edited, None, info)
    except OSError as exc:
        raise _os_error(exc, path, "write") from None
    return protocol.FileEdited(replaced=found, size=len(edited)).to_wire()


# -- listings --------------------------------------------------------------------------


def _type_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "char_device"),
        (stat.S_ISBLK, "block_device"),
    ):
        if test(mode):
            return name
    return "other"


def _shown(name: str) -> str:
    """A name as JSON can carry it (bytes that are not UTF-8 as backslash escapes)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _walk(top: str, depth: int) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """(relative path, entry) of everything under ``top`` down to ``depth`` levels, never following links."""
    pending = [("", top, 1)]
    while pending:
        relative, directory, level = pending.pop(0)
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError:
            continue  # unreadable below the top: listed, not entered
        for entry in entries:
            path = relative + entry.name
            yield path, entry
            if level < depth and entry.is_dir(follow_symlinks=False):
                pending.append((path + "/", entry.path, level + 1))


def op_list_files(request: dict[str, Any]) -> dict[str, Any]:
    path = _path(request)
    depth = max(1, _number(request, "depth", 1))
    max_entries = min(_number(request, "max_entries"), protocol.MAX_LIST_ENTRIES)
    pattern = request.get("pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise RequestError("bad_request", "pattern must be a string")
    try:
        top = os.stat(path)  # the path asked for is followed (inside the jail); nothing below it is
    except OSError as exc:
        raise _os_error(exc, path, "list") from None
    if not stat.S_ISDIR(top.st_mode):
        raise RequestError("not_regular", f"{path} is not a directory")
    entries: list[protocol.FileEntry] = []
    budget = protocol.LIST_REPLY_BYTES - 1024
    truncated = False
    for scanned, (relative, entry) in enumerate(_walk(path, depth)):
        if scanned >= _SCAN_LIMIT:
            truncated = True
            break
        if pattern is not None and not fnmatch.fnmatchcase(entry.name, pattern):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # gone meanwhile
        kind = _type_of(info.st_mode)
        target = None
        if kind == "symlink":
            with contextlib.suppress(OSError):
                target = _shown(os.readlink(entry.path))[: protocol.MAX_PATH_CHARS]
        item = protocol.FileEntry(
            path=_shown(relative)[: protocol.MAX_PATH_CHARS],
            type=kind,
            size=info.st_size,
            mode=stat.S_IMODE(info.st_mode),
            mtime=info.st_mtime,
            target=target,
        )
        budget -= len(json.dumps(item.to_wire())) + 1
        if len(entries) >= max_entries or budget < 0:
            truncated = True
            break
        entries.append(item)
    return protocol.FileListing(entries=tuple(entries), truncated=truncated).to_wire()


# -- trees -------------------------------------------------------------------------------


def _tree(top: str, max_entries: int) -> tuple[list[tuple[str, str, os.stat_result]], list[str], int]:
    """The directories and regular files under ``top`` (parents first), and what is left out.

    Returns (entries as (relative path, absolute path, stat), examples of skipped paths,
    number skipped). Symlinks, devices, FIFOs and sockets are skipped, never followed.
    """
    found: list[tuple[str, str, os.stat_result]] = []
    skipped: list[str] = []
    skipped_count = 0
    pending = [("", top)]
    while pending:
        relative, directory = pending.pop()
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as exc:
            raise _os_error(exc, os.path.join(top, relative), "read") from None
        for entry in entries:
            path = relative + entry.name
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
                if len(found) >= max_entries:
                    raise RequestError("too_large", f"{top} holds more than {max_entries} entries")
                found.append((path, entry.path, info))
                if stat.S_ISDIR(info.st_mode):
                    pending.append((path + "/", entry.path))
            else:
                skipped_count += 1
                if len(skipped) < 20:
                    skipped.append(_shown(path)[:256] + f" ({_type_of(info.st_mode)})")
    return found, skipped, skipped_count


def op_read_tree(conn: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
    """Stream a directory: each directory and regular file as an entry, a file's bytes after it.

    Sizes are summed before a byte is sent (the cap refuses at once); a file that
    changes size while it is read ends the request.
    """
    path = _path(request)
    max_bytes, max_entries = _number(request, "max_bytes"), _number(request, "max_entries")
    try:
        top = os.stat(path)
    except OSError as exc:
        raise _os_error(exc, path, "read") from None
    if not stat.S_ISDIR(top.st_mode):
        raise RequestError("not_regular", f"{path} is not a directory")
    found, skipped, skipped_count = _tree(path, max_entries)
    total = sum(info.st_size for _, _, info in found if stat.S_ISREG(info.st_mode))
    if total > max_bytes:
        raise RequestError(
            "too_large", f"{path} holds {total} bytes of files, more than the limit of {max_bytes}"
        )
    files = directories = sent = 0
    for relative, absolute, info in found:
        name = relative  # names that are not UTF-8 travel as surrogate escapes
        if stat.S_ISDIR(info.st_mode):
            directories += 1
            _send(conn, protocol.TreeEntry(name, True, stat.S_IMODE(info.st_mode), 0).to_wire())
            continue
        fd, now = _open_regular(absolute)
        try:
            size = now.st_size
            _send(conn, protocol.TreeEntry(name, False, stat.S_IMODE(now.st_mode), size).to_wire())
            left = size
            while left:
                chunk = os.read(fd, min(left, protocol.FILE_CHUNK))
                if not chunk:
                    raise RequestError("io_error", f"{absolute} shrank while it was read")
                left -= len(chunk)
                _send(conn, protocol.FileChunk(chunk).to_wire())
        finally:
            os.close(fd)
        files += 1
        sent += size
        if sent > max_bytes:
            raise RequestError(
                "too_large", f"{path} grew past the limit of {max_bytes} bytes while it was read"
            )
    return protocol.TreeRead(files, directories, sent, skipped_count, tuple(skipped)).to_wire()


def op_extract_tar(request: dict[str, Any]) -> dict[str, Any]:
    """Unpack an archive the server copied in (regular files and directories) under ``destination``.

    The archive is removed first thing; the server built it from the host's tree, and
    anything in it lands inside the jail anyway.
    """
    archive, destination = _path(request, "archive"), _path(request, "destination")
    max_bytes = _number(request, "max_bytes")
    try:
        source = open(archive, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise _os_error(exc, archive, "open") from None
    with source:
        os.unlink(archive)
        files = directories = total = 0
        try:
            os.makedirs(destination, exist_ok=True)
            with tarfile.open(fileobj=source, mode="r:") as tar:
                members = []
                for member in tar:
                    if not (member.isreg() or member.isdir()):
                        continue
                    if member.name.startswith("/") or ".." in member.name.split("/"):
                        raise RequestError(
                            "bad_request", f"archive member {member.name[:256]!r} leaves the tree"
                        )
                    total += member.size if member.isreg() else 0
                    if total > max_bytes:
                        raise RequestError("too_large", f"the files add up to more than {max_bytes} bytes")
                    members.append(member)
                    files += member.isreg()
                    directories += member.isdir()
                tar.extractall(destination, members=members)  # noqa: S202 - inside the jail, from our archive
        except OSError as exc:
            raise _os_error(exc, destination, "write") from None
    return protocol.TreeWritten(files=files, directories=directories, bytes=total).to_wire()


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(protocol.encode(message))


OPERATIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "read_slice": op_read_slice,
    "write_file": op_write_file,
    "edit_file": op_edit_file,
    "list_files": op_list_files,
    "extract_tar": op_extract_tar,
}
STREAMING: dict[str, Callable[[socket.socket, dict[str, Any]], dict[str, Any]]] = {
    "read_tree": op_read_tree,
}
