"""The MCP Inspector's command-line mode (``--cli``, the npm package a user runs with npx) against
``nspawn-mcp serve`` over stdio: what a person trying the server by hand sees.

Each Inspector call is a process of its own, hence a new MCP connection, so the round trip uses a
policy that keeps sandboxes when their client disconnects (the same uid finds them again on the next
connection); what is left at the end is asked of machined, not of the server.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.e2e.conftest import _PASSED_ENVIRONMENT, SERVER
from tests.e2e.leaks import machines_and_images
from tests.e2e.node.node_tools import NodeTools

pytestmark = pytest.mark.e2e

CALL_TIMEOUT = 120


def inspector(
    tools: NodeTools, method: str, *options: str, serve_options: tuple[str, ...] = (), cwd: Path
) -> tuple[int, dict[str, Any]]:
    """``inspector --cli --method METHOD OPTIONS -- nspawn-mcp serve SERVE_OPTIONS``: its exit code and the
    JSON it prints (the result, or for a tool error the result and then an error envelope)."""
    passed = [f"{key}={os.environ[key]}" for key in _PASSED_ENVIRONMENT if key in os.environ]
    command = [
        str(tools.node),
        str(tools.inspector),
        "--cli",
        "--format",
        "json",
        "--quiet",
        "--cwd",
        str(cwd),
    ]
    command += [argument for variable in passed for argument in ("-e", variable)]
    command += ["--method", method, *options, "--", str(SERVER), "serve", *serve_options]
    ran = subprocess.run(
        command, cwd=cwd, env=tools.environment(), capture_output=True, text=True, timeout=CALL_TIMEOUT
    )
    decoded, _ = json.JSONDecoder().raw_decode(ran.stdout.lstrip() or "{}")
    assert isinstance(decoded, dict), ran.stdout
    return ran.returncode, decoded


def result_of(tools: NodeTools, method: str, *options: str, cwd: Path, **keywords: Any) -> dict[str, Any]:
    """The result of an Inspector call that must succeed."""
    code, printed = inspector(tools, method, *options, cwd=cwd, **keywords)
    assert code == 0, printed
    assert "result" in printed, printed
    result: dict[str, Any] = printed["result"]
    return result


def call_tool(
    tools: NodeTools, name: str, arguments: dict[str, Any], cwd: Path, policies: Path
) -> dict[str, Any]:
    """``tools/call`` of a tool that must succeed: its structured content."""
    options = ("--tool-name", name, "--tool-args-json", json.dumps(arguments))
    result = result_of(tools, "tools/call", *options, cwd=cwd, serve_options=("--policy-dir", str(policies)))
    assert not result.get("isError"), result
    structured: dict[str, Any] = result["structuredContent"]
    return structured


def test_the_inspector_lists_the_tools_with_their_schemas(
    box_lifetime: None, node_tools: NodeTools, workdir: Path
) -> None:
    tools = result_of(node_tools, "tools/list", cwd=workdir)["tools"]
    names = {tool["name"] for tool in tools}
    assert {"create_sandbox", "exec_in_sandbox", "destroy_sandbox", "list_sandboxes"} <= names
    for tool in tools:
        assert tool["description"], tool["name"]
        assert tool["inputSchema"]["type"] == "object", tool["name"]


def test_the_inspector_creates_runs_in_and_destroys_a_sandbox(
    daemon_with_policies: Path, node_tools: NodeTools, workdir: Path
) -> None:
    (daemon_with_policies / "kept.toml").write_text('[sandboxes]\non_disconnect = "keep"\n')
    created = call_tool(node_tools, "create_sandbox", {"policy": "kept"}, workdir, daemon_with_policies)
    sandbox = created["sandbox_id"]
    try:
        ran = call_tool(
            node_tools,
            "exec_in_sandbox",
            {"sandbox_id": sandbox, "command": "echo made by the inspector; id -u"},
            workdir,
            daemon_with_policies,
        )
        assert (ran["exit_code"], ran["stdout"]) == (0, "made by the inspector\n0\n")
        listed = call_tool(node_tools, "list_sandboxes", {}, workdir, daemon_with_policies)
        assert [s["sandbox_id"] for s in listed["sandboxes"]] == [sandbox]
    finally:
        call_tool(node_tools, "destroy_sandbox", {"sandbox_id": sandbox}, workdir, daemon_with_policies)
    machines, images = anyio.run(machines_and_images)
    assert sandbox not in machines | images  # what machined reports, not what the server believes


def test_the_inspector_sees_a_refusal_as_a_tool_error(
    box_lifetime: None, node_tools: NodeTools, workdir: Path
) -> None:
    options = ("--tool-name", "create_sandbox", "--tool-args-json", json.dumps({"policy": "no-such-policy"}))
    code, printed = inspector(node_tools, "tools/call", *options, cwd=workdir)
    assert code != 0  # the Inspector exits non-zero on a tool error
    assert printed["result"]["isError"] is True
    text = " ".join(part["text"] for part in printed["result"]["content"])
    assert "no-such-policy" in text  # what was wrong
    assert "default" in text  # and what is allowed


def test_the_inspector_lists_resources_and_reads_a_policy(
    box_lifetime: None, node_tools: NodeTools, workdir: Path
) -> None:
    assert isinstance(result_of(node_tools, "resources/list", cwd=workdir)["resources"], list)
    templates = result_of(node_tools, "resources/templates/list", cwd=workdir)["resourceTemplates"]
    assert "policy://{name}" in {template["uriTemplate"] for template in templates}
    read = result_of(node_tools, "resources/read", "--uri", "policy://default", cwd=workdir)
    assert "default" in read["contents"][0]["text"]


def test_the_inspector_lists_and_gets_the_workflow_prompt(
    box_lifetime: None, node_tools: NodeTools, workdir: Path
) -> None:
    prompts = result_of(node_tools, "prompts/list", cwd=workdir)["prompts"]
    assert "sandbox_workflow" in {prompt["name"] for prompt in prompts}
    got = result_of(node_tools, "prompts/get", "--prompt-name", "sandbox_workflow", cwd=workdir)
    text = " ".join(message["content"]["text"] for message in got["messages"])
    assert "create_sandbox" in text
    assert "destroy_sandbox" in text
