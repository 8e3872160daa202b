"""The exec supervisor's protocol, against the real supervisor process and the real client.

The supervisor normally runs inside a sandbox; here it runs on the host in a
temporary directory, which exercises the same code without root or systemd.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.backend.api import CommandSpec
from nspawn_mcp.backend.jail import run_command
from nspawn_mcp.errors import ExecFailed, SandboxGone
from tests.waiting import wait_until

pytestmark = pytest.mark.anyio

SUPERVISOR = Path(__file__).parents[2] / "server/nspawn_mcp/sandbox/supervisor.py"


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "exec.sock"
    process = subprocess.Popen([sys.executable, "-I", "-S", str(SUPERVISOR), str(path)])
    try:
        yield path
    finally:
        process.kill()
        process.wait()


@pytest.fixture
async def ready(socket_path: Path) -> Path:
    await wait_until(socket_path.exists, what="the supervisor's socket")
    return socket_path


def spec(
    *argv: str, stdin: bytes = b"", timeout: float = 10, cap: int = 1 << 20, cwd: str = "/"
) -> CommandSpec:
    return CommandSpec(
        argv=argv, cwd=cwd, env={"GREETING": "hi"}, stdin=stdin, timeout_seconds=timeout, max_output_bytes=cap
    )


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie is as good as gone


async def wait_gone(pid: int) -> None:
    await wait_until(lambda: not alive(pid), what=f"process {pid} to be gone")


async def test_exit_code_and_separate_streams(ready: Path) -> None:
    outcome = await run_command(ready, spec("/bin/sh", "-c", "echo out; echo err >&2; exit 3"))
    assert (outcome.exit_code, outcome.signal, outcome.timed_out) == (3, None, False)
    assert (outcome.stdout, outcome.stderr) == (b"out\n", b"err\n")


async def test_argv_runs_without_a_shell_and_gets_env_and_stdin(ready: Path) -> None:
    outcome = await run_command(ready, spec("/bin/sh", "-c", 'cat; echo "$GREETING" "$1"', "sh", "$(id)"))
    assert outcome.stdout == b"hi $(id)\n"
    outcome = await run_command(ready, spec("cat", stdin=b"\x00binary\xff" * 1000))
    assert outcome.stdout == b"\x00binary\xff" * 1000


async def test_output_is_capped_per_stream_and_marked_truncated(ready: Path) -> None:
    outcome = await run_command(ready, spec("/bin/sh", "-c", "yes | head -c 100000; echo e >&2", cap=1024))
    assert len(outcome.stdout) == 1024
    assert outcome.stdout_truncated
    assert (outcome.stderr, outcome.stderr_truncated) == (b"e\n", False)


async def test_a_timeout_kills_the_whole_process_group(ready: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    with anyio.fail_after(10):
        outcome = await run_command(
            ready, spec("/bin/sh", "-c", f"sleep 1000 & echo $! > {pidfile}; sleep 1000", timeout=0.5)
        )
    assert outcome.timed_out
    assert outcome.exit_code is None
    assert outcome.signal == 9
    await wait_gone(int(pidfile.read_text()))


async def test_children_left_behind_are_killed_when_the_command_ends(ready: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    outcome = await run_command(
        ready, spec("/bin/sh", "-c", f"sleep 1000 >/dev/null 2>&1 & echo $! > {pidfile}")
    )
    assert outcome.exit_code == 0
    await wait_gone(int(pidfile.read_text()))


async def test_hanging_up_kills_the_command(ready: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "cmd.pid"
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run_command, ready, spec("/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 1000"))
        await wait_until(lambda: pidfile.exists() and bool(pidfile.read_text().strip()), what="the pid file")
        tasks.cancel_scope.cancel()
    await wait_gone(int(pidfile.read_text()))


@pytest.mark.parametrize(
    ("command", "cwd", "message"),
    [
        (("no-such-command",), "/", "command not found: no-such-command"),
        (("/tmp/nspawn-mcp-test-not-executable",), "/", "permission denied"),
        (("true",), "/no/such/dir", "working directory /no/such/dir does not exist"),
    ],
)
async def test_commands_that_cannot_start_are_clear_errors(
    ready: Path, command: tuple[str, ...], cwd: str, message: str
) -> None:
    not_executable = anyio.Path("/tmp/nspawn-mcp-test-not-executable")
    await not_executable.write_text("echo never\n")
    await not_executable.chmod(0o644)
    with pytest.raises(ExecFailed, match=message):
        await run_command(ready, spec(*command, cwd=cwd))


async def test_a_missing_supervisor_is_reported_as_a_gone_sandbox(tmp_path: Path) -> None:
    with pytest.raises(SandboxGone):
        await run_command(tmp_path / "nothing.sock", spec("true"))


async def test_concurrent_commands_do_not_block_each_other(ready: Path) -> None:
    results: list[bytes] = []

    async def one(n: int) -> None:
        outcome = await run_command(ready, spec("/bin/sh", "-c", f"sleep 0.2; echo {n}"))
        results.append(outcome.stdout)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            for n in range(8):
                tasks.start_soon(one, n)
    assert sorted(results) == [f"{n}\n".encode() for n in range(8)]
