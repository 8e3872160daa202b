"""What set-up recorded about each image it built or imported: one JSON file per image.

The catalog lives in the state directory (``<state>/images/<name>.json``), next to the
build logs, and is written only by set-up (``nspawn-mcp setup``, ``image build``,
``image import``), always after the template it describes is in place. The daemon only
reads it. machined stays the authority on which images exist: an entry without a
template describes nothing, and a template without an entry is still usable (listed
with what machined knows).
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InvalidRequest

__all__ = ["IMAGE_NAME", "Catalog", "ImageEntry", "ImageSource", "parse_image_name"]

IMAGE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
"""What an image name looks like (``default``, ``python``, ``my-tools``); use ``fullmatch``."""

ImageSource = Literal["recipe", "import", "snapshot"]


def parse_image_name(value: str) -> str:
    """Validate an image name an agent or operator gave; the message says what names look like."""
    if not IMAGE_NAME.fullmatch(value):
        shown = value[:40].encode("unicode_escape").decode()
        raise InvalidRequest(
            f"invalid image name {shown!r}: names are 1-32 lower-case letters, digits and dashes, "
            "starting with a letter or digit"
        )
    return value


class ImageEntry(BaseModel):
    """One image as set-up made it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=IMAGE_NAME.pattern)
    description: str = Field(default="", max_length=500)
    source: ImageSource
    origin: str = Field(max_length=4096, description="the recipe file, or the file it was imported from")
    version: str = Field(max_length=64, description="changes with every build or import of this name")
    built_at: datetime
    build_seconds: float = Field(ge=0)
    packages: tuple[str, ...] = Field(default=(), description="packages the recipe asked for")
    os_release: dict[str, str] = Field(default_factory=dict, description="the image's /etc/os-release")
    env: dict[str, str] = Field(
        default_factory=dict, description="environment every command in its sandboxes starts with"
    )
    policy: str | None = Field(
        default=None,
        max_length=64,
        description="a snapshot kept as an image: the one policy that may start from it (it kept it)",
    )
    owner: str | None = Field(
        default=None,
        max_length=256,
        description="a snapshot kept as an image: the client identity that kept it, the only one that "
        "may start from it unless its policy is shared",
    )


class Catalog:
    """The catalog directory. Reads never raise on a damaged file: it is skipped (and says so)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, name: str) -> Path:
        return self.directory / f"{parse_image_name(name)}.json"

    def log_path(self, name: str) -> Path:
        """Where the newest build or import of ``name`` logged what it did."""
        return self.directory / f"{parse_image_name(name)}.log"

    def get(self, name: str) -> ImageEntry | None:
        try:
            text = self._path(name).read_text()
        except (FileNotFoundError, InvalidRequest):
            return None
        try:
            return ImageEntry.model_validate(json.loads(text))
        except (ValueError, ValidationError):
            return None

    def entries(self) -> list[ImageEntry]:
        if not self.directory.is_dir():
            return []
        found = (self.get(path.stem) for path in sorted(self.directory.glob("*.json")))
        return [entry for entry in found if entry is not None]

    def put(self, entry: ImageEntry) -> None:
        """Record ``entry`` atomically (a reader sees the old entry or the new one, never half)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self._path(entry.name)
        temporary = target.with_name(f".{target.name}.tmp")
        with temporary.open("w") as file:
            file.write(entry.model_dump_json(indent=2))
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(target)

    def remove(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)
