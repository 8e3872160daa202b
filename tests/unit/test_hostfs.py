"""Host-side confinement of copies, on a real filesystem: symlinks, FIFOs, sizes, atomicity."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nspawn_mcp.errors import CopyRefused, NotFound, PolicyRefused
from nspawn_mcp.hostfs import Publication, stage_from_host, staging_area
from nspawn_mcp.policy import HostTarget


@pytest.fixture
def root(tmp_path: Path) -> Path:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "secret").write_text("host secret")
    return allowed


@pytest.fixture
def area(tmp_path: Path) -> Path:
    staging = tmp_path / "staging"
    staging.mkdir()
    return staging


def target(root: Path, relative: str) -> HostTarget:
    return HostTarget(root=str(root), relative=relative)


def stage(root: Path, area: Path, relative: str, limit: int = 1 << 20) -> bytes:
    with staging_area(area) as scratch:
        staged, stats = stage_from_host(target(root, relative), scratch, limit)
        assert stats.bytes == staged.stat().st_size
        return staged.read_bytes()


def test_regular_files_and_symlinks_that_stay_inside_are_staged(root: Path, area: Path) -> None:
    (root / "sub").mkdir()
    (root / "sub" / "data").write_text("ok")
    (root / "inner-link").symlink_to("sub/data")
    assert stage(root, area, "sub/data") == b"ok"
    assert stage(root, area, "inner-link") == b"ok"
    assert list(area.iterdir()) == []


@pytest.mark.parametrize("link", ["../secret", "/etc/shadow", "/proc/self/root/etc/shadow"])
def test_symlinks_that_leave_the_root_are_refused_naming_the_copy_rule(
    root: Path, area: Path, link: str
) -> None:
    (root / "escape").symlink_to(link)
    with pytest.raises(PolicyRefused, match=r"leads outside") as caught:
        stage(root, area, "escape")
    assert caught.value.rule == "files.allowed_host_dirs"


def test_an_allowed_root_that_resolves_into_a_protected_place_is_refused_naming_the_copy_rule(
    tmp_path: Path, area: Path
) -> None:
    (tmp_path / "etc-link").symlink_to("/etc")
    with pytest.raises(PolicyRefused, match=r"protected location") as caught:
        stage(tmp_path / "etc-link", area, "hostname")
    assert caught.value.rule == "files.allowed_host_dirs"


def test_a_symlinked_directory_that_leaves_the_root_is_refused(
    root: Path, area: Path, tmp_path: Path
) -> None:
    (root / "dir").symlink_to(tmp_path)
    with pytest.raises(PolicyRefused, match=r"leads outside"):
        stage(root, area, "dir/secret")


def test_fifos_devices_and_directories_are_refused_without_hanging(root: Path, area: Path) -> None:
    os.mkfifo(root / "fifo")
    (root / "dir").mkdir()
    with pytest.raises(CopyRefused, match=r"not a regular file"):
        stage(root, area, "fifo")
    with pytest.raises(CopyRefused, match=r"directory"):
        stage(root, area, "dir")
    with pytest.raises(NotFound, match=r"does not exist"):
        stage(root, area, "missing")


def test_files_over_the_size_cap_are_refused(root: Path, area: Path) -> None:
    (root / "big").write_bytes(b"x" * 2048)
    with pytest.raises(CopyRefused, match=r"limit of 1024 bytes"):
        stage(root, area, "big", limit=1024)
    assert list(area.iterdir()) == []


def publish(root: Path, relative: str, data: bytes, *, mode: int = 0o644, limit: int = 1 << 20) -> None:
    publication = Publication(target(root, relative), limit, "sandbox path /x")
    try:
        publication.write(data)
        publication.publish(mode)
    finally:
        publication.discard()


def test_published_files_replace_atomically_and_lose_setuid(root: Path) -> None:
    (root / "dest").write_bytes(b"old")
    publication = Publication(target(root, "dest"), 1 << 20, "sandbox path /x")
    try:
        publication.write(b"new")
        assert (root / "dest").read_bytes() == b"old"  # nothing is visible before it is complete
        assert [p.name for p in root.iterdir()] == ["dest"]
        stats = publication.publish(0o4755)
    finally:
        publication.discard()
    assert (root / "dest").read_bytes() == b"new"
    assert stats.bytes == 3
    assert stat.S_IMODE((root / "dest").stat().st_mode) == 0o755
    assert [p.name for p in root.iterdir()] == ["dest"]


def test_publishing_over_a_symlink_replaces_the_link_not_its_target(root: Path, tmp_path: Path) -> None:
    (root / "dest").symlink_to(tmp_path / "secret")
    publish(root, "dest", b"new")
    assert (tmp_path / "secret").read_text() == "host secret"
    assert not (root / "dest").is_symlink()


def test_publishing_through_an_escaping_directory_is_refused(root: Path, tmp_path: Path) -> None:
    (root / "out").symlink_to(tmp_path)
    with pytest.raises(PolicyRefused, match=r"leads outside"):
        publish(root, "out/secret", b"new")
    assert (tmp_path / "secret").read_text() == "host secret"


def test_oversized_or_abandoned_output_leaves_nothing_behind(root: Path) -> None:
    with pytest.raises(CopyRefused, match=r"limit"):
        publish(root, "dest", b"x" * 4096, limit=1024)
    abandoned = Publication(target(root, "dest"), 1 << 20, "sandbox path /x")
    abandoned.write(b"half a file")
    abandoned.discard()  # a cancelled copy
    assert list(root.iterdir()) == []
