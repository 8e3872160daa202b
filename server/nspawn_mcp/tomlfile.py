"""Operator-written TOML files read into pydantic models, with errors an operator can act on."""

from __future__ import annotations

import tomllib
from typing import TypeVar

from pydantic import BaseModel, ValidationError

__all__ = ["load_toml_model"]

M = TypeVar("M", bound=BaseModel)


def load_toml_model(model: type[M], text: str, source: str, *, what: str, error: type[Exception]) -> M:
    """Parse and validate ``text``; ``error`` names ``source`` and the line (TOML syntax) or each field
    that is wrong (content), without pydantic's URLs or input echoes."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{source}: not valid TOML: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid {what}"]
        for item in exc.errors():
            field = ".".join(str(part) for part in item["loc"]) or "(top level)"
            lines.append(f"  {field}: {item['msg']}")
        raise error("\n".join(lines)) from None
