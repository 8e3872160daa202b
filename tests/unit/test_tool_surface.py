"""What a model sees of the tools, through the real MCP client: strict arguments refused in plain
words, each result sent once with a short summary, and metadata that says what each tool does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp.client import Client
from mcp_types import CallToolResult

from nspawn_mcp.app import build_server
from nspawn_mcp.policy import PolicySet
from nspawn_mcp.policy.loader import shipped_policy_dir
from nspawn_mcp.service import SandboxService
from tests.unit.fake_backend import FakeBackend, ok

pytestmark = pytest.mark.anyio

_MiB = 1 << 20


@pytest.fixture
def backend(tmp_path: Path) -> FakeBackend:
    (tmp_path / "staging").mkdir()
    return FakeBackend(staging_dir=tmp_path / "staging")


def _server_for(backend: FakeBackend, tmp_path: Path, policies: PolicySet) -> Any:
    @asynccontextmanager
    async def open_service() -> AsyncIterator[SandboxService]:
        yield SandboxService(backend, policies, records_dir=tmp_path / "state", cwd=str(tmp_path))

    return build_server(open_service, policies)


@pytest.fixture
async def client(backend: FakeBackend, tmp_path: Path) -> AsyncIterator[Client]:
    async with Client(_server_for(backend, tmp_path, PolicySet.load([shipped_policy_dir()]))) as connected:
        yield connected


@pytest.fixture
async def sandbox(client: Client) -> str:
    created = await client.call_tool("create_sandbox", {})
    assert created.structured_content is not None
    return str(created.structured_content["sandbox_id"])


def _text(result: CallToolResult) -> str:
    return "\n".join(getattr(part, "text", "") for part in result.content)


def _has_null(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_has_null(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_null(v) for v in value)
    return False


# -- arguments -------------------------------------------------------------------------------


async def test_an_unknown_argument_is_refused_naming_it_and_what_is_allowed(
    client: Client, backend: FakeBackend, sandbox: str
) -> None:
    result = await client.call_tool(
        "exec_in_sandbox", {"sandbox_id": sandbox, "command": "sleep 9", "timeout": 1}
    )
    assert result.is_error
    assert _text(result) == (
        "unknown argument 'timeout' (did you mean 'timeout_seconds'?): exec_in_sandbox takes sandbox_id, "
        "command, cwd, env, stdin, timeout_seconds, user, background, keep, include_base64"
    )
    assert backend.commands == []  # nothing ran without the timeout the caller meant
    # the control: the same call with the real name runs
    ran = await client.call_tool(
        "exec_in_sandbox", {"sandbox_id": sandbox, "command": "sleep 9", "timeout_seconds": 1}
    )
    assert not ran.is_error
    assert [spec.timeout_seconds for _, spec in backend.commands] == [1]


async def test_create_sandbox_refuses_a_network_switch_it_does_not_have(
    client: Client, backend: FakeBackend
) -> None:
    result = await client.call_tool("create_sandbox", {"network": True})
    assert result.is_error
    assert _text(result).startswith("unknown argument 'network': create_sandbox takes image, policy, ")
    assert backend.sandboxes == {}  # no quiet no-network sandbox
    assert not (await client.call_tool("create_sandbox", {})).is_error


async def test_the_input_schemas_forbid_unknown_arguments(client: Client) -> None:
    for tool in (await client.list_tools()).tools:
        assert tool.input_schema["additionalProperties"] is False, tool.name


async def test_validation_errors_are_one_plain_line_per_problem(client: Client, sandbox: str) -> None:
    result = await client.call_tool(
        "create_sandbox",
        {
            "memory_mb": "lots",
            "cpus": "inf",
            "mounts": [{"host": "/srv", "hostx": "secret-value"}],
            "env": {"A": 1},
        },
    )
    assert result.is_error
    assert _text(result).splitlines() == [
        "memory_mb: must be a valid integer, unable to parse string as an integer",
        "cpus: must be a finite number",
        "mounts[0].sandbox: is required",
        "mounts[0].hostx: unknown field; allowed: host, sandbox, writable",
        "env.A: must be a valid string",
    ]
    argv = await client.call_tool("exec_in_sandbox", {"sandbox_id": sandbox, "command": ["ls", 3]})
    assert _text(argv) == "command[1]: must be a valid string"  # the list shape was meant: said once
    shape = await client.call_tool("exec_in_sandbox", {"sandbox_id": sandbox, "command": 5})
    assert _text(shape) == "command: must be a string or a list of strings"
    missing = await client.call_tool("exec_in_sandbox", {})
    assert _text(missing).splitlines() == ["sandbox_id: is required", "command: is required"]
    for text in (_text(result), _text(argv), _text(shape), _text(missing)):
        for noise in (
            "validation error",
            "pydantic",
            "https://",
            "Error executing tool",
            "input_value",
            "lots",
        ):
            assert noise not in text
    assert "secret-value" not in _text(result)  # values are never echoed


async def test_tool_errors_carry_no_prefix(client: Client) -> None:
    result = await client.call_tool("destroy_sandbox", {"sandbox_id": "sbx-00000000"})
    assert result.is_error
    assert _text(result).startswith("no sandbox sbx-00000000")


@pytest.mark.parametrize(
    ("tool", "field", "value", "allowed"),
    [
        ("exec_in_sandbox", "user", "nobody", "user: must be 'root' or 'sandbox'"),
        ("kill_process", "signal", "SEGV", "signal: must be 'TERM', 'KILL', 'INT', 'HUP', 'QUIT', 'USR1', "),
        ("copy_file", "direction", "sideways", "direction: must be 'to_sandbox' or 'from_sandbox'"),
        ("exec_in_sandbox", "keep", "middle", "keep: must be 'head' or 'tail'"),
    ],
)
async def test_closed_sets_are_enums_that_refuse_anything_else(
    client: Client, sandbox: str, tool: str, field: str, value: str, allowed: str
) -> None:
    schema = {t.name: t.input_schema for t in (await client.list_tools()).tools}[tool]
    assert value not in schema["properties"][field]["enum"]
    base = {
        "exec_in_sandbox": {"sandbox_id": sandbox, "command": "id"},
        "kill_process": {"sandbox_id": sandbox, "process_id": "p1"},
        "copy_file": {"sandbox_id": sandbox, "source": "a", "destination": "/b"},
    }[tool]
    result = await client.call_tool(tool, {**base, field: value})
    assert result.is_error
    assert _text(result).startswith(allowed)


async def test_the_unprivileged_user_is_accepted(client: Client, backend: FakeBackend, sandbox: str) -> None:
    result = await client.call_tool(
        "exec_in_sandbox", {"sandbox_id": sandbox, "command": "id", "user": "sandbox"}
    )
    assert not result.is_error
    assert backend.commands[-1][1].user == "sandbox"


# -- results ---------------------------------------------------------------------------------


async def test_a_result_is_sent_once_with_a_short_summary(
    client: Client, backend: FakeBackend, sandbox: str
) -> None:
    stdout = b"".join(b"line %d\n" % i for i in range(10_000))
    backend.on_exec = lambda spec: ok(stdout=stdout, stderr=b"warning: x\n", exit_code=2)
    result = await client.call_tool("exec_in_sandbox", {"sandbox_id": sandbox, "command": "make"})
    assert result.structured_content is not None
    assert result.structured_content["stdout"] == stdout.decode()
    assert _text(result) == (
        "exit code 2 after 1 ms\n"
        "stdout 96.6 KiB, stderr 11 bytes\n"
        "stdout:\n  line 0\n  line 1\n  line 2\n  [... 9994 more lines ...]\n"
        "  line 9997\n  line 9998\n  line 9999\n"
        "stderr:\n  warning: x"
    )
    assert len(result.content) == 1
    assert not _has_null(result.structured_content)
    assert "signal" not in result.structured_content  # absent, not null


async def test_no_result_carries_null_fields(client: Client, sandbox: str) -> None:
    results = [
        await client.call_tool("list_sandboxes", {}),
        await client.call_tool("exec_in_sandbox", {"sandbox_id": sandbox, "command": "true"}),
        await client.call_tool(
            "exec_in_sandbox", {"sandbox_id": sandbox, "command": "serve", "background": True}
        ),
        await client.call_tool("list_processes", {"sandbox_id": sandbox}),
        await client.call_tool("list_images", {}),
    ]
    for result in results:
        assert not result.is_error
        assert not _has_null(result.structured_content)


def _lines(prefix: bytes, count: int) -> bytes:
    return b"".join(b"%s %07d\n" % (prefix, i) for i in range(count))


@pytest.mark.parametrize("keep", ["head", "tail"])
async def test_the_output_cap_bounds_the_whole_reply_and_keeps_the_chosen_end(
    client: Client, backend: FakeBackend, sandbox: str, keep: str
) -> None:
    big = _lines(b"out", 100_000)  # 1.2 MiB each, over the default policy's 1 MiB cap
    backend.on_exec = lambda spec: ok(stdout=big, stderr=_lines(b"err", 100_000))
    result = await client.call_tool("exec_in_sandbox", {"sandbox_id": sandbox, "command": "x", "keep": keep})
    reply = result.structured_content
    assert reply is not None
    assert len(reply["stdout"]) + len(reply["stderr"]) == _MiB
    assert reply["truncated"] is True
    assert reply["kept"] == keep
    edge = "0000000" if keep == "head" else "0099999"
    assert edge in reply["stdout"].splitlines()[0 if keep == "head" else -1]
    assert edge in reply["stderr"].splitlines()[0 if keep == "head" else -1]
    assert len(_text(result)) < 1000
    assert f"output truncated (the {keep} kept)" in _text(result)


async def test_base64_copies_count_in_the_cap(client: Client, backend: FakeBackend, sandbox: str) -> None:
    backend.on_exec = lambda spec: ok(stdout=b"x" * (2 * _MiB))
    result = await client.call_tool(
        "exec_in_sandbox", {"sandbox_id": sandbox, "command": "x", "include_base64": True}
    )
    reply = result.structured_content
    assert reply is not None
    assert len(reply["stdout"]) + len(reply["stdout_base64"]) <= _MiB


async def test_a_tail_read_of_a_background_process_skips_to_the_newest_output(
    client: Client, backend: FakeBackend, sandbox: str
) -> None:
    backend.process_output = _lines(b"log", 200_000)  # 2.3 MiB written so far
    await client.call_tool("exec_in_sandbox", {"sandbox_id": sandbox, "command": "serve", "background": True})
    head = await client.call_tool("read_process_output", {"sandbox_id": sandbox, "process_id": "p1"})
    tail = await client.call_tool(
        "read_process_output", {"sandbox_id": sandbox, "process_id": "p1", "keep": "tail"}
    )
    assert head.structured_content is not None
    assert tail.structured_content is not None
    assert head.structured_content["stdout"].startswith("log 0000000\n")
    assert head.structured_content["more"] is True
    assert "skipped_bytes" not in head.structured_content
    assert tail.structured_content["stdout"].endswith("log 0199999\n")
    assert tail.structured_content["skipped_bytes"] == len(backend.process_output) - _MiB
    assert tail.structured_content["next_cursor"] == f"{len(backend.process_output)}:0"


async def test_kill_process_reports_the_state_after_the_signal(
    client: Client, backend: FakeBackend, sandbox: str
) -> None:
    for _ in range(2):
        await client.call_tool(
            "exec_in_sandbox", {"sandbox_id": sandbox, "command": "serve", "background": True}
        )
    killed = await client.call_tool("kill_process", {"sandbox_id": sandbox, "process_id": "p1"})
    assert killed.structured_content is not None
    assert killed.structured_content["running"] is False
    assert killed.structured_content["signal"] == 15
    assert killed.structured_content["signalled"] == "TERM"
    assert _text(killed) == "sent SIGTERM to p1; it has ended: killed by signal 15"
    # a process that survives its signal is said to be running, not guessed ended
    backend.ignored_signals.add(1)
    survived = await client.call_tool(
        "kill_process", {"sandbox_id": sandbox, "process_id": "p2", "signal": "HUP"}
    )
    assert survived.structured_content is not None
    assert survived.structured_content["running"] is True
    assert _text(survived) == "sent SIGHUP to p2; it is still running"


# -- metadata --------------------------------------------------------------------------------


def _strings_and_numbers(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    kinds = [schema, *schema.get("anyOf", ())]
    for kind in kinds:
        if kind.get("type") in ("string", "integer", "number"):
            yield path, kind
        if "items" in kind:
            yield from _strings_and_numbers(kind["items"], path + "[]")
        if isinstance(kind.get("additionalProperties"), dict):
            yield from _strings_and_numbers(kind["additionalProperties"], path + ".*")


async def test_every_tool_has_a_title_plain_description_annotations_and_output_schema(client: Client) -> None:
    tools = (await client.list_tools()).tools
    assert len(tools) == 23
    for tool in tools:
        assert tool.title, tool.name
        assert tool.description, tool.name
        assert "\n " not in tool.description, tool.name  # no docstring indentation
        assert not tool.description.startswith((" ", "\n")), tool.name
        assert tool.output_schema is not None, tool.name
        assert tool.output_schema["type"] == "object", tool.name
        hints = tool.annotations
        assert hints is not None
        assert None not in (hints.read_only_hint, hints.idempotent_hint, hints.open_world_hint), tool.name
        assert hints.read_only_hint or hints.destructive_hint is not None, tool.name
        for path, kind in _strings_and_numbers_in(tool.input_schema):
            bound = "maxLength" if kind["type"] == "string" else "maximum"
            assert bound in kind or "enum" in kind, f"{tool.name}: {path} has no {bound}"


def _strings_and_numbers_in(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, prop in schema["properties"].items():
        yield from _strings_and_numbers(prop, name)


async def test_the_annotations_say_what_each_tool_does(client: Client) -> None:
    hints = {tool.name: tool.annotations for tool in (await client.list_tools()).tools}
    destructive = {name for name, h in hints.items() if h is not None and h.destructive_hint}
    read_only = {name for name, h in hints.items() if h is not None and h.read_only_hint}
    assert destructive == {
        "exec_in_sandbox",
        "kill_process",
        "copy_file",  # replaces host files
        "write_file",
        "edit_file",
        "destroy_sandbox",
        "unexpose_port",
        "restore_sandbox",  # loses what was written since the snapshot
        "delete_snapshot",
    }
    assert read_only == {
        "read_process_output",
        "list_processes",
        "read_file",
        "list_files",
        "list_sandboxes",
        "list_images",
        "get_policy",
        "list_snapshots",
    }
    # the shipped policies offer network (dev, egress-web): only making sandboxes and running reach it
    open_world = {name for name, h in hints.items() if h is not None and h.open_world_hint}
    assert open_world == {"create_sandbox", "exec_in_sandbox", "fork_sandbox"}


async def test_without_network_policies_no_tool_is_open_world(backend: FakeBackend, tmp_path: Path) -> None:
    offline = tmp_path / "policies"
    offline.mkdir()
    (offline / "default.toml").write_text('[network]\nmode = "none"\n')
    async with Client(_server_for(backend, tmp_path, PolicySet.load([offline]))) as client:
        tools = (await client.list_tools()).tools
    assert all(t.annotations is not None and t.annotations.open_world_hint is False for t in tools)
