"""The supervisor's file operations, against the real supervisor process on the host (no root needed).

Inside a sandbox the jail confines paths; here the same code runs on a temporary
directory, which exercises paging, atomic replacement and listings exactly.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nspawn_mcp.backend.jail import JailClient
from nspawn_mcp.backend.units import supervisor_command
from nspawn_mcp.errors import CopyRefused, TooLarge
from tests.waiting import wait_until

pytestmark = pytest.mark.anyio

SUPERVISOR_DIR = Path(__file__).parents[2] / "server/nspawn_mcp/sandbox"
FILE_SIZE_LIMIT = 1 << 20


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    """A supervisor that may write files of at most 1 MiB (RLIMIT_FSIZE): writes past it fail."""
    path = tmp_path / "exec.sock"

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))

    command = supervisor_command(str(SUPERVISOR_DIR), str(path), python=sys.executable)
    process = subprocess.Popen(command, preexec_fn=limit_file_size)
    try:
        yield path
    finally:
        process.kill()
        process.wait()


@pytest.fixture
async def jail(socket_path: Path) -> JailClient:
    await wait_until(socket_path.exists, what="the supervisor's socket")
    return JailClient(socket_path)


async def test_text_is_paged_in_whole_lines_and_a_long_line_is_cut(jail: JailClient, tmp_path: Path) -> None:
    text = tmp_path / "t"
    text.write_bytes(b"a\nbb\nccc\nno newline")
    first = await jail.read_slice(str(text), 0, None, 6, "auto")
    assert (first.data, first.next_offset, first.end, first.eof) == (b"a\nbb\n", 2, 5, False)
    rest = await jail.read_slice(str(text), 2, None, 100, "auto")
    assert (rest.data, rest.next_offset, rest.eof) == (b"ccc\nno newline", 4, True)
    long = await jail.read_slice(str(text), 3, None, 4, "auto")
    assert (long.data, long.line_cut, long.next_offset, long.end) == (b"no n", True, 4, 13)
    past = await jail.read_slice(str(text), 10, None, 100, "auto")
    assert (past.data, past.eof) == (b"", True)
    binary = await jail.read_slice(str(text), 2, 3, 100, "base64")
    assert (binary.binary, binary.data, binary.next_offset) == (True, b"bb\n"[:3], 5)


async def test_binary_is_detected(jail: JailClient, tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(b"\x7fELF\x00\x01")
    (tmp_path / "latin1").write_bytes("café".encode("latin-1"))
    (tmp_path / "utf8").write_bytes("café".encode())
    kinds = [
        (await jail.read_slice(str(tmp_path / n), 0, None, 100, "auto")).binary
        for n in ("b", "latin1", "utf8")
    ]
    assert kinds == [True, True, False]


async def test_a_failed_write_leaves_the_old_file_and_no_temporary(jail: JailClient, tmp_path: Path) -> None:
    target = tmp_path / "keep"
    target.write_bytes(b"old")
    target.chmod(0o640)
    with pytest.raises(CopyRefused, match=rf"cannot write {target}: File too large"):
        await jail.write_file(str(target), b"x" * (FILE_SIZE_LIMIT + 1), None, False)
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["exec.sock", "keep"]
    done = await jail.write_file(str(target), b"new", None, False)  # the control: a write that fits
    assert (target.read_bytes(), done.mode, done.created) == (b"new", 0o640, False)


async def test_writes_follow_links_and_refuse_what_is_not_a_file(jail: JailClient, tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"1")
    (tmp_path / "link").symlink_to("real")
    await jail.write_file(str(tmp_path / "link"), b"2", None, False)
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "real").read_bytes() == b"2"
    with pytest.raises(CopyRefused, match="is a directory"):
        await jail.write_file(str(tmp_path), b"x", None, False)
    with pytest.raises(CopyRefused, match="does not exist"):
        await jail.write_file(str(tmp_path / "no/such/dir/f"), b"x", None, False)
    await jail.write_file(str(tmp_path / "no/such/dir/f"), b"x", 0o700, True)
    assert (tmp_path / "no/such/dir/f").stat().st_mode & 0o777 == 0o700


async def test_edits_are_exact_and_capped(jail: JailClient, tmp_path: Path) -> None:
    target = tmp_path / "e"
    target.write_bytes(b"x = 1\ny = 1\n")
    with pytest.raises(CopyRefused, match="occurs 2 times"):
        await jail.edit_file(str(target), "= 1", "= 2", 1, 100)
    assert (await jail.edit_file(str(target), "= 1", "= 2", 2, 100)).replaced == 2
    assert target.read_bytes() == b"x = 2\ny = 2\n"
    with pytest.raises(TooLarge):
        await jail.edit_file(str(target), "x", "x" * 200, 1, 100)
    assert target.read_bytes() == b"x = 2\ny = 2\n"


async def test_listings_never_follow_links_and_are_bounded(jail: JailClient, tmp_path: Path) -> None:
    (tmp_path / "d/e").mkdir(parents=True)
    (tmp_path / "d/e/f.py").write_text("")
    (tmp_path / "d/loop").symlink_to(tmp_path)
    listing = await jail.list_files(str(tmp_path / "d"), None, 10, 100)
    assert [(e.path, e.type, e.target) for e in listing.entries] == [
        ("e", "directory", None),
        ("loop", "symlink", str(tmp_path)),
        ("e/f.py", "file", None),
    ]
    assert [e.path for e in (await jail.list_files(str(tmp_path / "d"), "*.py", 10, 100)).entries] == [
        "e/f.py"
    ]
    capped = await jail.list_files(str(tmp_path / "d"), None, 10, 1)
    assert len(capped.entries) == 1
    assert capped.truncated
