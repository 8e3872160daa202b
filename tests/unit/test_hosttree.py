"""Host-side directory trees of copy_file, on a real filesystem: what a hostile tree can and cannot do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nspawn_mcp.errors import CopyRefused, PolicyRefused, TooLarge
from nspawn_mcp.hostfs import staging_area
from nspawn_mcp.hosttree import TreePublication, stage_tree_from_host
from nspawn_mcp.policy import HostTarget
from nspawn_mcp.sandbox.protocol import TreeEntry


@pytest.fixture
def root(tmp_path: Path) -> Path:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "secret").write_text("host secret")
    return allowed


def target(root: Path, relative: str) -> HostTarget:
    return HostTarget(root=str(root), relative=relative)


def build(root: Path, relative: str, *steps: TreeEntry | bytes, limit: int = 1 << 20) -> None:
    publication = TreePublication(target(root, relative), limit)
    try:
        for step in steps:
            if isinstance(step, TreeEntry):
                publication.add(step)
            else:
                publication.write(step)
        publication.publish()
    finally:
        publication.discard()


def directory(path: str) -> TreeEntry:
    return TreeEntry(path, True, 0o755, 0)


def file(path: str, data: bytes, mode: int = 0o644) -> tuple[TreeEntry, bytes]:
    return TreeEntry(path, False, mode, len(data)), data


def test_a_tree_is_built_and_appears_whole(root: Path) -> None:
    build(root, "out", directory("d"), *file("d/f", b"data", 0o4755), *file("top", b""))
    assert (root / "out/d/f").read_bytes() == b"data"
    assert (root / "out/d/f").stat().st_mode & 0o7777 == 0o755  # no setuid on the host
    assert sorted(os.listdir(root)) == ["out"]


@pytest.mark.parametrize(
    ("name", "steps"),
    [
        ("a file before its directory", [*file("missing/f", b"x")]),
        ("an entry twice", [*file("f", b"x"), *file("f", b"y")]),
        ("more bytes than declared", [TreeEntry("f", False, 0o644, 1), b"xy"]),
        ("a new entry mid-file", [TreeEntry("f", False, 0o644, 2), b"x", directory("d")]),
        ("the end mid-file", [TreeEntry("f", False, 0o644, 2), b"x"]),
        ("a name the host cannot hold", [*file("\ud800", b"x")]),
    ],
)
def test_a_broken_tree_leaves_nothing(root: Path, name: str, steps: list[TreeEntry | bytes]) -> None:
    with pytest.raises(CopyRefused):
        build(root, "out", *steps)
    assert os.listdir(root) == []


def test_the_cap_holds_across_files(root: Path) -> None:
    with pytest.raises(TooLarge):
        build(root, "out", *file("a", b"x" * 600), *file("b", b"x" * 600), limit=1000)
    assert os.listdir(root) == []


def test_the_destination_never_leads_out_or_replaces(root: Path, tmp_path: Path) -> None:
    (root / "exists").mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(CopyRefused, match="already exists"):
        build(root, "exists", *file("f", b"x"))
    with pytest.raises(PolicyRefused, match="leads outside"):
        build(root, "link/out", *file("f", b"x"))
    with pytest.raises(PolicyRefused, match="leads outside"):
        build(root, "../out", *file("f", b"x"))
    assert sorted(os.listdir(root)) == ["exists", "link"]
    assert os.listdir(root / "exists") == []
    assert sorted(os.listdir(tmp_path)) == ["allowed", "secret"]


def test_a_host_tree_is_archived_without_its_links_or_devices(root: Path, tmp_path: Path) -> None:
    (root / "tree/sub").mkdir(parents=True)
    (root / "tree/sub/f").write_text("inside")
    (root / "tree/etc").symlink_to("/etc")
    (root / "tree/up").symlink_to(tmp_path)
    os.mkfifo(root / "tree/fifo")
    area = tmp_path / "staging"
    area.mkdir()
    with staging_area(area) as staged:
        archive, stats = stage_tree_from_host(target(root, "tree"), staged, 1 << 20)
        import tarfile

        with tarfile.open(archive) as tar:
            assert sorted(tar.getnames()) == ["sub", "sub/f"]
    assert (stats.files, stats.directories, stats.skipped) == (1, 2, 3)
    assert sorted(stats.skipped_examples) == ["etc (symlink)", "fifo (fifo)", "up (symlink)"]
    with staging_area(area) as staged, pytest.raises(TooLarge, match=r"files\.max_copy_bytes"):
        stage_tree_from_host(target(root, "tree"), staged, 3)
