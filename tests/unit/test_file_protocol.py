"""The file tools' replies as the server decodes them: a lying supervisor gets bounded answers.

Like tests/unit/test_protocol.py, a fake supervisor answers on a real Unix socket;
each lie is an error of that one request, and a well-formed reply (the control) is accepted.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from nspawn_mcp.backend.jail import JailClient
from nspawn_mcp.errors import ExecFailed
from nspawn_mcp.sandbox import protocol
from tests.unit.test_protocol import Replier, fake, lines  # noqa: F401 - the fixture

pytestmark = pytest.mark.anyio

Fake = Callable[[Replier], JailClient]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


SLICE = {
    "binary": False,
    "data_b64": b64(b"one\ntwo\n"),
    "offset": 0,
    "next_offset": 2,
    "end": 8,
    "size": 20,
    "eof": False,
    "line_cut": False,
    "mode": 0o644,
    "mtime": 1.0,
}


async def test_a_well_formed_slice_is_accepted(fake: Fake) -> None:  # noqa: F811
    piece = await fake(lines(SLICE)).read_slice("/f", 0, None, 1024, "auto")
    assert (piece.data, piece.next_offset, piece.size) == (b"one\ntwo\n", 2, 20)


@pytest.mark.parametrize(
    ("name", "changes", "match"),
    [
        (
            "more data than asked",
            {"data_b64": b64(b"x\n" * 600), "next_offset": 600, "end": 1200},
            "data_b64",
        ),
        ("next offset not from the data", {"next_offset": 7}, "next offset"),
        ("another offset than asked", {"offset": 3}, "offset"),
        ("end beyond the size", {"end": 30}, "beyond the file"),
        ("end before the data", {"end": 2}, "end"),
        ("a cut line at the end", {"line_cut": True, "eof": True}, "cut line"),
        ("binary end not from the data", {"binary": True, "next_offset": 8, "end": 9}, "beyond the file"),
        ("mode out of range", {"mode": 1 << 20}, "mode"),
    ],
)
async def test_a_lying_slice_is_an_error_of_that_request(
    fake: Fake,  # noqa: F811
    name: str,
    changes: dict[str, Any],
    match: str,
) -> None:
    with anyio.fail_after(5), pytest.raises(ExecFailed, match=match):
        await fake(lines(SLICE | changes)).read_slice("/f", 0, None, 1024, "auto")


async def test_write_and_edit_replies_must_match_the_request(fake: Fake) -> None:  # noqa: F811
    written = await fake(lines({"size": 3, "mode": 0o600, "created": True})).write_file(
        "/f", b"abc", None, False
    )
    assert written.created
    assert written.mode == 0o600
    with pytest.raises(ExecFailed, match="size"):
        await fake(lines({"size": 4, "mode": 0o600, "created": True})).write_file("/f", b"abc", None, False)
    with pytest.raises(ExecFailed, match="replaced"):
        await fake(lines({"replaced": 5, "size": 3})).edit_file("/f", "a", "b", 1, 100)


def entry(**changes: Any) -> dict[str, Any]:
    return {"path": "a", "type": "file", "size": 1, "mode": 0o644, "mtime": 0.0, "target": None} | changes


async def test_listings_are_bounded_and_names_made_printable(fake: Fake) -> None:  # noqa: F811
    listing = await fake(lines({"entries": [entry(path="bad\x1b[2J\udcff")], "truncated": False})).list_files(
        "/", None, 1, 10
    )
    assert listing.entries[0].path == "bad?[2J?"
    too_many = {"entries": [entry()] * 11, "truncated": False}
    with pytest.raises(ExecFailed, match="at most 10"):
        await fake(lines(too_many)).list_files("/", None, 1, 10)
    for lie, match in (
        (entry(type="door"), "file type"),
        (entry(target="/etc"), "target"),
        (entry(path="x" * 5000), "path"),
    ):
        with pytest.raises(ExecFailed, match=match):
            await fake(lines({"entries": [lie], "truncated": False})).list_files("/", None, 1, 10)


def tree_entry(path: str, size: int = 0, kind: str = "file") -> dict[str, Any]:
    return {"event": "entry", "path": path, "type": kind, "mode": 0o644, "size": size}


DONE = {"files": 1, "directories": 0, "bytes": 2, "skipped": 0, "skipped_examples": []}


@pytest.mark.parametrize(
    ("name", "messages", "match"),
    [
        ("a parent reference", [tree_entry("../escape", 2)], "plain relative path"),
        ("an absolute path", [tree_entry("/etc/passwd", 2)], "plain relative path"),
        ("an empty component", [tree_entry("a//b", 2)], "plain relative path"),
        ("a symlink", [tree_entry("a", 0, "symlink")], "neither a file nor a directory"),
        (
            "more bytes than declared",
            [tree_entry("a", 1), {"event": "data", "data_b64": b64(b"xx")}],
            "declared",
        ),
        ("past the cap", [tree_entry("a", 1 << 20)], "size"),
        ("an entry before the bytes", [tree_entry("a", 2), tree_entry("b", 0)], "before the previous"),
        (
            "fewer bytes than declared",
            [tree_entry("a", 4), {"event": "data", "data_b64": b64(b"xx")}],
            "sizes",
        ),
    ],
)
async def test_a_lying_tree_stream_is_refused(
    fake: Fake,  # noqa: F811
    name: str,
    messages: list[dict[str, Any]],
    match: str,
) -> None:
    made: list[object] = []

    async def keep(item: object) -> None:
        made.append(item)

    with anyio.fail_after(5), pytest.raises(ExecFailed, match=match):
        await fake(lines(*messages, DONE | {"bytes": 4})).read_tree("/t", 1024, 10, keep, keep)


def test_relative_paths_of_trees() -> None:
    assert protocol.relative_path("a/b/..c") == ("a", "b", "..c")
    for bad in ("", ".", "a/./b", "a/../b", "/a", "a/", "a\x00b", "x" * 256):
        with pytest.raises(protocol.ProtocolError):
            protocol.relative_path(bad)
