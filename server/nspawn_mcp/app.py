"""The MCP surface: tools, prompts. Parse, call the service, format. Nothing else."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib import resources
from typing import Annotated, Literal, ParamSpec, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field

from . import __version__
from .errors import InvalidRequest, SandboxError
from .models import CopyResult, DestroyResult, ExecResult, SandboxInfo, SandboxList
from .policy import CreateRequest
from .service import SandboxService

__all__ = ["build_server"]

P = ParamSpec("P")
R = TypeVar("R")

ServiceContext = Context[SandboxService]

INSTRUCTIONS = """\
Disposable Linux sandboxes (systemd-nspawn containers). Typical use: create_sandbox,
then exec_in_sandbox as often as needed (a shell string or an argv list), copy_file to
move files between the host's allowed directories and the sandbox, and destroy_sandbox
when done. Sandboxes have no network, run as an unprivileged user on the host, and are
destroyed automatically after their ttl_seconds."""


def _agent_errors(tool: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Our errors become tool errors whose text the agent reads; nothing else leaks."""

    @functools.wraps(tool)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await tool(*args, **kwargs)
        except SandboxError as exc:
            raise ToolError(str(exc)) from None

    return wrapper


def _service(ctx: ServiceContext) -> SandboxService:
    return ctx.request_context.lifespan_context


SandboxId = Annotated[
    str, Field(description="id returned by create_sandbox, like 'sbx-1a2b3c4d'", max_length=64)
]


def build_server(
    open_service: Callable[[], AbstractAsyncContextManager[SandboxService]],
) -> MCPServer[SandboxService]:
    @asynccontextmanager
    async def lifespan(_: MCPServer[SandboxService]) -> AsyncIterator[SandboxService]:
        async with open_service() as service:
            yield service

    mcp: MCPServer[SandboxService] = MCPServer(
        "nspawn-mcp", instructions=INSTRUCTIONS, version=__version__, lifespan=lifespan
    )

    @mcp.tool(annotations=ToolAnnotations(destructive_hint=False, open_world_hint=False))
    @_agent_errors
    async def create_sandbox(
        ctx: ServiceContext,
        image: Annotated[str, Field(description="image to start from", max_length=32)] = "default",
        policy: Annotated[
            str, Field(description="operator policy that sets what is allowed", max_length=32)
        ] = "default",
        memory_mb: Annotated[
            int | None, Field(description="memory cap in MiB (policy default if omitted)")
        ] = None,
        cpus: Annotated[float | None, Field(description="CPU cap in CPUs, e.g. 0.5")] = None,
        max_processes: Annotated[int | None, Field(description="cap on processes and threads")] = None,
        ttl_seconds: Annotated[int | None, Field(description="destroy automatically after this long")] = None,
    ) -> SandboxInfo:
        """Create a fresh, isolated Linux sandbox (Debian with python3) and return its id and limits."""
        request = CreateRequest(
            image=image,
            policy=policy,
            memory_mb=memory_mb,
            cpus=cpus,
            max_processes=max_processes,
            ttl_seconds=ttl_seconds,
        )
        return await _service(ctx).create(request)

    @mcp.tool(annotations=ToolAnnotations(destructive_hint=False, open_world_hint=False))
    @_agent_errors
    async def exec_in_sandbox(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        command: Annotated[
            str | list[str],
            Field(
                description="a shell command string (run by /bin/sh -c) or an argv list (run without a shell)"
            ),
        ],
        cwd: Annotated[
            str | None, Field(description="working directory inside the sandbox (default /root)")
        ] = None,
        env: Annotated[dict[str, str] | None, Field(description="extra environment variables")] = None,
        stdin: Annotated[str | None, Field(description="text fed to the command's standard input")] = None,
        timeout_seconds: Annotated[
            float | None, Field(description="kill the command after this long (policy default if omitted)")
        ] = None,
    ) -> ExecResult:
        """Run a command in a sandbox: exit_code, stdout and stderr (kept apart), timed_out, truncated."""
        return await _service(ctx).exec(
            sandbox_id, command, cwd=cwd, env=env, stdin=stdin, timeout_seconds=timeout_seconds
        )

    @mcp.tool(annotations=ToolAnnotations(destructive_hint=False, open_world_hint=False))
    @_agent_errors
    async def copy_file(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        source: Annotated[
            str, Field(description="file to copy: a host path for to_sandbox, a sandbox path otherwise")
        ],
        destination: Annotated[
            str, Field(description="where to put it: a sandbox path for to_sandbox, a host path otherwise")
        ],
        direction: Annotated[Literal["to_sandbox", "from_sandbox"], Field(description="which way to copy")],
    ) -> CopyResult:
        """Copy one regular file between the host and a sandbox. Host paths must lie in the policy's allowed
        directories (by default the server's working directory); existing destinations are replaced."""
        service = _service(ctx)
        if direction == "to_sandbox":
            return await service.copy_to_sandbox(sandbox_id, source, destination)
        if direction == "from_sandbox":
            return await service.copy_from_sandbox(sandbox_id, source, destination)
        raise InvalidRequest("direction must be 'to_sandbox' or 'from_sandbox'")

    @mcp.tool(
        annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=False, open_world_hint=False)
    )
    @_agent_errors
    async def destroy_sandbox(ctx: ServiceContext, sandbox_id: SandboxId) -> DestroyResult:
        """Stop a sandbox and delete everything in it."""
        await _service(ctx).destroy(sandbox_id)
        return DestroyResult(sandbox_id=sandbox_id, destroyed=True)

    @mcp.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    @_agent_errors
    async def list_sandboxes(ctx: ServiceContext) -> SandboxList:
        """List the live sandboxes with their limits and expiry times."""
        return SandboxList(sandboxes=_service(ctx).list())

    prompt_text = (resources.files("nspawn_mcp") / "data" / "prompts" / "sandbox-workflow.md").read_text()

    @mcp.prompt(name="sandbox_workflow", description="How to work in an nspawn-mcp sandbox, step by step")
    def sandbox_workflow() -> str:
        return prompt_text

    return mcp
