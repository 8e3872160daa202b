"""The image catalog: what set-up recorded about each image, read back by the daemon."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from nspawn_mcp.errors import InvalidRequest
from nspawn_mcp.images import Catalog, ImageEntry, parse_image_name


def _entry(name: str = "python", version: str = "1") -> ImageEntry:
    return ImageEntry(
        name=name,
        description="Debian with build tools",
        source="recipe",
        origin="/etc/nspawn-mcp/images/python.toml",
        version=version,
        built_at=datetime(2026, 11, 24, tzinfo=UTC),
        build_seconds=42.5,
        packages=("build-essential",),
        os_release={"ID": "debian", "VERSION_ID": "12"},
        env={"PIP_NO_CACHE_DIR": "1"},
    )


def test_an_entry_reads_back_as_written_and_a_new_version_replaces_it(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "images")
    catalog.put(_entry(version="1"))
    catalog.put(_entry(version="2"))

    assert catalog.get("python") == _entry(version="2")
    assert [entry.name for entry in catalog.entries()] == ["python"]
    assert not list((tmp_path / "images").glob(".*"))  # no temporary file left


def test_damaged_or_unknown_entries_read_as_absent(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"name": "other"}')
    catalog.put(_entry("node"))

    assert catalog.get("broken") is None
    assert catalog.get("missing") is None
    assert catalog.get("../etc/passwd") is None
    assert [entry.name for entry in catalog.entries()] == ["node"]


@pytest.mark.parametrize("name", ["default", "python3", "my-tools", "a" * 32])
def test_image_names_that_are_allowed(name: str) -> None:
    assert parse_image_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", "Python", "a/b", "..", "a" * 33, "x y"])
def test_image_names_that_are_refused_say_what_names_look_like(name: str) -> None:
    with pytest.raises(InvalidRequest, match="lower-case letters, digits and dashes"):
        parse_image_name(name)
