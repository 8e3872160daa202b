"""The MCP surface: tools, prompts. Parse, call the service, format. Nothing else."""

from __future__ import annotations

import dataclasses
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Literal, ParamSpec, TypeVar

from mcp.server.auth.provider import TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from . import __version__
from .backend.api import OutputChunk
from .commands import CommandRequest
from .errors import InvalidRequest, SandboxError
from .features import policy_document as _policy_document
from .features import register_features
from .files import SandboxFiles
from .identity import LOCAL, Client, current_client
from .models import (
    CopyResult,
    DestroyResult,
    ExecResult,
    ExposedPort,
    FileContent,
    FileEditResult,
    FileList,
    FileWriteResult,
    ImageList,
    PolicyDocument,
    ProcessInfo,
    ProcessList,
    ProcessOutputResult,
    SandboxInfo,
    SandboxList,
    StdinWritten,
    UnexposedPort,
)
from .policy import CreateRequest, MountRequest, PolicySet
from .service import SandboxService
from .throttle import Throttle

__all__ = ["build_server"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

ServiceContext = Context[SandboxService]

INSTRUCTIONS = """\
Disposable Linux sandboxes (systemd-nspawn containers). Typical use: create_sandbox,
then exec_in_sandbox as often as needed (a shell string or an argv list), read_file,
write_file, edit_file and list_files to work on files inside it (no host access needed),
copy_file to move files or directories between the host's allowed directories and the
sandbox, and destroy_sandbox when done. Long-running commands can run with
background=true; expose_port makes a server started in a sandbox reachable from the
host. Each sandbox runs as an
unprivileged user on the host, has only what its policy allows (get_policy shows it; by
default no network), and is destroyed automatically after its ttl_seconds."""


def _client_label(ctx: ServiceContext) -> str:
    """What the MCP client calls itself: a label for the logs, never an identity."""
    request = ctx.request_context
    info = (request.meta or {}).get("io.modelcontextprotocol/clientInfo")
    if isinstance(info, dict) and isinstance(info.get("name"), str):
        return str(info["name"])[:64]
    params = request.session.client_params
    if params is not None:
        return params.client_info.name[:64]
    return ""


Identify = Callable[[], Client]
"""Who a request comes from when its connection did not say (HTTP: the bearer token's identity)."""


def _agent_errors(
    throttle: Throttle, identify: Identify
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """The error boundary towards the agent: our errors become tool errors whose text it reads.

    Anything else (an ``OSError`` naming host paths, a bug) is logged with a short
    reference and the agent gets only that reference: no host detail leaks.

    Also settles which client is calling: the identity the daemon's connection set, or
    the one ``identify`` finds (an HTTP request's token); what the client says about
    itself is only a label. Then admits the call through that identity's rate limit.
    """

    def decorate(tool: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(tool)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            ctx = kwargs.get("ctx")
            client = current_client.get()
            if client is LOCAL:
                client = identify()
            if isinstance(ctx, Context):
                client = dataclasses.replace(client, label=_client_label(ctx))
            token = current_client.set(client)
            try:
                throttle.admit(client.identity)
                return await tool(*args, **kwargs)
            except SandboxError as exc:
                raise ToolError(str(exc)) from None
            except Exception:
                reference = secrets.token_hex(4)
                log.exception("internal error in %s (reference %s)", tool.__name__, reference)
                raise ToolError(
                    f"internal error in {tool.__name__} (reference {reference}); nothing about it is "
                    "shown here, the operator's log has the details"
                ) from None
            finally:
                current_client.reset(token)

        return wrapper

    return decorate


def _service(ctx: ServiceContext) -> SandboxService:
    return ctx.request_context.lifespan_context


SandboxId = Annotated[
    str, Field(description="id returned by create_sandbox, like 'sbx-1a2b3c4d'", max_length=64)
]
SandboxPath = Annotated[
    str, Field(description="absolute path inside the sandbox, e.g. /root/app/main.py", max_length=4096)
]
ProcessId = Annotated[
    str, Field(description="id returned by exec_in_sandbox(background=true), like 'p1'", max_length=16)
]


class MountSpec(BaseModel):
    """One bind of a host path into the sandbox."""

    host: str = Field(description="host path, under one of the policy's mounts.allowed", max_length=4096)
    sandbox: str = Field(description="absolute path inside the sandbox, e.g. /work", max_length=4096)
    writable: bool = Field(default=False, description="read-write, if the policy allows it for that path")


_HUGE = 1 << 53
"""Schema bound of numeric arguments: far above any policy (which names the rule that refuses), low
enough that no arithmetic on them overflows."""

_PROGRESS_LINES = 20
_PROGRESS_CHARS = 4000


def _progress_reporter(ctx: ServiceContext) -> Callable[[OutputChunk], Awaitable[None]]:
    """Streams the newest output lines as progress notifications.

    The SDK sends them only to clients that asked for progress (a progress token);
    for the others reporting is a no-op. The token is not visible to tools on every
    transport, so output is always streamed from the sandbox.
    """
    started = time.monotonic()

    async def report(chunk: OutputChunk) -> None:
        text = (chunk.stdout + chunk.stderr).decode("utf-8", errors="replace")
        newest = "\n".join(text.splitlines()[-_PROGRESS_LINES:])[-_PROGRESS_CHARS:]
        await ctx.report_progress(round(time.monotonic() - started, 3), message=newest)

    return report


def _local() -> Client:
    return LOCAL


def build_server(
    open_service: Callable[[], AbstractAsyncContextManager[SandboxService]],
    policies: PolicySet,
    throttle: Throttle | None = None,
    identify: Identify = _local,
    token_verifier: TokenVerifier | None = None,
    auth: AuthSettings | None = None,
) -> MCPServer[SandboxService]:
    """The MCP server; ``policies`` are the operator's, ``open_service`` runs for each session.

    ``throttle``: the per-client rate limit of tool calls (none by default). ``identify``:
    who a request comes from when its connection did not set :data:`current_client` (the
    daemon's HTTP requests: their token's identity; in-process use: the process itself).
    ``token_verifier`` and ``auth``: the SDK's bearer authentication of HTTP requests."""
    agent_errors = _agent_errors(throttle or Throttle(rate=0, burst=0), identify)

    @asynccontextmanager
    async def lifespan(_: MCPServer[SandboxService]) -> AsyncIterator[SandboxService]:
        async with open_service() as service:
            yield service

    mcp: MCPServer[SandboxService] = MCPServer(
        "nspawn-mcp",
        instructions=INSTRUCTIONS,
        version=__version__,
        lifespan=lifespan,
        token_verifier=token_verifier,
        auth=auth,
    )

    @mcp.tool(annotations=ToolAnnotations(destructive_hint=False, open_world_hint=False))
    @agent_errors
    async def create_sandbox(
        ctx: ServiceContext,
        image: Annotated[str, Field(description="image to start from", max_length=32)] = "default",
        policy: Annotated[
            str, Field(description="operator policy that sets what is allowed", max_length=32)
        ] = "default",
        memory_mb: Annotated[
            int | None, Field(description="memory cap in MiB (policy default if omitted)", ge=1, le=_HUGE)
        ] = None,
        cpus: Annotated[
            float | None, Field(description="CPU cap in CPUs, e.g. 0.5", gt=0, le=1e9, allow_inf_nan=False)
        ] = None,
        max_processes: Annotated[
            int | None, Field(description="cap on processes and threads", ge=1, le=_HUGE)
        ] = None,
        ttl_seconds: Annotated[
            int | None, Field(description="destroy automatically after this long", ge=1, le=_HUGE)
        ] = None,
        disk_mb: Annotated[
            int | None,
            Field(description="disk quota in MiB, image included, if the policy sets quotas", ge=1, le=_HUGE),
        ] = None,
        mounts: Annotated[
            list[MountSpec] | None,
            Field(description="host directories to bind in, if the policy allows them", max_length=64),
        ] = None,
        env: Annotated[
            dict[str, str] | None,
            Field(
                description="environment variables for every command in this sandbox (a command's own env "
                "wins); not for secrets: values are stored in the sandbox's record and visible to "
                "everything in the sandbox",
                max_length=64,
            ),
        ] = None,
    ) -> SandboxInfo:
        """Create a fresh, isolated Linux sandbox (Debian with python3) and return its id and limits.

        env sets variables for every command (at most 64; names of letters, digits and '_').
        Secret handling is later work: do not pass credentials in env."""
        request = CreateRequest(
            image=image,
            policy=policy,
            memory_mb=memory_mb,
            cpus=cpus,
            max_processes=max_processes,
            ttl_seconds=ttl_seconds,
            mounts=tuple(MountRequest(m.host, m.sandbox, m.writable) for m in mounts or ()),
            disk_mb=disk_mb,
        )
        return await _service(ctx).create(request, env)

    @mcp.tool(annotations=ToolAnnotations(destructive_hint=False, open_world_hint=False))
    @agent_errors
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
            str | None, Field(description="working directory inside the sandbox (default: home)")
        ] = None,
        env: Annotated[dict[str, str] | None, Field(description="extra environment variables")] = None,
        stdin: Annotated[str | None, Field(description="text fed to the command's standard input")] = None,
        timeout_seconds: Annotated[
            float | None,
            Field(
                description="kill the command after this long (policy default if omitted)",
                gt=0,
                le=1e9,
                allow_inf_nan=False,
            ),
        ] = None,
        user: Annotated[
            str, Field(description="'root' (uid 0 inside only) or the image's unprivileged user 'sandbox'")
        ] = "root",
        background: Annotated[
            bool, Field(description="start and return a process_id at once; read its output later")
        ] = False,
        include_base64: Annotated[
            bool, Field(description="also return the exact output bytes as stdout_base64/stderr_base64")
        ] = False,
    ) -> ExecResult:
        """Run a command in a sandbox: exit_code, stdout and stderr (kept apart), timed_out, truncated.

        With background=true, returns at once with process_id set; use read_process_output,
        write_process_stdin, kill_process and list_processes. Clients that send a progress token
        get the newest output lines as progress notifications while the command runs."""
        service = _service(ctx)
        request = CommandRequest(
            command=command, cwd=cwd, env=env, stdin=stdin, timeout_seconds=timeout_seconds, user=user
        )
        if background:
            return await service.start_background(sandbox_id, request)
        return await service.exec(
            sandbox_id, request, include_base64=include_base64, on_output=_progress_reporter(ctx)
        )

    @mcp.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    @agent_errors
    async def read_process_output(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        process_id: ProcessId,
        since: Annotated[
            str | None, Field(description="next_cursor from the previous read; omit to read from the start")
        ] = None,
    ) -> ProcessOutputResult:
        """Read a background process's output after a cursor, with its state (running, exit_code)."""
        return await _service(ctx).read_process_output(sandbox_id, process_id, since)

    @mcp.tool(annotations=ToolAnnotations(destructive_hint=False, open_world_hint=False))
    @agent_errors
    async def write_process_stdin(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        process_id: ProcessId,
        data: Annotated[str, Field(description="text to write to the process's standard input")],
        close: Annotated[bool, Field(description="close stdin afterwards (end of input)")] = False,
    ) -> StdinWritten:
        """Write to a background process's standard input."""
        return await _service(ctx).write_process_stdin(sandbox_id, process_id, data, close)

    @mcp.tool(annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False))
    @agent_errors
    async def kill_process(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        process_id: ProcessId,
        signal: Annotated[
            str,
            Field(description="TERM (default), KILL (the process and everything it started), INT, HUP, ..."),
        ] = "TERM",
    ) -> ProcessInfo:
        """Send a signal to a background process."""
        return await _service(ctx).kill_process(sandbox_id, process_id, signal)

    @mcp.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    @agent_errors
    async def list_processes(ctx: ServiceContext, sandbox_id: SandboxId) -> ProcessList:
        """List a sandbox's background processes and their states."""
        return await _service(ctx).list_processes(sandbox_id)

    @mcp.tool(annotations=ToolAnnotations(destructive_hint=False, open_world_hint=False))
    @agent_errors
    async def copy_file(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        source: Annotated[
            str,
            Field(
                description="file or directory to copy: a host path for to_sandbox, a sandbox path otherwise"
            ),
        ],
        destination: Annotated[
            str, Field(description="where to put it: a sandbox path for to_sandbox, a host path otherwise")
        ],
        direction: Annotated[Literal["to_sandbox", "from_sandbox"], Field(description="which way to copy")],
    ) -> CopyResult:
        """Copy a regular file or a directory between the host and a sandbox. Host paths must lie in the
        policy's allowed directories (by default your working directory and below). An existing file is
        replaced; a directory is copied to a new name (regular files and directories only: symlinks,
        devices, FIFOs and sockets are left out and counted in `skipped`)."""
        service = _service(ctx)
        if direction == "to_sandbox":
            return await service.copy_to_sandbox(sandbox_id, source, destination)
        if direction == "from_sandbox":
            return await service.copy_from_sandbox(sandbox_id, source, destination)
        raise InvalidRequest("direction must be 'to_sandbox' or 'from_sandbox'")

    @mcp.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    @agent_errors
    async def read_file(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        path: SandboxPath,
        offset: Annotated[
            int,
            Field(
                description="text: lines to skip (0 = from the first line); base64: byte offset",
                ge=0,
                le=_HUGE,
            ),
        ] = 0,
        limit: Annotated[
            int | None,
            Field(
                description="text: most lines to return; base64: most bytes (default: as many as fit)",
                ge=1,
                le=_HUGE,
            ),
        ] = None,
        encoding: Annotated[
            Literal["auto", "text", "base64"],
            Field(description="auto: text unless the file's first 8 KiB hold NUL bytes or invalid UTF-8"),
        ] = "auto",
    ) -> FileContent:
        """Read a file inside a sandbox, as root there may. Text comes as numbered lines (like `cat -n`),
        binary as base64; each call returns at most the policy's files.max_read_bytes. When `truncated` is
        true, call again with offset=next_offset (lines for text, bytes for base64) to read on."""
        return await SandboxFiles(_service(ctx)).read(sandbox_id, path, offset, limit, encoding)

    @mcp.tool(annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=False))
    @agent_errors
    async def write_file(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        path: SandboxPath,
        content: Annotated[str, Field(description="the whole new content of the file")],
        encoding: Annotated[
            Literal["utf-8", "base64"], Field(description="how `content` is given: text, or base64 of bytes")
        ] = "utf-8",
        mode: Annotated[
            str | None,
            Field(
                description="permission bits in octal, e.g. '755' (default: the old file's, or 644)",
                max_length=8,
            ),
        ] = None,
        make_parents: Annotated[bool, Field(description="create missing parent directories")] = False,
    ) -> FileWriteResult:
        """Create or replace a file inside a sandbox, atomically: readers see the old file or the new one,
        never a part, and a failed write leaves the old file as it was. Capped by files.max_write_bytes."""
        return await SandboxFiles(_service(ctx)).write(
            sandbox_id, path, content, encoding, mode, make_parents
        )

    @mcp.tool(
        annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=False, open_world_hint=False)
    )
    @agent_errors
    async def edit_file(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        path: SandboxPath,
        old: Annotated[
            str, Field(description="the exact text to replace (whitespace and newlines included)")
        ],
        new: Annotated[str, Field(description="the text to put in its place")],
        count: Annotated[
            int,
            Field(
                description="how many occurrences of `old` there must be; all of them are replaced",
                ge=1,
                le=_HUGE,
            ),
        ] = 1,
    ) -> FileEditResult:
        """Replace exact text in a file inside a sandbox, atomically. Refused, changing nothing, when `old`
        is not found or occurs a different number of times than `count` (the error says how many)."""
        return await SandboxFiles(_service(ctx)).edit(sandbox_id, path, old, new, count)

    @mcp.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    @agent_errors
    async def list_files(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        path: SandboxPath = "/",
        pattern: Annotated[
            str | None, Field(description="only names matching this glob, e.g. '*.py'", max_length=256)
        ] = None,
        depth: Annotated[
            int, Field(description="1: the directory's own entries; more: descend", ge=1, le=32)
        ] = 1,
        max_entries: Annotated[
            int | None,
            Field(description="at most this many (capped by files.max_list_entries)", ge=1, le=_HUGE),
        ] = None,
    ) -> FileList:
        """List a directory inside a sandbox: type, size, permissions and modification time of each entry;
        symlinks show their target and are never followed."""
        return await SandboxFiles(_service(ctx)).list(sandbox_id, path, pattern, depth, max_entries)

    @mcp.tool(
        annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=False, open_world_hint=False)
    )
    @agent_errors
    async def destroy_sandbox(ctx: ServiceContext, sandbox_id: SandboxId) -> DestroyResult:
        """Stop a sandbox and delete everything in it."""
        await _service(ctx).destroy(sandbox_id)
        return DestroyResult(sandbox_id=sandbox_id, destroyed=True)

    @mcp.tool(annotations=ToolAnnotations(destructive_hint=False, open_world_hint=False))
    @agent_errors
    async def expose_port(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        sandbox_port: Annotated[
            int, Field(description="TCP port a server listens on inside the sandbox", ge=1, le=65535)
        ],
        host_address: Annotated[
            str | None,
            Field(
                description="host address to listen on (default: the policy's first, normally 127.0.0.1)",
                max_length=64,
            ),
        ] = None,
    ) -> ExposedPort:
        """Make a TCP port of the sandbox reachable from the host: returns the host address (host:port, a
        free port) that forwards to the port on the sandbox's loopback (127.0.0.1 or ::1 inside).

        Works under every network policy; it only leads in, never gives the sandbox a way out. Lasts
        until unexpose_port or the sandbox's end. The server need not be running yet."""
        return await _service(ctx).expose_port(sandbox_id, sandbox_port, host_address)

    @mcp.tool(annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False))
    @agent_errors
    async def unexpose_port(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        sandbox_port: Annotated[
            int, Field(description="the sandbox port given to expose_port", ge=1, le=65535)
        ],
    ) -> UnexposedPort:
        """Stop forwarding a port exposed with expose_port; its open connections are closed."""
        await _service(ctx).unexpose_port(sandbox_id, sandbox_port)
        return UnexposedPort(sandbox_id=sandbox_id, sandbox_port=sandbox_port, unexposed=True)

    @mcp.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    @agent_errors
    async def list_sandboxes(ctx: ServiceContext) -> SandboxList:
        """List your live sandboxes with their limits and expiry times."""
        return SandboxList(sandboxes=_service(ctx).list())

    @mcp.tool(
        annotations=ToolAnnotations(destructive_hint=False, idempotent_hint=False, open_world_hint=False)
    )
    @agent_errors
    async def extend_sandbox(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        seconds: Annotated[int, Field(description="how much longer the sandbox may live", ge=1, le=_HUGE)],
    ) -> SandboxInfo:
        """Let a sandbox live longer before it is destroyed automatically, up to its policy's longest
        lifetime (get_policy: limits.max.ttl_seconds, counted from its creation). Returns the new expiry."""
        return await _service(ctx).extend(sandbox_id, seconds)

    @mcp.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    @agent_errors
    async def list_images(ctx: ServiceContext) -> ImageList:
        """List the images sandboxes can start from: description, size, os-release, what each contains, and
        which of your policies allow it (create_sandbox(image=NAME, policy=...))."""
        return await _service(ctx).list_images()

    @mcp.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    @agent_errors
    async def get_policy(
        ctx: ServiceContext,
        name: Annotated[str, Field(description="policy name", max_length=32)] = "default",
    ) -> PolicyDocument:
        """Show an operator policy: default and maximum limits, exec and file rules, network mode."""
        return _policy_document(policies, name)

    register_features(mcp, policies, agent_errors)
    return mcp
