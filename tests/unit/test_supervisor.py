"""The exec supervisor's protocol, against the real supervisor process and the real client.

The supervisor normally runs inside a sandbox; here it runs on the host in a
temporary directory, which exercises the same code without root or systemd.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.backend.api import CommandSpec, OutputChunk, ProcessOutput
from nspawn_mcp.backend.jail import JailClient
from nspawn_mcp.backend.units import supervisor_command
from nspawn_mcp.errors import ExecFailed, InvalidRequest, NotFound, SandboxGone
from tests.waiting import wait_until

pytestmark = pytest.mark.anyio

SUPERVISOR_DIR = Path(__file__).parents[2] / "server/nspawn_mcp/sandbox"


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "exec.sock"
    process = subprocess.Popen(supervisor_command(str(SUPERVISOR_DIR), str(path), python=sys.executable))
    try:
        yield path
    finally:
        process.kill()
        process.wait()


@pytest.fixture
async def ready(socket_path: Path) -> JailClient:
    await wait_until(socket_path.exists, what="the supervisor's socket")
    return JailClient(socket_path)


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


async def test_exit_code_and_separate_streams(ready: JailClient) -> None:
    outcome = await ready.run(spec("/bin/sh", "-c", "echo out; echo err >&2; exit 3"))
    assert (outcome.exit_code, outcome.signal, outcome.timed_out) == (3, None, False)
    assert (outcome.stdout, outcome.stderr) == (b"out\n", b"err\n")


async def test_argv_runs_without_a_shell_and_gets_env_and_stdin(ready: JailClient) -> None:
    outcome = await ready.run(spec("/bin/sh", "-c", 'cat; echo "$GREETING" "$1"', "sh", "$(id)"))
    assert outcome.stdout == b"hi $(id)\n"
    outcome = await ready.run(spec("cat", stdin=b"\x00binary\xff" * 1000))
    assert outcome.stdout == b"\x00binary\xff" * 1000


async def test_output_is_capped_per_stream_and_marked_truncated(ready: JailClient) -> None:
    outcome = await ready.run(spec("/bin/sh", "-c", "yes | head -c 100000; echo e >&2", cap=1024))
    assert len(outcome.stdout) == 1024
    assert outcome.stdout_truncated
    assert (outcome.stderr, outcome.stderr_truncated) == (b"e\n", False)


async def test_a_timeout_kills_the_command_and_everything_it_started(
    ready: JailClient, tmp_path: Path
) -> None:
    pidfile = tmp_path / "bg.pid"
    with anyio.fail_after(10):
        outcome = await ready.run(
            spec("/bin/sh", "-c", f"sleep 1000 & echo $! > {pidfile}; sleep 1000", timeout=0.5)
        )
    assert outcome.timed_out
    assert outcome.exit_code is None
    assert outcome.signal == 9
    await wait_gone(int(pidfile.read_text()))


async def test_children_left_behind_are_killed_when_the_command_ends(
    ready: JailClient, tmp_path: Path
) -> None:
    pidfile = tmp_path / "bg.pid"
    outcome = await ready.run(spec("/bin/sh", "-c", f"sleep 1000 >/dev/null 2>&1 & echo $! > {pidfile}"))
    assert outcome.exit_code == 0
    await wait_gone(int(pidfile.read_text()))


async def test_hanging_up_kills_the_command(ready: JailClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "cmd.pid"
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(ready.run, spec("/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 1000"))
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
    ready: JailClient, command: tuple[str, ...], cwd: str, message: str
) -> None:
    not_executable = anyio.Path("/tmp/nspawn-mcp-test-not-executable")
    await not_executable.write_text("echo never\n")
    await not_executable.chmod(0o644)
    with pytest.raises(ExecFailed, match=message):
        await ready.run(spec(*command, cwd=cwd))


async def test_a_missing_supervisor_is_reported_as_a_gone_sandbox(tmp_path: Path) -> None:
    with pytest.raises(SandboxGone):
        await JailClient(tmp_path / "nothing.sock").run(spec("true"))


async def test_concurrent_commands_do_not_block_each_other(ready: JailClient) -> None:
    results: list[bytes] = []

    async def one(n: int) -> None:
        outcome = await ready.run(spec("/bin/sh", "-c", f"sleep 0.2; echo {n}"))
        results.append(outcome.stdout)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            for n in range(8):
                tasks.start_soon(one, n)
    assert sorted(results) == [f"{n}\n".encode() for n in range(8)]


async def test_output_is_streamed_while_the_command_runs(ready: JailClient) -> None:
    chunks: list[bytes] = []

    async def collect(chunk: OutputChunk) -> None:
        chunks.append(chunk.stdout)

    outcome = await ready.run(spec("/bin/sh", "-c", "echo one; sleep 0.6; echo two; sleep 0.6"), collect)
    assert outcome.stdout == b"one\ntwo\n"
    assert chunks[0] == b"one\n"
    assert b"".join(chunks) == b"one\ntwo\n"


async def test_commands_run_as_the_requested_user(ready: JailClient) -> None:
    outcome = await ready.run(replace(spec("/bin/sh", "-c", "id -u; echo $HOME"), user="nobody"))
    assert outcome.stdout.split(b"\n")[0] == b"65534"
    with pytest.raises(InvalidRequest, match=r"no user 'ghost'"):
        await ready.run(replace(spec("true"), user="ghost"))


async def test_background_processes_keep_output_for_later_reads(ready: JailClient) -> None:
    process = await ready.spawn(spec("/bin/sh", "-c", "echo ready; read line; echo got $line; exit 4"), None)
    await wait_until_output(ready, process, b"ready\n")
    assert await ready.write(process, b"hello\n", close=True) == 6
    final = await wait_finished(ready, process)
    assert (final.state.exit_code, final.state.running) == (4, False)
    assert final.stdout == b"ready\ngot hello\n"
    later = await ready.read(process, final.next_stdout_offset, 0, 1 << 20)
    assert later.stdout == b""
    assert [p.process_id for p in await ready.list()] == [process]


async def test_background_processes_can_be_signalled(ready: JailClient) -> None:
    process = await ready.spawn(spec("/bin/sh", "-c", "sleep 1000 & sleep 1000"), None)
    state = await ready.kill(process, 9)
    assert state.process_id == process
    final = await wait_finished(ready, process)
    assert final.state.signal == 9
    with pytest.raises(NotFound, match=r"no background process 'p99'"):
        await ready.kill("p99", 15)


async def wait_until_output(jail: JailClient, process: str, expected: bytes) -> None:
    async def has_output() -> bool:
        return (await jail.read(process, 0, 0, 1 << 20)).stdout == expected

    with anyio.fail_after(10):
        while not await has_output():
            await anyio.sleep(0.01)


async def wait_finished(jail: JailClient, process: str) -> ProcessOutput:
    with anyio.fail_after(10):
        while (output := await jail.read(process, 0, 0, 1 << 20)).state.running:
            await anyio.sleep(0.01)
    return output


async def test_a_tail_capture_keeps_the_last_bytes_of_each_stream(ready: JailClient) -> None:
    command = "seq 1 20000; seq 1 20000 >&2"
    tail = await ready.run(replace(spec("/bin/sh", "-c", command, cap=1024), keep="tail"))
    assert (len(tail.stdout), len(tail.stderr)) == (1024, 1024)
    assert tail.stdout.endswith(b"\n19999\n20000\n")
    assert tail.stderr.endswith(b"\n19999\n20000\n")
    assert (tail.stdout_truncated, tail.stderr_truncated) == (True, True)
    head = await ready.run(spec("/bin/sh", "-c", command, cap=1024))  # the control: the start by default
    assert head.stdout.startswith(b"1\n2\n3\n")


async def test_a_tail_read_skips_to_the_newest_output(ready: JailClient) -> None:
    process = await ready.spawn(spec("/bin/sh", "-c", "seq 1 20000"), None)
    final = await wait_finished(ready, process)
    newest = await ready.read(process, 0, 0, 1024, tail=True)
    assert newest.stdout.endswith(b"\n19999\n20000\n")
    assert len(newest.stdout) == 1024
    assert newest.next_stdout_offset == final.next_stdout_offset


async def test_kill_answers_once_the_process_ended(ready: JailClient) -> None:
    process = await ready.spawn(spec("/bin/sh", "-c", "sleep 1000"), None)
    state = await ready.kill(process, 15, wait=5)
    assert (state.running, state.signal) == (False, 15)
    stubborn = await ready.spawn(spec("/bin/sh", "-c", "trap '' TERM; echo ready; sleep 1000 & wait"), None)
    await wait_until_output(ready, stubborn, b"ready\n")
    survived = await ready.kill(stubborn, 15, wait=0.2)
    assert survived.running  # it ignores TERM, and the answer says so
    assert not (await ready.kill(stubborn, 9, wait=5)).running
