"""What an agent sends as a tool's arguments, checked strictly and refused in plain words.

The SDK builds each tool's arguments model from the function's signature and ignores
names it does not know: ``"timeout": 1`` instead of ``timeout_seconds`` would run the
command without a timeout, and nobody would notice. :func:`strict` makes that model
refuse unknown names (and says so in the input schema: ``additionalProperties: false``).

:func:`plain_errors` is the one place a pydantic ``ValidationError`` becomes text for the
agent: one line per problem (the argument, what was wrong, what is allowed), without
pydantic's header, documentation URLs or an echo of the input.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, cast

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

__all__ = ["plain_errors", "strict"]

_MAX_LINES = 20
_MAX_NAME = 40

_FORBID = ConfigDict(extra="forbid")

M = TypeVar("M", bound=BaseModel)


def strict(model: type[M]) -> type[M]:
    """``model`` refusing unknown fields (a subclass with the same fields, schema and name)."""
    namespace = {"model_config": _FORBID, "__module__": model.__module__, "__doc__": model.__doc__}
    return cast(type[M], type(model.__name__, (model,), namespace))


def plain_errors(tool: str, error: ValidationError, schema: Mapping[str, Any]) -> str:
    """One line per problem with ``tool``'s arguments; ``schema`` is the tool's input schema."""
    properties: Mapping[str, Any] = schema.get("properties", {})
    details = error.errors(include_url=False, include_input=False)
    # a value that had one of a union's shapes (an error inside it) is told about that shape only
    shaped = {detail["loc"][0] for detail in details if len(detail["loc"]) > 2}
    lines: list[str] = []
    unknown: list[str] = []
    seen: set[str] = set()
    for detail in details:
        loc = detail["loc"]
        if detail["type"] == "extra_forbidden" and len(loc) == 1:
            unknown.append(_shown(loc[0]))
            continue
        if loc and loc[0] in shaped and len(loc) == 2 and _is_union(properties.get(str(loc[0]), {})):
            continue
        line = _line(detail, schema)
        if line not in seen:
            seen.add(line)
            lines.append(line)
    allowed = ", ".join(properties) or "none"
    for name in unknown:
        close = difflib.get_close_matches(name, list(properties), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        lines.insert(0, f"unknown argument '{name}'{hint}: {tool} takes {allowed}")
    if len(lines) > _MAX_LINES:
        lines = [*lines[:_MAX_LINES], f"... and {len(lines) - _MAX_LINES} more problems"]
    return "\n".join(lines)


def _is_union(field_schema: Mapping[str, Any]) -> bool:
    """Whether pydantic tags the field's errors with a union branch: ``str | list[str]``, not ``X | None``."""
    return len([s for s in field_schema.get("anyOf", ()) if s.get("type") != "null"]) > 1


def _line(detail: ErrorDetails, schema: Mapping[str, Any]) -> str:
    """``argument.path: what is wrong``; the branches of a union are told as one problem."""
    loc = list(detail["loc"])
    name = str(loc[0]) if loc else ""
    field_schema: Mapping[str, Any] = schema.get("properties", {}).get(name, {})
    if _is_union(field_schema) and len(loc) >= 2 and isinstance(loc[1], str):
        if len(loc) == 2:  # the value has none of the union's shapes
            return f"{name}: must be {_kind(field_schema)}"
        del loc[1]  # the branch's tag, e.g. 'list[str]': the value had that shape
    path = _path(loc)
    kind = detail["type"]
    if kind == "missing":
        return f"{path}: is required"
    if kind == "extra_forbidden":
        fields = _fields_at(schema, loc[:-1])
        return f"{path}: unknown field" + (f"; allowed: {', '.join(fields)}" if fields else "")
    return f"{path}: {_words(detail['msg'])}"


def _fields_at(schema: Mapping[str, Any], loc: Sequence[int | str]) -> list[str]:
    """The field names of the object at ``loc`` in the arguments, as the schema gives them."""
    node: Mapping[str, Any] = schema
    for part in loc:
        node = _resolved(schema, node)
        node = node.get("items", {}) if isinstance(part, int) else node.get("properties", {}).get(part, {})
    return list(_resolved(schema, node).get("properties", {}))


def _resolved(root: Mapping[str, Any], node: Mapping[str, Any]) -> Mapping[str, Any]:
    """``node`` with its ``$ref`` followed and a nullable ``anyOf`` narrowed to its object or array."""
    for _ in range(8):
        if "$ref" in node:
            node = root.get("$defs", {}).get(str(node["$ref"]).rsplit("/", 1)[-1], {})
        elif "anyOf" in node:
            node = next((s for s in node["anyOf"] if s.get("type") != "null"), {})
        else:
            break
    return node


def _path(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{_shown(part)}" if text else _shown(part))
    return text or "arguments"


def _shown(part: int | str) -> str:
    text = str(part)
    return text if len(text) <= _MAX_NAME else text[:_MAX_NAME] + "..."


def _words(message: str) -> str:
    """pydantic's sentence, said of the argument: 'Input should be ...' becomes 'must be ...'."""
    for prefix, replacement in (
        ("Input should be", "must be"),
        ("String should have", "must have"),
        ("List should have", "must have"),
        ("Dictionary should have", "must have"),
        ("Value should have", "must have"),
        ("Value error, ", ""),
    ):
        if message.startswith(prefix):
            return replacement + message[len(prefix) :]
    return message[:1].lower() + message[1:]


def _kind(schema: Mapping[str, Any]) -> str:
    """What a JSON schema accepts, in words: 'a string or a list of strings'."""
    if "anyOf" in schema:
        return " or ".join(_kind(s) for s in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        items = _kind(schema.get("items", {}))
        return "a list of " + (items.removeprefix("a ").removeprefix("an ") + "s" if items else "values")
    return {
        "string": "a string",
        "integer": "an integer",
        "number": "a number",
        "boolean": "true or false",
        "object": "an object",
        "null": "null",
    }.get(str(kind), "a value of another type")
