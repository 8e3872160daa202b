"""The MCP surface, in process: tool names and schemas, structured results, errors as isError text."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from mcp.client import Client

from nspawn_mcp.app import build_server
from nspawn_mcp.policy import PolicySet
from nspawn_mcp.policy.loader import shipped_policy_dir
from nspawn_mcp.service import SandboxService
from nspawn_mcp.throttle import Throttle
from tests.unit.fake_backend import FakeBackend, ok

pytestmark = pytest.mark.anyio


@pytest.fixture
def backend(tmp_path: Path) -> FakeBackend:
    (tmp_path / "staging").mkdir()
    return FakeBackend(staging_dir=tmp_path / "staging")


@pytest.fixture
async def client(backend: FakeBackend, tmp_path: Path) -> AsyncIterator[Client]:
    @asynccontextmanager
    async def open_service() -> AsyncIterator[SandboxService]:
        yield SandboxService(
            backend, PolicySet.load([shipped_policy_dir()]), records_dir=tmp_path / "state", cwd=str(tmp_path)
        )

    async with Client(build_server(open_service, PolicySet.load([shipped_policy_dir()]))) as connected:
        yield connected


async def test_the_tools_are_offered(client: Client) -> None:
    tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == {
        "create_sandbox",
        "exec_in_sandbox",
        "copy_file",
        "expose_port",
        "unexpose_port",
        "destroy_sandbox",
        "list_sandboxes",
        "extend_sandbox",
        "read_process_output",
        "write_process_stdin",
        "kill_process",
        "list_processes",
        "get_policy",
        "list_images",
        "read_file",
        "write_file",
        "edit_file",
        "list_files",
        "snapshot_sandbox",
        "fork_sandbox",
        "restore_sandbox",
        "list_snapshots",
        "delete_snapshot",
    }

    exec_schema = tools["exec_in_sandbox"].input_schema
    assert set(exec_schema["required"]) == {"sandbox_id", "command"}
    assert tools["destroy_sandbox"].annotations is not None
    assert tools["destroy_sandbox"].annotations.destructive_hint is True


async def test_a_sandbox_round_trip_returns_structured_results(client: Client, backend: FakeBackend) -> None:
    created = await client.call_tool("create_sandbox", {"memory_mb": 256})
    assert not created.is_error
    assert created.structured_content is not None
    sandbox = created.structured_content["sandbox_id"]
    assert created.structured_content["limits"]["memory_mb"] == 256

    backend.on_exec = lambda spec: ok(stdout=b"out", stderr=b"err", exit_code=3)
    result = await client.call_tool("exec_in_sandbox", {"sandbox_id": sandbox, "command": ["python3", "-V"]})
    assert result.structured_content is not None
    assert {k: result.structured_content[k] for k in ("exit_code", "stdout", "stderr", "timed_out")} == {
        "exit_code": 3,
        "stdout": "out",
        "stderr": "err",
        "timed_out": False,
    }

    listed = await client.call_tool("list_sandboxes", {})
    assert listed.structured_content is not None
    assert [s["sandbox_id"] for s in listed.structured_content["sandboxes"]] == [sandbox]
    destroyed = await client.call_tool("destroy_sandbox", {"sandbox_id": sandbox})
    assert destroyed.structured_content == {"sandbox_id": sandbox, "destroyed": True}


@pytest.mark.parametrize(
    ("tool", "arguments", "message"),
    [
        ("exec_in_sandbox", {"sandbox_id": "sbx-00000000", "command": "true"}, "no sandbox sbx-00000000"),
        ("destroy_sandbox", {"sandbox_id": "--bind=/:/x"}, "ids look like 'sbx-1a2b3c4d'"),
        ("create_sandbox", {"memory_mb": 1_000_000}, "policy rule: limits.max.memory"),
        ("create_sandbox", {"policy": "root"}, "unknown policy 'root'"),
        ("create_sandbox", {"image": "ubuntu"}, "policy rule: sandboxes.images"),
        (
            "copy_file",
            {"sandbox_id": "sbx-00000000", "source": "a", "destination": "/b", "direction": "sideways"},
            "to_sandbox",
        ),
    ],
)
async def test_errors_are_tool_results_that_say_what_is_allowed(
    client: Client, tool: str, arguments: dict[str, object], message: str
) -> None:
    result = await client.call_tool(tool, arguments)
    assert result.is_error
    text = " ".join(getattr(part, "text", "") for part in result.content)
    assert message in text
    assert "Traceback" not in text


async def test_copy_path_escapes_are_refused_with_the_rule(client: Client) -> None:
    created = (await client.call_tool("create_sandbox", {})).structured_content
    assert created is not None
    sandbox = created["sandbox_id"]
    for source in ("../../etc/shadow", "/etc/shadow", "/proc/self/root/etc/shadow"):
        result = await client.call_tool(
            "copy_file",
            {"sandbox_id": sandbox, "source": source, "destination": "/x", "direction": "to_sandbox"},
        )
        assert result.is_error
        assert "files.allowed_host_dirs" in result.content[0].text  # type: ignore[union-attr]


async def test_the_workflow_prompt_is_offered(client: Client) -> None:
    prompts = (await client.list_prompts()).prompts
    assert "sandbox_workflow" in [p.name for p in prompts]


async def test_output_is_streamed_as_progress(client: Client, backend: FakeBackend) -> None:
    created = (await client.call_tool("create_sandbox", {})).structured_content
    assert created is not None
    backend.on_exec = lambda spec: ok(stdout=b"line 1\nline 2\n")
    updates: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append(message)

    arguments = {"sandbox_id": created["sandbox_id"], "command": "build"}
    await client.call_tool("exec_in_sandbox", arguments, progress_callback=on_progress)
    assert updates == ["line 1\nline 2"]


async def test_background_commands_return_a_process_id(client: Client) -> None:
    created = (await client.call_tool("create_sandbox", {})).structured_content
    assert created is not None
    sandbox = created["sandbox_id"]
    started = await client.call_tool(
        "exec_in_sandbox", {"sandbox_id": sandbox, "command": "serve", "background": True}
    )
    assert started.structured_content is not None
    process = started.structured_content["process_id"]
    assert process == "p1"
    read = await client.call_tool("read_process_output", {"sandbox_id": sandbox, "process_id": process})
    assert read.structured_content is not None
    assert read.structured_content["stdout"] == "0123456789"
    assert read.structured_content["next_cursor"] == "10:0"


async def test_policies_are_readable_as_a_tool_and_a_resource(client: Client) -> None:
    shown = await client.call_tool("get_policy", {"name": "strict"})
    assert shown.structured_content is not None
    assert shown.structured_content["name"] == "strict"
    assert shown.structured_content["policy"]["network"]["mode"] == "none"
    assert "default" in shown.structured_content["available"]
    resource = await client.read_resource("policy://default")
    text = resource.contents[0].text  # type: ignore[union-attr]
    assert json.loads(text)["policy"]["limits"]["default"]["memory"] == "512MiB"
    missing = await client.call_tool("get_policy", {"name": "nope"})
    assert missing.is_error


async def test_calls_beyond_the_rate_limit_are_refused(backend: FakeBackend, tmp_path: Path) -> None:
    @asynccontextmanager
    async def open_service() -> AsyncIterator[SandboxService]:
        yield SandboxService(
            backend, PolicySet.load([shipped_policy_dir()]), records_dir=tmp_path / "state", cwd=str(tmp_path)
        )

    throttle = Throttle(rate=1, burst=3, clock=lambda: 0.0)
    server = build_server(open_service, PolicySet.load([shipped_policy_dir()]), throttle)
    async with Client(server) as client:
        results = [await client.call_tool("list_sandboxes", {}) for _ in range(5)]
    assert [r.is_error for r in results] == [False, False, False, True, True]
    assert "too many calls" in results[-1].content[0].text  # type: ignore[union-attr]


async def test_an_unexpected_error_reaches_the_agent_as_a_reference_only(
    client: Client, backend: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox = (await client.call_tool("create_sandbox", {})).structured_content["sandbox_id"]

    def broken(spec: object) -> object:
        raise PermissionError(13, "Permission denied", "/var/lib/nspawn-mcp/secret/host-path")

    backend.on_exec = broken  # type: ignore[assignment]
    result = await client.call_tool("exec_in_sandbox", {"sandbox_id": sandbox, "command": "true"})
    text = result.content[0].text  # type: ignore[union-attr]
    assert result.is_error
    assert "internal error in exec_in_sandbox (reference " in text
    for detail in ("/var/lib", "Permission", "Traceback"):
        assert detail not in text
    reference = text.split("reference ")[1].split(")")[0]
    assert any(reference in record.getMessage() and record.exc_info for record in caplog.records)
    # the control: the server keeps serving, and our own errors still say what was wrong
    destroyed = await client.call_tool("destroy_sandbox", {"sandbox_id": sandbox})
    assert not destroyed.is_error


async def test_absurd_numbers_are_refused_with_a_message(client: Client) -> None:
    result = await client.call_tool("create_sandbox", {"memory_mb": 10**400})
    assert result.is_error
    assert "memory_mb" in result.content[0].text  # type: ignore[union-attr]
    result = await client.call_tool("create_sandbox", {"memory_mb": 1 << 40})
    assert "limits.max.memory" in result.content[0].text  # type: ignore[union-attr]


async def test_file_tools_and_the_file_resource(client: Client, backend: FakeBackend) -> None:
    created = await client.call_tool("create_sandbox", {})
    assert created.structured_content is not None
    sandbox = created.structured_content["sandbox_id"]
    written = await client.call_tool(
        "write_file", {"sandbox_id": sandbox, "path": "/root/notes.txt", "content": "one\ntwo\n"}
    )
    assert not written.is_error
    read = await client.call_tool("read_file", {"sandbox_id": sandbox, "path": "/root/notes.txt"})
    assert read.structured_content is not None
    assert read.structured_content["content"] == "     1\tone\n     2\ttwo\n"
    ambiguous = await client.call_tool(
        "edit_file", {"sandbox_id": sandbox, "path": "/root/notes.txt", "old": "o", "new": "0"}
    )
    assert ambiguous.is_error
    resource = await client.read_resource(f"sandbox://{sandbox}/files/root/notes.txt")
    assert [getattr(c, "text", None) for c in resource.contents] == ["one\ntwo\n"]
    backend.files[(sandbox, "/root/blob")] = b"\x00\xff"
    blob = await client.read_resource(f"sandbox://{sandbox}/files/root/blob")
    assert [getattr(c, "blob", None) for c in blob.contents] == ["AP8="]
    with pytest.raises(Exception, match="does not exist"):
        await client.read_resource(f"sandbox://{sandbox}/files/root/missing")
    with pytest.raises(Exception, match="no sandbox sbx-00000000"):
        await client.read_resource("sandbox://sbx-00000000/files/etc/hostname")
