"""Finding and loading policy files (TOML) into :class:`Policy` values.

Shipped presets live in the package's ``policies/``; an operator's ``--policy-dir``
is searched first, so an operator file of the same name replaces a preset. Errors
name the file, the field and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import InvalidRequest, PolicyRefused
from ..tomlfile import load_toml_model
from .models import Policy

__all__ = [
    "POLICY_NAME",
    "PolicyError",
    "PolicySet",
    "load_policy_file",
    "load_policy_text",
    "shipped_policy_dir",
]

POLICY_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


class PolicyError(ValueError):
    """A policy file is invalid; the message names file and field."""


def shipped_policy_dir() -> Path:
    return Path(str(resources.files("nspawn_mcp") / "data" / "policies"))


def load_policy_text(text: str, source: str) -> Policy:
    return load_toml_model(Policy, text, source, what="policy", error=PolicyError)


def load_policy_file(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: cannot read: {exc.__class__.__name__}") from None
    return load_policy_text(text, str(path))


@dataclass(frozen=True)
class PolicySet:
    """The policies a server offers, by name."""

    policies: Mapping[str, Policy]

    @classmethod
    def load(cls, directories: Iterable[Path]) -> PolicySet:
        """Load every ``NAME.toml``; earlier directories win over later ones. A directory that is
        not there is an error (a mistyped ``--policy-dir`` would silently serve the presets)."""
        found: dict[str, Policy] = {}
        for directory in directories:
            if not directory.is_dir():
                raise PolicyError(f"policy directory {directory} does not exist or is not a directory")
            for path in sorted(directory.glob("*.toml")):
                name = path.stem
                if name in found:
                    continue
                if not POLICY_NAME.match(name):
                    raise PolicyError(f"{path}: policy names must match {POLICY_NAME.pattern}")
                found[name] = load_policy_file(path)
        if "default" not in found:
            raise PolicyError("no 'default' policy found in: " + ", ".join(map(str, directories)))
        return cls(policies=found)

    def get(self, name: str) -> Policy:
        if not POLICY_NAME.match(name):
            raise InvalidRequest(f"invalid policy name {name!r}; available: {', '.join(self.names)}")
        policy = self.policies.get(name)
        if policy is None:
            raise PolicyRefused(
                f"unknown policy {name!r}; available: {', '.join(self.names)}", rule="policy name"
            )
        return policy

    @property
    def names(self) -> list[str]:
        return sorted(self.policies)
