"""The operator's view, as an operator uses it: ``nspawn-mcp list``, ``destroy`` and ``logs`` run as
commands against the real daemon, a destroy journaled as a clean stop, a non-root user kept out of
other users' sandboxes, and the one-line errors of a start that cannot work."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import pytest
from mcp.client import Client

from tests.e2e.conftest import SERVER, call, error_text, serve, stop_daemon

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
"""A local user who is not root (and whose group, nogroup, the daemon's socket may be opened to)."""
_ENVIRONMENT = ("PYTHONPATH", "NSPAWN_MCP_STATE_DIR", "NSPAWN_MCP_RUNTIME_DIR", "NSPAWN_MCP_BUS_ADDRESS")


def run(*arguments: str, as_user: Sequence[str] = (), stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``nspawn-mcp ARGUMENTS`` as a command, as root or (``as_user``) through setpriv."""
    environment = {key: os.environ[key] for key in _ENVIRONMENT if key in os.environ}
    environment["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
    return subprocess.run(
        [*as_user, str(SERVER), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        env=environment,
        cwd="/",
    )


def listed() -> dict[str, dict[str, object]]:
    done = run("list", "--json")
    assert done.returncode == 0, done.stderr
    return {row["sandbox_id"]: row for row in json.loads(done.stdout)}


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]


async def test_list_shows_a_live_sandbox_with_its_owner_policy_and_usage(
    box_lifetime: None, workdir: Path
) -> None:
    async with Client(serve(cwd=workdir)) as client:
        sandbox = (await call(client, "create_sandbox"))["sandbox_id"]
        await call(
            client,
            "exec_in_sandbox",
            sandbox_id=sandbox,
            command="head -c 8M /dev/zero > /dev/shm/x; timeout 1 sh -c 'while :; do :; done'",
        )
        row = listed()[sandbox]
        assert (row["owner"], row["policy"], row["image"], row["connected"]) == (
            "uid:0",
            "default",
            "default",
            True,
        )
        assert isinstance(row["memory_bytes"], int)
        assert row["memory_bytes"] > 8 << 20
        assert isinstance(row["cpu_nsec"], int)
        assert row["cpu_nsec"] > 300_000_000, "a second of spinning is not in its CPU time"
        assert isinstance(row["tasks"], int)
        assert row["tasks"] >= 1
        table = run("list")
        assert table.returncode == 0
        assert table.stdout.splitlines()[0].split()[:4] == ["ID", "OWNER", "POLICY", "IMAGE"]
        assert any(line.startswith(sandbox) for line in table.stdout.splitlines())
        await call(client, "destroy_sandbox", sandbox_id=sandbox)
    assert sandbox not in listed()


async def test_the_operator_destroys_a_clients_sandbox_and_the_journal_calls_it_a_clean_stop(
    box_lifetime: None, workdir: Path
) -> None:
    async with Client(serve(cwd=workdir)) as client:
        sandbox = (await call(client, "create_sandbox"))["sandbox_id"]
        done = run("destroy", sandbox)
        assert done.returncode == 0, done.stderr
        assert sandbox not in listed()
        told = await error_text(client, "exec_in_sandbox", sandbox_id=sandbox, command="true")
        assert "operator destroyed it" in told
    again = run("destroy", sandbox)
    assert_one_line_error(again, f"no live sandbox {sandbox}")

    logs = run("logs", sandbox)
    assert logs.returncode == 0, logs.stderr
    story = logs.stdout
    assert "Deactivated successfully" in story, story
    assert "Failed with result" not in story, story
    assert f"created {sandbox}" in story, story
    assert f"destroyed {sandbox}: the host's operator destroyed it" in story, story


@pytest.fixture
def daemon_open_to_nogroup(box_lifetime: None) -> Iterator[None]:
    """The daemon restarted with its socket open to the group nogroup (a non-root user may connect)."""
    stop_daemon()
    started = run("daemon", "start", "--socket-group", "nogroup")
    assert started.returncode == 0, started.stderr
    yield
    stop_daemon()


async def test_a_non_root_user_cannot_list_or_destroy_other_users_sandboxes(
    daemon_open_to_nogroup: None, workdir: Path
) -> None:
    async with Client(serve(cwd=workdir)) as root_client:
        sandbox = (await call(root_client, "create_sandbox"))["sandbox_id"]

        assert_one_line_error(run("list", as_user=NOBODY), "for root", "uid 65534")
        assert_one_line_error(run("destroy", sandbox, as_user=NOBODY), "for root", "uid 65534")
        assert sandbox in listed(), "the attack destroyed the sandbox"

        # the control: the same user reaches the daemon (as an ordinary client of its own uid, which
        # sees none of root's sandboxes), so the refusals above were the operator check, not the socket
        command = serve(cwd=Path("/"))
        command.args = [*NOBODY[1:], str(SERVER), *command.args]
        command.command = NOBODY[0]
        async with Client(command) as nobody:
            with anyio.fail_after(60):
                mine = await call(nobody, "list_sandboxes")
            assert mine["sandboxes"] == []
        await call(root_client, "destroy_sandbox", sandbox_id=sandbox)


async def test_starts_that_cannot_work_say_why_in_one_line(box_lifetime: None, tmp_path: Path) -> None:
    assert_one_line_error(run("serve", as_user=NOBODY), "uid 65534", "--socket-group")
    assert_one_line_error(run("daemon", "run", as_user=NOBODY), "needs root")
    assert_one_line_error(run("serve", "--policy-dir", str(tmp_path / "typo")), "does not exist")
    bad = tmp_path / "policies"
    bad.mkdir()
    (bad / "broken.toml").write_text("[limits]\nbogus = 1\nmemory = 'lots'\n")
    initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}
    done = run("serve", "--policy-dir", str(bad), stdin=json.dumps(initialize) + "\n")
    assert_one_line_error(done, "broken.toml", "bogus")
    # the MCP client is told too, in the answer to its initialize (not only a closed connection)
    answer = json.loads(done.stdout)
    assert answer["id"] == 0
    assert "broken.toml" in answer["error"]["message"]
