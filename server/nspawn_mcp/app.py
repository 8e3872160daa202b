"""The MCP tools: parse, call the service, format. Nothing else (resources, prompts: :mod:`.features`)."""

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
from pydantic import BaseModel, ConfigDict, Field

from . import __version__
from .backend.api import OutputChunk
from .commands import CommandRequest, SignalName
from .errors import SandboxError
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
    ForkResult,
    ImageList,
    PolicyDocument,
    ProcessInfo,
    ProcessList,
    ProcessOutputResult,
    RestoreResult,
    SandboxInfo,
    SandboxList,
    SnapshotDeleted,
    SnapshotInfo,
    SnapshotList,
    StdinWritten,
    UnexposedPort,
)
from .policy import CreateRequest, MountRequest, PolicySet
from .service import SandboxService
from .throttle import Throttle
from .toolkit import ToolSet

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
SnapshotName = Annotated[
    str,
    Field(description="a snapshot's name (snapshot_sandbox, list_snapshots), like 'snap-1'", max_length=64),
]
ProcessId = Annotated[
    str, Field(description="id returned by exec_in_sandbox(background=true), like 'p1'", max_length=16)
]


class MountSpec(BaseModel):
    """One bind of a host path into the sandbox."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(description="host path, under one of the policy's mounts.allowed", max_length=4096)
    sandbox: str = Field(description="absolute path inside the sandbox, e.g. /work", max_length=4096)
    writable: bool = Field(default=False, description="read-write, if the policy allows it for that path")


_HUGE = 1 << 53
"""Schema bound of numeric arguments: far above any policy (which names the rule that refuses), low
enough that no arithmetic on them overflows."""

_MAX_TEXT = 96 << 20
"""Schema bound of text arguments (file content, stdin): above any policy's cap (64 MiB, in base64)."""

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

    # openWorldHint: a sandbox's commands reach beyond the host only where a policy offers network
    network_offered = any(policies.get(name).network.mode != "none" for name in policies.names)
    tool = ToolSet()

    @tool(
        title="Create a sandbox",
        annotations=ToolAnnotations(
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=network_offered,
        ),
        description="""
        Create a fresh, isolated Linux sandbox and return its sandbox_id, limits and expiry. Use it first;
        every other tool takes the sandbox_id. list_images shows the images, get_policy what a policy allows
        (limits, network, mounts); omitted limits take the policy's defaults.

        env sets variables for every command (at most 64; names of letters, digits and '_'). It is not for
        secrets: values are stored in the sandbox's record and visible to everything in it.

        Errors: 'policy rule: X' means the operator's policy X refused the request (ask for less, or another
        policy); 'unknown policy' lists the policies offered; a quota error means too many live sandboxes:
        destroy one first.""",
    )
    @agent_errors
    async def create_sandbox(
        ctx: ServiceContext,
        image: Annotated[
            str, Field(description="image to start from (list_images)", max_length=32)
        ] = "default",
        policy: Annotated[
            str, Field(description="operator policy that sets what is allowed (get_policy)", max_length=32)
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
            dict[str, Annotated[str, Field(max_length=32 << 10)]] | None,
            Field(
                description="environment variables for every command in this sandbox (a command's own env "
                "wins); not for secrets",
                max_length=64,
            ),
        ] = None,
    ) -> SandboxInfo:
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

    @tool(
        title="Run a command in a sandbox",
        annotations=ToolAnnotations(
            read_only_hint=False,
            destructive_hint=True,
            idempotent_hint=False,
            open_world_hint=network_offered,
        ),
        description="""
        Run a command in a sandbox and wait for it: exit_code (or signal), stdout and stderr kept apart,
        timed_out, truncated. A shell string runs under /bin/sh -c; an argv list runs without a shell.
        Runs as root inside the sandbox (uid 0 there only) unless user='sandbox'.

        Output: stdout and stderr together are capped by the policy's exec.max_output_bytes (1 MiB by
        default); past it truncated=true and keep decides which end you get: 'head' (default) the start,
        'tail' the end (a build's or test run's summary). The command is killed after timeout_seconds
        (policy default and maximum), with everything it started.

        For servers and long jobs use background=true: it returns a process_id at once; then use
        read_process_output, write_process_stdin, kill_process, list_processes. Clients that send a
        progress token get the newest output lines as progress notifications.

        Errors: 'no sandbox' means the id is wrong or the sandbox expired; 'policy rule: X' names the limit
        that refused. A non-zero exit code is not an error: it is in the result.""",
    )
    @agent_errors
    async def exec_in_sandbox(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        command: Annotated[
            Annotated[str, Field(max_length=1 << 20)]
            | Annotated[list[Annotated[str, Field(max_length=1 << 20)]], Field(max_length=4096)],
            Field(description="a shell command string (run by /bin/sh -c) or an argv list (no shell)"),
        ],
        cwd: Annotated[
            str | None,
            Field(description="working directory inside the sandbox (default: home)", max_length=4096),
        ] = None,
        env: Annotated[
            dict[str, Annotated[str, Field(max_length=32 << 10)]] | None,
            Field(description="extra environment variables", max_length=256),
        ] = None,
        stdin: Annotated[
            str | None, Field(description="text fed to the command's standard input", max_length=_MAX_TEXT)
        ] = None,
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
            Literal["root", "sandbox"],
            Field(description="'root' (uid 0 inside the sandbox only) or the image's unprivileged 'sandbox'"),
        ] = "root",
        background: Annotated[
            bool, Field(description="start and return a process_id at once; read its output later")
        ] = False,
        keep: Annotated[
            Literal["head", "tail"],
            Field(description="when the output is over the cap: keep its start (head) or its end (tail)"),
        ] = "head",
        include_base64: Annotated[
            bool,
            Field(
                description="also return the exact bytes as stdout_base64/stderr_base64 (counted in the cap)"
            ),
        ] = False,
    ) -> ExecResult:
        service = _service(ctx)
        request = CommandRequest(
            command=command, cwd=cwd, env=env, stdin=stdin, timeout_seconds=timeout_seconds, user=user
        )
        if background:
            return await service.start_background(sandbox_id, request)
        return await service.exec(
            sandbox_id, request, include_base64=include_base64, keep=keep, on_output=_progress_reporter(ctx)
        )

    @tool(
        title="Read a background process's output",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
        description="""
        Read what a background process (exec_in_sandbox with background=true) wrote after a cursor, with
        its state: running, or its exit_code/signal once it ended. Pass the returned next_cursor as since
        to read only newer output; more=true means more is already waiting. Each read returns at most the
        policy's exec.max_output_bytes per stream: keep='head' (default) reads on in order, keep='tail'
        skips to the newest output (skipped_bytes says how much was passed over).

        Errors: 'no background process' means the process_id is wrong (list_processes shows them).""",
    )
    @agent_errors
    async def read_process_output(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        process_id: ProcessId,
        since: Annotated[
            str | None,
            Field(
                description="next_cursor from the previous read; omit to read from the start", max_length=40
            ),
        ] = None,
        keep: Annotated[
            Literal["head", "tail"],
            Field(description="when more is waiting than fits: read on in order (head) or the newest (tail)"),
        ] = "head",
    ) -> ProcessOutputResult:
        return await _service(ctx).read_process_output(sandbox_id, process_id, since, keep)

    @tool(
        title="Write to a background process's stdin",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False
        ),
        description="""
        Write text to the standard input of a background process; close=true ends its input (EOF). At most
        the policy's exec.max_stdin_bytes per call; written says how much was taken now: send the rest
        again if it is less.""",
    )
    @agent_errors
    async def write_process_stdin(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        process_id: ProcessId,
        data: Annotated[
            str, Field(description="text to write to the process's standard input", max_length=_MAX_TEXT)
        ],
        close: Annotated[bool, Field(description="close stdin afterwards (end of input)")] = False,
    ) -> StdinWritten:
        return await _service(ctx).write_process_stdin(sandbox_id, process_id, data, close)

    @tool(
        title="Signal a background process",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False
        ),
        description="""
        Send a signal to a background process: TERM (default) asks it to stop, KILL stops it and everything
        it started, INT/HUP/QUIT/USR1/USR2 as usual, STOP/CONT pause and resume it. The answer is the
        process's state after waiting briefly (up to 2 seconds) for it to end: running=true then means it
        is still running (it ignored the signal, or STOP/CONT), and KILL always ends it.""",
    )
    @agent_errors
    async def kill_process(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        process_id: ProcessId,
        signal: Annotated[SignalName, Field(description="the signal to send")] = "TERM",
    ) -> ProcessInfo:
        return await _service(ctx).kill_process(sandbox_id, process_id, signal)

    @tool(
        title="List background processes",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
        description="List a sandbox's background processes: id, command, running or how each ended.",
    )
    @agent_errors
    async def list_processes(ctx: ServiceContext, sandbox_id: SandboxId) -> ProcessList:
        return await _service(ctx).list_processes(sandbox_id)

    @tool(
        title="Copy files between host and sandbox",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False
        ),
        description="""
        Copy a regular file or a directory between the host and a sandbox. Host paths must lie in the
        policy's files.allowed_host_dirs (by default the client's working directory and below). An existing
        file at the destination is replaced (on the host too). A directory copied out of the sandbox needs
        a host destination that does not exist yet; one copied in is merged into the sandbox's directory.
        Regular files and directories only: symlinks, devices, FIFOs and sockets are left out and counted
        in skipped. Capped by files.max_copy_bytes. For files inside the sandbox alone, read_file and
        write_file need no host access.

        Errors: 'policy rule: files.allowed_host_dirs' means the host path is outside the allowed
        directories.""",
    )
    @agent_errors
    async def copy_file(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        source: Annotated[
            str,
            Field(
                description="file or directory to copy: a host path for to_sandbox, a sandbox path otherwise",
                max_length=4096,
            ),
        ],
        destination: Annotated[
            str,
            Field(
                description="where to put it: a sandbox path for to_sandbox, a host path otherwise",
                max_length=4096,
            ),
        ],
        direction: Annotated[Literal["to_sandbox", "from_sandbox"], Field(description="which way to copy")],
    ) -> CopyResult:
        service = _service(ctx)
        if direction == "to_sandbox":
            return await service.copy_to_sandbox(sandbox_id, source, destination)
        return await service.copy_from_sandbox(sandbox_id, source, destination)

    @tool(
        title="Read a file in a sandbox",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
        description="""
        Read a file inside a sandbox, as root there may. Text comes as numbered lines (like cat -n), binary
        as base64; each call returns at most the policy's files.max_read_bytes. When truncated is true,
        call again with offset=next_offset (lines for text, bytes for base64) to read on.""",
    )
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
        return await SandboxFiles(_service(ctx)).read(sandbox_id, path, offset, limit, encoding)

    @tool(
        title="Write a file in a sandbox",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
        ),
        description="""
        Create or replace a whole file inside a sandbox, atomically: readers see the old file or the new
        one, never a part, and a failed write leaves the old file as it was. Capped by the policy's
        files.max_write_bytes. To change part of a file, edit_file is cheaper.""",
    )
    @agent_errors
    async def write_file(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        path: SandboxPath,
        content: Annotated[str, Field(description="the whole new content of the file", max_length=_MAX_TEXT)],
        encoding: Annotated[
            Literal["utf-8", "base64"], Field(description="how content is given: text, or base64 of bytes")
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
        return await SandboxFiles(_service(ctx)).write(
            sandbox_id, path, content, encoding, mode, make_parents
        )

    @tool(
        title="Edit a file in a sandbox",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False
        ),
        description="""
        Replace exact text in a file inside a sandbox, atomically. Refused, changing nothing, when old is
        not found or occurs a different number of times than count (the error says how many): add
        surrounding lines to old to make it unique, or set count.""",
    )
    @agent_errors
    async def edit_file(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        path: SandboxPath,
        old: Annotated[
            str,
            Field(
                description="the exact text to replace (whitespace and newlines included)",
                min_length=1,
                max_length=_MAX_TEXT,
            ),
        ],
        new: Annotated[str, Field(description="the text to put in its place", max_length=_MAX_TEXT)],
        count: Annotated[
            int,
            Field(
                description="how many occurrences of old there must be; all of them are replaced",
                ge=1,
                le=_HUGE,
            ),
        ] = 1,
    ) -> FileEditResult:
        return await SandboxFiles(_service(ctx)).edit(sandbox_id, path, old, new, count)

    @tool(
        title="List files in a sandbox",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
        description="""
        List a directory inside a sandbox: type, size, permissions and modification time of each entry;
        symlinks show their target and are never followed. At most files.max_list_entries entries:
        truncated=true means there are more (narrow with pattern or depth).""",
    )
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
        return await SandboxFiles(_service(ctx)).list(sandbox_id, path, pattern, depth, max_entries)

    @tool(
        title="Destroy a sandbox",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False
        ),
        description="""
        Stop a sandbox and delete everything in it, with its processes and exposed ports. Files you need
        must be copied out first (copy_file from_sandbox). Sandboxes are also destroyed at their expiry.""",
    )
    @agent_errors
    async def destroy_sandbox(ctx: ServiceContext, sandbox_id: SandboxId) -> DestroyResult:
        await _service(ctx).destroy(sandbox_id)
        return DestroyResult(sandbox_id=sandbox_id, destroyed=True)

    @tool(
        title="Expose a sandbox port to the host",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False
        ),
        description="""
        Make a TCP port of the sandbox reachable from the host: returns the host address (host:port, a
        free port) that forwards to the port on the sandbox's loopback (127.0.0.1 or ::1 inside). Works
        under every network policy; it only leads in, never gives the sandbox a way out. Lasts until
        unexpose_port or the sandbox's end. The server need not be running yet.""",
    )
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
        return await _service(ctx).expose_port(sandbox_id, sandbox_port, host_address)

    @tool(
        title="Stop exposing a sandbox port",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False
        ),
        description="Stop forwarding a port exposed with expose_port; its open connections are closed.",
    )
    @agent_errors
    async def unexpose_port(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        sandbox_port: Annotated[
            int, Field(description="the sandbox port given to expose_port", ge=1, le=65535)
        ],
    ) -> UnexposedPort:
        await _service(ctx).unexpose_port(sandbox_id, sandbox_port)
        return UnexposedPort(sandbox_id=sandbox_id, sandbox_port=sandbox_port, unexposed=True)

    @tool(
        title="List your sandboxes",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
        description="List your live sandboxes with their images, policies, limits, exposed ports and expiry.",
    )
    @agent_errors
    async def list_sandboxes(ctx: ServiceContext) -> SandboxList:
        return SandboxList(sandboxes=_service(ctx).list())

    @tool(
        title="Extend a sandbox's lifetime",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False
        ),
        description="""
        Let a sandbox live longer before it is destroyed automatically, up to its policy's longest lifetime
        (get_policy: limits.max.ttl_seconds, counted from its creation). Returns the new expiry; past the
        maximum the error names the rule.""",
    )
    @agent_errors
    async def extend_sandbox(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        seconds: Annotated[int, Field(description="how much longer the sandbox may live", ge=1, le=_HUGE)],
    ) -> SandboxInfo:
        return await _service(ctx).extend(sandbox_id, seconds)

    @tool(
        title="Snapshot a sandbox",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False
        ),
        description="""
        Take a read-only checkpoint of a running sandbox's filesystem, in milliseconds (copy-on-write). Its
        processes are frozen for the instant it is taken, so writes in flight are either in or out. Use it
        before a risky change: restore_sandbox rolls back to it, fork_sandbox starts new sandboxes from it.
        Only files are kept: memory and processes are not.

        Snapshots go with their sandbox, unless keep=true and the policy lets snapshots be kept as images
        (get_policy: snapshots.keep_as_images): then it outlives the sandbox as the image named in
        kept_as_image (list_images), which create_sandbox(image=...) under the same policy starts from.
        The policy caps snapshots per sandbox (snapshots.max_per_sandbox); a refusal names the rule.""",
    )
    @agent_errors
    async def snapshot_sandbox(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        name: Annotated[
            str | None,
            Field(
                description="1-19 lower-case letters, digits and inner dashes (default: snap-N)",
                max_length=64,
            ),
        ] = None,
        keep: Annotated[
            bool, Field(description="keep it as an image after the sandbox is gone, if the policy allows")
        ] = False,
    ) -> SnapshotInfo:
        return await _service(ctx).snapshots.take(sandbox_id, name, keep)

    @tool(
        title="Fork a sandbox",
        annotations=ToolAnnotations(
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=network_offered,
        ),
        description="""
        Make count new sandboxes (yours) that start with a copy of this sandbox's files: its current
        filesystem (taken with its processes frozen for an instant, the same instant for all of them) or one
        of its snapshots. Memory and processes are not carried over: each fork starts with no processes
        running, like a new sandbox. Each fork has the parent's policy, limits, binds, network and env, its
        own expiry, and counts against the policy's sandbox quotas like a create_sandbox; they are
        independent of each other and of the parent. Returns the same fields create_sandbox does, per fork.
        Use it to try several approaches at once, then destroy the forks you do not keep.""",
    )
    @agent_errors
    async def fork_sandbox(
        ctx: ServiceContext,
        sandbox_id: SandboxId,
        snapshot: Annotated[
            str | None,
            Field(description="start from this snapshot (default: the current filesystem)", max_length=64),
        ] = None,
        count: Annotated[
            int, Field(description="how many forks (policy: snapshots.max_forks)", ge=1, le=64)
        ] = 1,
    ) -> ForkResult:
        return await _service(ctx).snapshots.fork(sandbox_id, snapshot, count)

    @tool(
        title="Restore a sandbox to a snapshot",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False
        ),
        description="""
        Roll a sandbox's filesystem back to one of its snapshots: everything written since is lost. Every
        process in it is ended and the sandbox starts again on the snapshot, with the same sandbox_id,
        limits, exposed ports, env, binds and network; background processes that were running are listed
        in gone_processes and their process_ids no longer answer. The snapshot stays, to restore again.""",
    )
    @agent_errors
    async def restore_sandbox(
        ctx: ServiceContext, sandbox_id: SandboxId, snapshot: SnapshotName
    ) -> RestoreResult:
        return await _service(ctx).snapshots.restore(sandbox_id, snapshot)

    @tool(
        title="List a sandbox's snapshots",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
        description="List a sandbox's snapshots: names, when each was taken, the image a kept one is.",
    )
    @agent_errors
    async def list_snapshots(ctx: ServiceContext, sandbox_id: SandboxId) -> SnapshotList:
        return _service(ctx).snapshots.listing(sandbox_id)

    @tool(
        title="Delete a snapshot",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False
        ),
        description="""
        Delete a snapshot of a sandbox (a kept one's image too), freeing its slot (snapshots.max_per_sandbox)
        and the disk only it held. The sandbox itself is not touched.""",
    )
    @agent_errors
    async def delete_snapshot(
        ctx: ServiceContext, sandbox_id: SandboxId, name: SnapshotName
    ) -> SnapshotDeleted:
        return await _service(ctx).snapshots.delete(sandbox_id, name)

    @tool(
        title="List images",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
        description="""
        List the images sandboxes can start from: description, size, os-release, what each contains, and
        which of your policies allow it (create_sandbox(image=NAME, policy=...)).""",
    )
    @agent_errors
    async def list_images(ctx: ServiceContext) -> ImageList:
        return await _service(ctx).list_images()

    @tool(
        title="Show a policy",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
        description="""
        Show an operator policy: default and maximum limits, exec and file rules, network mode, mounts and
        images allowed, and the names of every policy offered. Read it before asking create_sandbox for
        more than the defaults.""",
    )
    @agent_errors
    async def get_policy(
        ctx: ServiceContext,
        name: Annotated[str, Field(description="policy name", max_length=32)] = "default",
    ) -> PolicyDocument:
        return _policy_document(policies, name)

    mcp: MCPServer[SandboxService] = MCPServer(
        "nspawn-mcp",
        instructions=INSTRUCTIONS,
        version=__version__,
        lifespan=lifespan,
        token_verifier=token_verifier,
        auth=auth,
        tools=tool.tools,
    )

    register_features(mcp, policies, agent_errors)
    return mcp
