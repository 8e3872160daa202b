"""Image recipes: what an operator writes to say how an image is built (pure: models and lookup).

A recipe is a TOML file ``<name>.toml`` in the operator's recipe directory (``--image-dir``,
``/etc/nspawn-mcp/images`` by default) or among the recipes shipped with the package; the
operator's file wins for the same name. It starts EITHER from a Debian suite (debootstrap)
OR from another installed image (a btrfs snapshot of its template: fast, layered, no
network needed), then installs packages, writes files and runs commands as root in a
chroot of the new tree::

    description = "Debian with build tools"
    from = "default"
    packages = ["build-essential"]
    env = { PIP_NO_CACHE_DIR = "1" }

    [[files]]
    path = "/etc/motd"
    content = "hello\\n"

    commands = ["useradd --uid 1001 builder"]

Building is :mod:`.build`; this module only reads and checks.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Annotated, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..tomlfile import load_toml_model
from .catalog import IMAGE_NAME, parse_image_name

__all__ = [
    "DEFAULT_IMAGE_DIR",
    "DEFAULT_MIRROR",
    "Recipe",
    "RecipeError",
    "RecipeFile",
    "RecipeSource",
    "find_recipe",
    "load_recipe",
    "recipe_digest",
    "shipped_recipe_dir",
]

DEFAULT_IMAGE_DIR = Path("/etc/nspawn-mcp/images")
DEFAULT_MIRROR = "http://deb.debian.org/debian"

_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?")
_SUITE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class RecipeError(Exception):
    """A recipe that is missing or wrong; the message names the file and the field."""


def _absolute_path(value: str) -> str:
    path = PurePosixPath(value)
    if not path.is_absolute() or ".." in path.parts or str(path) != value or value == "/":
        raise ValueError("must be an absolute, normalised path inside the image (no '..', no trailing '/')")
    return value


def _package(value: str) -> str:
    if not _PACKAGE.fullmatch(value):
        raise ValueError(f"{value[:60]!r} is not a Debian package name")
    return value


def _env(value: dict[str, str]) -> dict[str, str]:
    for name in value:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name[:60]!r} is not a variable name (letters, digits, '_')")
    return value


class RecipeFile(BaseModel):
    """A file written into the image (parents are created)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Annotated[str, AfterValidator(_absolute_path)]
    content: str = Field(max_length=1 << 20)
    mode: int = Field(default=0o644, ge=0, le=0o7777, description="permission bits (TOML: 0o755)")


class Recipe(BaseModel):
    """One image's recipe. Exactly one of ``suite`` and ``from`` says what it starts from."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    description: str = Field(default="", max_length=500)
    suite: Annotated[str, Field(pattern=_SUITE.pattern)] | None = Field(
        default=None, description="a Debian suite to debootstrap (--variant=minbase), e.g. bookworm"
    )
    mirror: str = Field(
        default=DEFAULT_MIRROR, pattern=r"^(https?|file)://\S+$", description="debootstrap's mirror"
    )
    base: Annotated[str, Field(pattern=f"^{IMAGE_NAME.pattern}$")] | None = Field(
        default=None, alias="from", description="an installed image to start from (a snapshot of it)"
    )
    packages: tuple[Annotated[str, AfterValidator(_package)], ...] = ()
    files: tuple[RecipeFile, ...] = ()
    commands: tuple[Annotated[str, Field(min_length=1, max_length=1 << 16)], ...] = ()
    env: Annotated[dict[str, Annotated[str, Field(max_length=4096)]], AfterValidator(_env)] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _one_start(self) -> Self:
        if (self.suite is None) == (self.base is None):
            raise ValueError("give exactly one of 'suite' (a Debian suite) and 'from' (an installed image)")
        if self.base is not None and "mirror" in self.model_fields_set:
            raise ValueError("'mirror' is for 'suite' recipes; a 'from' recipe uses its base's apt sources")
        return self


def load_recipe(text: str, source: str) -> Recipe:
    return load_toml_model(Recipe, text, source, what="image recipe", error=RecipeError)


BUILD_REVISION = 2
"""Bumped when what the builder does beyond a recipe changes; images built before are out of date.

2: chroot commands see the host's CA bundle (apt over https behind a TLS-inspecting proxy)."""


def recipe_digest(recipe: Recipe) -> str:
    """What decides whether an installed image is current: the recipe's content and the builder's."""
    data = {"revision": BUILD_REVISION, "recipe": recipe.model_dump(mode="json", by_alias=True)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def shipped_recipe_dir() -> Path:
    return Path(str(resources.files("nspawn_mcp") / "data" / "images"))


@dataclass(frozen=True)
class RecipeSource:
    """A recipe and the file it came from."""

    name: str
    recipe: Recipe
    path: Path

    @property
    def digest(self) -> str:
        return recipe_digest(self.recipe)


def find_recipe(name: str, image_dirs: tuple[Path, ...]) -> RecipeSource:
    """The recipe ``name`` from the first of ``image_dirs`` that has it, then the shipped ones."""
    parse_image_name(name)
    searched = (*image_dirs, shipped_recipe_dir())
    for directory in searched:
        path = directory / f"{name}.toml"
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise RecipeError(f"{path}: cannot be read: {exc.strerror}") from None
        recipe = load_recipe(text, str(path))
        if recipe.base == name:
            raise RecipeError(f"{path}: invalid image recipe\n  from: an image cannot start from itself")
        return RecipeSource(name, recipe, path)
    where = ", ".join(str(d) for d in searched)
    raise RecipeError(f"no recipe named {name!r} (looked for {name}.toml in {where})")
