"""Our tools on the SDK's ``Tool``: strict arguments, plain errors, one copy of the result.

:class:`AgentTool` is the SDK's tool with three differences an agent can see:

- unknown arguments are refused (the arguments model forbids extra fields, and the input
  schema says ``additionalProperties: false``);
- a refused call's text is only what went wrong: validation problems as
  :func:`~nspawn_mcp.arguments.plain_errors` words them, our own errors as their message,
  without the SDK's ``Error executing tool X:`` prefix;
- a result is sent once, as structured content, with a short text summary
  (:mod:`nspawn_mcp.replies`); the SDK still checks it against the output schema.

:class:`ToolSet` collects them for ``MCPServer(tools=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.mcpserver.tools import Tool
from mcp_types import ToolAnnotations
from pydantic import BaseModel, ValidationError

from .arguments import plain_errors, strict
from .replies import reply

if TYPE_CHECKING:
    from mcp.server.mcpserver.context import Context

__all__ = ["AgentTool", "ToolSet"]

F = TypeVar("F", bound=Callable[..., Any])


class AgentTool(Tool):
    @classmethod
    def build(
        cls, fn: Callable[..., Any], *, title: str, description: str, annotations: ToolAnnotations
    ) -> AgentTool:
        tool = cls.from_function(
            fn, title=title, description=description, annotations=annotations, structured_output=True
        )
        assert isinstance(tool, AgentTool)  # from_function builds ``cls``
        if tool.output_schema is None:
            raise TypeError(f"tool {tool.name} must declare a result model")
        arg_model = strict(tool.fn_metadata.arg_model)
        tool.fn_metadata = tool.fn_metadata.model_copy(update={"arg_model": arg_model})
        tool.parameters = arg_model.model_json_schema(by_alias=True)
        return tool

    async def run(
        self, arguments: dict[str, Any], context: Context[Any, Any], convert_result: bool = False
    ) -> Any:
        try:
            result = await super().run(arguments, context, convert_result=False)
        except UnexpectedToolError:
            raise
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, ValidationError):
                raise ToolError(plain_errors(self.name, cause, self.parameters)) from cause
            if isinstance(cause, ToolError):
                raise ToolError(str(cause)) from cause
            raise
        if not convert_result or not isinstance(result, BaseModel):
            return result
        try:
            return self.fn_metadata.convert_result(reply(result))
        except Exception as exc:  # our bug: its text (pydantic's, with values) must not reach the agent
            raise UnexpectedToolError(f"Error executing tool {self.name}") from exc


class ToolSet:
    """The tools of one server, in the order they are offered."""

    def __init__(self) -> None:
        self.tools: list[Tool] = []

    def __call__(self, *, title: str, annotations: ToolAnnotations, description: str) -> Callable[[F], F]:
        def register(fn: F) -> F:
            self.tools.append(
                AgentTool.build(fn, title=title, description=_plain(description), annotations=annotations)
            )
            return fn

        return register


def _plain(text: str) -> str:
    """A description as written in the source, without its indentation or wrapped lines."""
    paragraphs = [
        " ".join(line.strip() for line in block.splitlines()) for block in text.strip().split("\n\n")
    ]
    return "\n\n".join(p for p in paragraphs if p)
