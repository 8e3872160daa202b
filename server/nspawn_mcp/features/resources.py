"""Resources: a sandbox's status, a file in it, an operator policy.

A resource that does not exist (an unknown policy, no sandbox of that id that the caller may
see, no such file) is the MCP spec's "resource not found", JSON-RPC -32602 (SEP-2164; the
older -32002 is retired); other failures are -32603 with a safe one-line message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.mcpserver.resources.templates import ResourceSecurity

from ..errors import BackendError, PolicyRefused, QuotaExceeded, SandboxError
from ..files import SandboxFiles
from ..identity import current_client
from ..models import PolicyDocument
from ..policy import PolicySet
from ..service import SandboxService
from .caller import Guard, as_caller

__all__ = [
    "POLICY_TEMPLATE",
    "SANDBOX_FILE_TEMPLATE",
    "SANDBOX_TEMPLATE",
    "policy_document",
    "register_resources",
]

T = TypeVar("T")

SANDBOX_TEMPLATE = "sandbox://{sandbox_id}"
SANDBOX_FILE_TEMPLATE = "sandbox://{sandbox_id}/files/{+path}"
POLICY_TEMPLATE = "policy://{name}"


def policy_document(policies: PolicySet, name: str) -> PolicyDocument:
    """A policy as the calling client may see it: only the policies its token allows exist for it."""
    client = current_client.get()
    usable = [known for known in policies.names if client.policies is None or known in client.policies]
    if name not in usable:
        raise PolicyRefused(f"unknown policy {name!r}; available: {', '.join(usable)}", rule="policy name")
    return PolicyDocument(name=name, policy=policies.get(name).model_dump(mode="json"), available=usable)


def resource_error(exc: SandboxError | ToolError) -> ResourceError:
    """What a client reading a resource is told: not found (-32602) unless the host failed or the
    caller is over its rate (-32603)."""
    if isinstance(exc, BackendError | QuotaExceeded | ToolError):
        return ResourceError(str(exc))
    if isinstance(exc, PolicyRefused) and exc.rule != "policy name":
        return ResourceError(str(exc))
    return ResourceNotFoundError(str(exc))


def register_resources(mcp: MCPServer[SandboxService], policies: PolicySet, guard: Guard) -> None:
    caller = as_caller(guard)

    async def read_as_caller(read: Callable[[], Awaitable[T]]) -> T:
        """``read`` as the calling client; a refusal is answered as a resource read's (resource_error)."""
        try:
            return await caller(read)
        except (SandboxError, ToolError) as exc:
            raise resource_error(exc) from None

    @mcp.resource(
        POLICY_TEMPLATE,
        name="policy",
        title="Operator policy",
        description="An operator policy, as get_policy shows it: defaults and maxima, exec, files, network",
        mime_type="application/json",
    )
    async def policy_resource(name: str) -> str:
        async def document() -> str:
            return policy_document(policies, name).model_dump_json(indent=2)

        return await read_as_caller(document)

    @mcp.resource(
        SANDBOX_TEMPLATE,
        name="sandbox",
        title="Sandbox status",
        description="One of your sandboxes now: status, limits, usage (memory, CPU time, disk, processes), "
        "expiry and exposed ports; e.g. sandbox://sbx-1a2b3c4d",
        mime_type="application/json",
    )
    async def sandbox_status(ctx: Context[SandboxService], sandbox_id: str) -> str:
        service: SandboxService = ctx.request_context.lifespan_context

        async def status() -> str:
            return (await service.status(sandbox_id)).model_dump_json(indent=2)

        return await read_as_caller(status)

    @mcp.resource(
        SANDBOX_FILE_TEMPLATE,
        name="sandbox_file",
        title="File in a sandbox",
        description="A whole file inside a sandbox (text, or a blob for binary files), up to the policy's "
        "files.max_read_bytes; e.g. sandbox://sbx-1a2b3c4d/files/etc/os-release",
        security=ResourceSecurity(exempt_params=frozenset({"path"})),  # resolved inside the sandbox's jail
    )
    async def sandbox_file(ctx: Context[SandboxService], sandbox_id: str, path: str) -> str | bytes:
        files = SandboxFiles(ctx.request_context.lifespan_context)

        async def read() -> str | bytes:
            return await files.read_whole(sandbox_id, "/" + path.lstrip("/"))

        return await read_as_caller(read)
