"""Completions (``completion/complete``): policy names, image names and the caller's own sandbox ids,
for the prompt arguments and resource-template parameters that take them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping

from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    CompleteRequestParams,
    CompleteResult,
    Completion,
    PromptReference,
)

from ..errors import SandboxError
from ..identity import current_client
from ..policy import PolicySet
from ..service import SandboxService
from .caller import Guard, as_caller
from .prompts import PromptFile
from .resources import POLICY_TEMPLATE, SANDBOX_FILE_TEMPLATE, SANDBOX_TEMPLATE

__all__ = ["MAX_VALUES", "register_completions"]

MAX_VALUES = 100
"""The most values one completion may carry (the MCP spec's limit)."""

Source = Callable[[SandboxService], Awaitable[Iterable[str]]]


def _matching(values: Iterable[str], prefix: str) -> Completion:
    found = sorted({value for value in values if value.startswith(prefix)})
    return Completion(values=found[:MAX_VALUES], total=len(found), has_more=len(found) > MAX_VALUES)


def register_completions(
    mcp: MCPServer[SandboxService], policies: PolicySet, prompts: Iterable[PromptFile], guard: Guard
) -> None:
    caller = as_caller(guard)

    async def policy_names(_: SandboxService) -> list[str]:
        allowed = current_client.get().policies
        return [name for name in policies.names if allowed is None or name in allowed]

    async def image_names(service: SandboxService) -> list[str]:
        return [image.name for image in (await service.list_images()).images]

    async def sandbox_ids(service: SandboxService) -> list[str]:
        return [sandbox.sandbox_id for sandbox in service.list()]  # the caller's own (or shared) only

    by_argument: Mapping[str, Source] = {
        "policy": policy_names,
        "image": image_names,
        "sandbox_id": sandbox_ids,
    }
    prompt_arguments = {prompt.name: {a.name for a in prompt.arguments} for prompt in prompts}
    template_parameters: Mapping[str, Mapping[str, Source]] = {
        SANDBOX_TEMPLATE: {"sandbox_id": sandbox_ids},
        SANDBOX_FILE_TEMPLATE: {"sandbox_id": sandbox_ids},
        POLICY_TEMPLATE: {"name": policy_names},
    }

    def source_of(params: CompleteRequestParams) -> Source | None:
        ref, argument = params.ref, params.argument.name
        if isinstance(ref, PromptReference):
            if ref.name not in prompt_arguments:
                raise MCPError(INVALID_PARAMS, f"no prompt {ref.name[:64]!r} to complete arguments of")
            return by_argument.get(argument) if argument in prompt_arguments[ref.name] else None
        if ref.uri not in template_parameters:
            raise MCPError(INVALID_PARAMS, f"no resource template {ref.uri[:128]!r} to complete")
        return template_parameters[ref.uri].get(argument)

    async def complete(
        ctx: ServerRequestContext[SandboxService], params: CompleteRequestParams
    ) -> CompleteResult:
        source = source_of(params)
        if source is None:
            return CompleteResult(completion=Completion(values=[], total=0, has_more=False))
        service = ctx.lifespan_context

        async def values() -> Iterable[str]:
            return await source(service)

        try:
            found = await caller(values)
        except (SandboxError, ToolError):  # over its rate, or no identity: nothing to offer
            found = []
        return CompleteResult(completion=_matching(found, params.argument.value))

    mcp._lowlevel_server.add_request_handler("completion/complete", CompleteRequestParams, complete)
