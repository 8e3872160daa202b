"""The official MCP conformance suite (server mode) against the daemon's streamable HTTP, as an operator
runs it.

The suite has no option for credentials, so a preloaded module (tests/e2e/node/bearer.mjs) adds the
bearer token made with ``nspawn-mcp token add`` to its requests to the daemon, and to no others. Every
scenario's result must be the one tests/e2e/conformance-expected.json lists, with its reason; most
failures are scenarios that call fixtures only the suite's reference server has. With
``NSPAWN_MCP_CONFORMANCE_UPDATE=1`` (``make conformance-expected``) the test rewrites that file instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.e2e import conformance
from tests.e2e.conftest import free_port, http_daemon
from tests.e2e.node.node_tools import HERE as NODE_DIR
from tests.e2e.node.node_tools import NodeTools

pytestmark = pytest.mark.e2e

SUITE_TIMEOUT = 300
UPDATE = os.environ.get("NSPAWN_MCP_CONFORMANCE_UPDATE") == "1"


def _suite_version(tools: NodeTools) -> str:
    manifest = json.loads((tools.conformance.parent.parent / "package.json").read_text())
    return f"{manifest['name']} {manifest['version']}"


def bearer_environment(tools: NodeTools, origin: str, token: str) -> dict[str, str]:
    """Node 22 first on PATH, and bearer.mjs told which origin gets which token."""
    environment = tools.environment()
    environment["NSPAWN_MCP_BEARER_TOKEN"] = token
    environment["NSPAWN_MCP_BEARER_ORIGIN"] = origin
    environment["NSPAWN_MCP_BEARER_UNDICI"] = str(tools.conformance)
    return environment


def run_suite(tools: NodeTools, url: str, token: str, output: Path) -> subprocess.CompletedProcess[str]:
    """The suite's active scenarios against ``url``, results in ``output`` (its exit code says little)."""
    parts = urlsplit(url)
    command = [str(tools.node), "--import", str(NODE_DIR / "bearer.mjs"), str(tools.conformance)]
    return subprocess.run(
        [*command, "server", "--url", url, "--output-dir", str(output)],
        env=bearer_environment(tools, f"{parts.scheme}://{parts.netloc}", token),
        capture_output=True,
        text=True,
        timeout=SUITE_TIMEOUT,
    )


def test_the_conformance_suite_gives_the_listed_results(
    box_lifetime: None, node_tools: NodeTools, tmp_path: Path
) -> None:
    with http_daemon(["conformance"]) as daemon:
        ran = run_suite(node_tools, daemon.url, daemon.tokens["conformance"], tmp_path / "results")
    actual = conformance.read_results(tmp_path / "results")
    assert actual, f"the suite produced no results:\n{ran.stdout[-4000:]}\n{ran.stderr[-4000:]}"
    if UPDATE:
        previous = conformance.load_expected() if conformance.EXPECTED_FILE.exists() else None
        regenerated = conformance.regenerated(previous, actual, _suite_version(node_tools))
        conformance.EXPECTED_FILE.write_text(json.dumps(regenerated, indent=2) + "\n")
        return
    found = conformance.differences(conformance.load_expected(), actual)
    assert not found, (
        "the conformance results differ from tests/e2e/conformance-expected.json "
        f"(if the change is intended, run `{conformance.REGENERATE}` and explain new results):\n"
        + "\n".join(found)
    )


PROBE = """
import http from "node:http";
const [own, other] = process.argv.slice(2).map(Number);
const seen = [];
const listen = (port) => new Promise((ready) => {
  const server = http.createServer((request, response) => {
    seen.push([port, request.headers.authorization ?? null]);
    response.end("ok");
  });
  server.listen(port, "127.0.0.1", () => ready(server));
});
const servers = [await listen(own), await listen(other)];
await (await fetch(`http://127.0.0.1:${own}/mcp`)).text();
await (await fetch(`http://127.0.0.1:${own}/mcp`, { headers: { Authorization: "Bearer its-own" } })).text();
await (await fetch(`http://127.0.0.1:${other}/mcp`)).text();
console.log(JSON.stringify(seen));
servers.forEach((server) => server.close());
"""


def test_the_token_goes_to_the_daemons_origin_and_nowhere_else(node_tools: NodeTools, tmp_path: Path) -> None:
    """bearer.mjs: a request to the daemon's origin carries the token (the control: it would be seen),
    a request that brings its own Authorization keeps it, and a request to any other origin gets none."""
    probe = tmp_path / "probe.mjs"
    probe.write_text(PROBE)
    own, other = free_port(), free_port()
    ran = subprocess.run(
        [str(node_tools.node), "--import", str(NODE_DIR / "bearer.mjs"), str(probe), str(own), str(other)],
        env=bearer_environment(node_tools, f"http://127.0.0.1:{own}", "the-token"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout) == [[own, "Bearer the-token"], [own, "Bearer its-own"], [other, None]]
