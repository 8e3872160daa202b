"""Prompts: Markdown files with a TOML front matter that names their arguments.

A prompt file looks like::

    +++
    title = "Work in a sandbox"
    description = "How to work in an nspawn-mcp sandbox, step by step"

    [[arguments]]
    name = "policy"
    description = "the policy to create the sandbox under"
    default = "default"
    +++
    Create a sandbox with `create_sandbox(policy="{{policy}}")` ...

Its name is the file's, with ``-`` as ``_`` (``sandbox-workflow.md`` is ``sandbox_workflow``).
An argument without a default is required. ``{{name}}`` in the text is replaced by the
argument's value; the text may name no other placeholder. Values are short single lines
(they go into a prompt a model reads, so nothing can break out of a line).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.abc import Traversable
from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.prompts.base import Prompt, PromptArgument
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, GetPromptRequestParams, GetPromptResult, InputRequiredResult

__all__ = [
    "PromptArgumentError",
    "PromptFile",
    "PromptFileError",
    "load_prompts",
    "parse_prompt",
    "register_prompts",
]

_FRONT = re.compile(r"\A\+\+\+\n(?P<front>.*?)\n\+\+\+\n(?P<body>.*)\Z", re.DOTALL)
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_VALUE = 512
"""Longest argument value, in characters."""


class PromptFileError(ValueError):
    """A prompt file is malformed (found when the server starts, never by a client)."""


class PromptArgumentError(ValueError):
    """A client's arguments do not fit the prompt; the message says what is allowed."""


@dataclass(frozen=True)
class Argument:
    name: str
    description: str
    default: str | None = None

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class PromptFile:
    name: str
    title: str | None
    description: str
    arguments: tuple[Argument, ...]
    body: str

    def render(self, given: Mapping[str, str]) -> str:
        """The text with the arguments in; raises PromptArgumentError for unknown, missing or bad ones."""
        known = {argument.name: argument for argument in self.arguments}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise PromptArgumentError(
                f"prompt {self.name!r} has no argument {unknown[0]!r}; its arguments: "
                + (", ".join(known) or "none")
            )
        values = {}
        for argument in self.arguments:
            value = given.get(argument.name, argument.default)
            if value is None:
                raise PromptArgumentError(
                    f"prompt {self.name!r} needs the argument {argument.name!r} ({argument.description})"
                )
            if len(value) > MAX_VALUE or not value.isprintable():
                raise PromptArgumentError(
                    f"argument {argument.name!r} of prompt {self.name!r} must be one line of at most "
                    f"{MAX_VALUE} printable characters"
                )
            values[argument.name] = value
        return _PLACEHOLDER.sub(lambda match: values[match.group(1)], self.body)


def _arguments(raw: object, where: str) -> tuple[Argument, ...]:
    if not isinstance(raw, list):
        raise PromptFileError(f"{where}: 'arguments' must be a list of tables")
    found = []
    for entry in raw:
        if not isinstance(entry, dict) or set(entry) - {"name", "description", "default"}:
            raise PromptFileError(f"{where}: each argument has a name, a description and maybe a default")
        name, description, default = entry.get("name"), entry.get("description"), entry.get("default")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or not isinstance(description, str):
            raise PromptFileError(
                f"{where}: an argument needs a name (lower case, digits, _) and a description"
            )
        if default is not None and not isinstance(default, str):
            raise PromptFileError(f"{where}: the default of {name!r} must be a string")
        found.append(Argument(name, description, default))
    if len({argument.name for argument in found}) != len(found):
        raise PromptFileError(f"{where}: an argument is named twice")
    return tuple(found)


def parse_prompt(file_name: str, text: str) -> PromptFile:
    """One prompt file's text; raises PromptFileError saying what is wrong."""
    match = _FRONT.match(text)
    if match is None:
        raise PromptFileError(f"{file_name}: must start with a +++ TOML front matter +++ block")
    try:
        front: dict[str, Any] = tomllib.loads(match["front"])
    except tomllib.TOMLDecodeError as exc:
        raise PromptFileError(f"{file_name}: front matter: {exc}") from None
    extra = set(front) - {"title", "description", "arguments"}
    if extra:
        raise PromptFileError(f"{file_name}: unknown front matter key {sorted(extra)[0]!r}")
    description = front.get("description")
    title = front.get("title")
    if not isinstance(description, str) or not (title is None or isinstance(title, str)):
        raise PromptFileError(f"{file_name}: needs a description (and a title, if any, as a string)")
    arguments = _arguments(front.get("arguments", []), file_name)
    named = {argument.name for argument in arguments}
    for placeholder in _PLACEHOLDER.findall(match["body"]):
        if placeholder not in named:
            raise PromptFileError(f"{file_name}: {{{{{placeholder}}}}} is not one of its arguments")
    name = file_name.removesuffix(".md").replace("-", "_")
    if not _NAME.fullmatch(name):
        raise PromptFileError(f"{file_name}: the file name must give a prompt name of a-z, 0-9 and _")
    return PromptFile(name, title, description, arguments, match["body"].strip() + "\n")


def load_prompts(directory: Traversable) -> list[PromptFile]:
    """Every ``*.md`` prompt in ``directory``, by name."""
    files = sorted(
        (entry for entry in directory.iterdir() if entry.name.endswith(".md")), key=lambda e: e.name
    )
    return [parse_prompt(entry.name, entry.read_text(encoding="utf-8")) for entry in files]


def _as_sdk_prompt(prompt: PromptFile) -> Prompt:
    async def render(**arguments: str) -> str:
        return prompt.render(arguments)

    return Prompt(
        name=prompt.name,
        title=prompt.title,
        description=prompt.description,
        arguments=[
            PromptArgument(name=argument.name, description=argument.description, required=argument.required)
            for argument in prompt.arguments
        ],
        fn=render,
        context_kwarg=None,
    )


def register_prompts(mcp: MCPServer[Any], prompts: Iterable[PromptFile]) -> None:
    """Offer ``prompts``; an unknown prompt, or arguments that do not fit, are invalid params (-32602)."""
    by_name = {prompt.name: prompt for prompt in prompts}
    for prompt in by_name.values():
        mcp.add_prompt(_as_sdk_prompt(prompt))
    lowlevel = mcp._lowlevel_server
    entry = lowlevel.get_request_handler("prompts/get")
    assert entry is not None, "MCPServer serves prompts/get"
    sdk_get_prompt = entry.handler

    async def get_prompt(
        ctx: ServerRequestContext[Any], params: GetPromptRequestParams
    ) -> GetPromptResult | InputRequiredResult:
        prompt = by_name.get(params.name)
        if prompt is None:
            raise MCPError(
                INVALID_PARAMS, f"no prompt {params.name[:64]!r}; prompts: {', '.join(sorted(by_name))}"
            )
        try:
            prompt.render(params.arguments or {})
        except PromptArgumentError as exc:
            raise MCPError(INVALID_PARAMS, str(exc)) from None
        result = await sdk_get_prompt(ctx, params)
        assert isinstance(result, GetPromptResult | InputRequiredResult)
        return result

    lowlevel.add_request_handler("prompts/get", GetPromptRequestParams, get_prompt)
