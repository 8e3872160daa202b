"""A real MCP client drives a real server on real daemons: the walking skeleton's contract."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import anyio
import pytest
from mcp.client import Client

from tests.e2e.conftest import call, error_text, kill_daemon, serve
from tests.e2e.leaks import machines_and_images
from tests.netns import EGRESS_TO_OUTSIDE_HOSTS as EGRESS_POLICY
from tests.netns import outside_hosts

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_create_exec_copy_destroy(client: Client, workdir: Path) -> None:
    created = await call(client, "create_sandbox")
    sandbox = created["sandbox_id"]
    assert created["image"] == "default"
    assert created["limits"]["memory_mb"] == 512

    result = await call(
        client,
        "exec_in_sandbox",
        sandbox_id=sandbox,
        command=[
            "python3",
            "-c",
            "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(3)",
        ],
    )
    assert (result["exit_code"], result["stdout"], result["stderr"]) == (3, "to stdout\n", "to stderr\n")
    assert (result["timed_out"], result["truncated"]) == (False, False)

    payload = os.urandom(3 << 20)
    (workdir / "input.bin").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    copied_in = await call(
        client,
        "copy_file",
        sandbox_id=sandbox,
        source="input.bin",
        destination="/root/input.bin",
        direction="to_sandbox",
    )
    assert (copied_in["bytes"], copied_in["sha256"]) == (len(payload), digest)
    inside = await call(client, "exec_in_sandbox", sandbox_id=sandbox, command="sha256sum /root/input.bin")
    assert inside["stdout"].split()[0] == digest
    await call(client, "exec_in_sandbox", sandbox_id=sandbox, command="cp /root/input.bin /root/output.bin")
    copied_out = await call(
        client,
        "copy_file",
        sandbox_id=sandbox,
        source="/root/output.bin",
        destination=str(workdir / "output.bin"),
        direction="from_sandbox",
    )
    assert copied_out["sha256"] == digest
    assert hashlib.sha256((workdir / "output.bin").read_bytes()).hexdigest() == digest

    assert [s["sandbox_id"] for s in (await call(client, "list_sandboxes"))["sandboxes"]] == [sandbox]
    assert await call(client, "destroy_sandbox", sandbox_id=sandbox) == {
        "sandbox_id": sandbox,
        "destroyed": True,
    }
    assert (await call(client, "list_sandboxes"))["sandboxes"] == []
    gone = await error_text(client, "exec_in_sandbox", sandbox_id=sandbox, command="true")
    assert f"sandbox {sandbox} is gone: its owner destroyed it" in gone


async def test_hostile_copies_are_refused_and_the_host_is_untouched(client: Client, workdir: Path) -> None:
    sandbox = (await call(client, "create_sandbox"))["sandbox_id"]
    try:
        for source in ("../../etc/shadow", "/etc/shadow", "/proc/self/root/etc/shadow"):
            message = await error_text(
                client,
                "copy_file",
                sandbox_id=sandbox,
                source=source,
                destination="/x",
                direction="to_sandbox",
            )
            assert "files.allowed_host_dirs" in message
        (workdir / "escape").symlink_to("/etc/shadow")
        message = await error_text(
            client, "copy_file", sandbox_id=sandbox, source="escape", destination="/x", direction="to_sandbox"
        )
        assert "leads outside" in message

        await call(client, "exec_in_sandbox", sandbox_id=sandbox, command="ln -s /etc/shadow /root/link")
        message = await error_text(
            client,
            "copy_file",
            sandbox_id=sandbox,
            source="/root/link",
            destination="out",
            direction="from_sandbox",
        )
        assert "symbolic link" in message
        assert not (workdir / "out").exists()

        # a destination inside the sandbox that links to a host path stays inside the sandbox
        host_canary = Path("/etc/nspawn-mcp-test-canary")
        assert not host_canary.exists()
        (workdir / "data").write_text("data")
        await call(client, "exec_in_sandbox", sandbox_id=sandbox, command=f"ln -s {host_canary} /root/dest")
        await call(
            client,
            "copy_file",
            sandbox_id=sandbox,
            source="data",
            destination="/root/dest",
            direction="to_sandbox",
        )
        assert not host_canary.exists()
        inside = await call(client, "exec_in_sandbox", sandbox_id=sandbox, command="cat /root/dest")
        assert inside["stdout"] == "data"

        canary = workdir / "canary"
        canary.write_text("host canary")
        await call(client, "exec_in_sandbox", sandbox_id=sandbox, command="echo pwned > /root/note")
        (workdir / "note").symlink_to(canary)
        await call(
            client,
            "copy_file",
            sandbox_id=sandbox,
            source="/root/note",
            destination="note",
            direction="from_sandbox",
        )
        assert canary.read_text() == "host canary"  # the link was replaced, not followed
        assert (workdir / "note").read_text() == "pwned\n"
    finally:
        await call(client, "destroy_sandbox", sandbox_id=sandbox)


async def test_a_timeout_returns_promptly_with_timed_out(client: Client) -> None:
    sandbox = (await call(client, "create_sandbox"))["sandbox_id"]
    try:
        result = await call(
            client,
            "exec_in_sandbox",
            sandbox_id=sandbox,
            command="sleep 1000 & sleep 1000",
            timeout_seconds=1,
        )
        assert result["timed_out"] is True
        assert result["duration_ms"] < 10_000
        flood = await call(client, "exec_in_sandbox", sandbox_id=sandbox, command="yes | head -c 5000000")
        assert flood["truncated"] is True
        assert len(flood["stdout"]) == 1 << 20
    finally:
        await call(client, "destroy_sandbox", sandbox_id=sandbox)


async def test_bad_input_gets_clear_errors_and_the_server_stays_up(client: Client) -> None:
    assert "ids look like" in await error_text(client, "destroy_sandbox", sandbox_id=".host")
    assert "limits.max.memory" in await error_text(client, "create_sandbox", memory_mb=1 << 30)
    assert "sandboxes.images" in await error_text(client, "create_sandbox", image="--bind=/:/x")
    assert (await call(client, "list_sandboxes"))["sandboxes"] == []


async def test_list_images_shows_the_installed_default_image_and_who_may_use_it(client: Client) -> None:
    listed = await call(client, "list_images")
    default = next(image for image in listed["images"] if image["name"] == "default")
    assert default["default_policy_allows"] is True
    assert "default" in default["policies"]
    assert default["created_at"] is not None
    assert "/var/lib" not in str(listed)  # no host paths


async def test_sandboxes_and_their_processes_survive_a_daemon_restart(client: Client) -> None:
    script = "for i in 1 2 3; do echo tick $i; sleep 0.3; done; echo done; sleep 1000"
    sandbox = (await call(client, "create_sandbox"))["sandbox_id"]
    started = await call(client, "exec_in_sandbox", sandbox_id=sandbox, command=script, background=True)
    process = started["process_id"]
    early = await call(client, "read_process_output", sandbox_id=sandbox, process_id=process)
    try:
        async with anyio.create_task_group() as tasks:  # a call in flight when the daemon dies
            failures: list[str] = []

            async def in_flight() -> None:
                failures.append(
                    await error_text(client, "exec_in_sandbox", sandbox_id=sandbox, command="sleep 30")
                )

            tasks.start_soon(in_flight)
            await anyio.sleep(0.3)
            kill_daemon()
        assert "daemon restarted during this call" in failures[0]
        # the same client, reconnected by its front end to the restarted daemon, has it all back
        with anyio.fail_after(30):
            listed = (await call(client, "list_sandboxes"))["sandboxes"]
        assert [s["sandbox_id"] for s in listed] == [sandbox]
        processes = (await call(client, "list_processes", sandbox_id=sandbox))["processes"]
        assert [(p["process_id"], p["running"]) for p in processes] == [(process, True)]
        seen, cursor = early["stdout"], early["next_cursor"]
        with anyio.fail_after(20):
            while "done" not in seen:
                later = await call(
                    client, "read_process_output", sandbox_id=sandbox, process_id=process, since=cursor
                )
                seen, cursor = seen + later["stdout"], later["next_cursor"]
                await anyio.sleep(0.05)  # poll politely: the daemon rate-limits each client
        assert seen == "tick 1\ntick 2\ntick 3\ndone\n"
    finally:
        await call(client, "destroy_sandbox", sandbox_id=sandbox)


async def test_a_disconnect_destroys_the_clients_sandboxes_unless_its_policy_keeps_them(
    daemon_with_policies: Path, workdir: Path
) -> None:
    (daemon_with_policies / "kept.toml").write_text('[sandboxes]\non_disconnect = "keep"\n')
    params = serve("--policy-dir", str(daemon_with_policies), cwd=workdir)
    async with Client(params) as first:
        dropped = (await call(first, "create_sandbox"))["sandbox_id"]
        kept = (await call(first, "create_sandbox", policy="kept"))["sandbox_id"]
    async with Client(params) as second:  # the same identity (uid 0), a new connection
        assert [s["sandbox_id"] for s in (await call(second, "list_sandboxes"))["sandboxes"]] == [kept]
        gone = await error_text(second, "exec_in_sandbox", sandbox_id=dropped, command="true")
        assert "its client disconnected" in gone
        machines, _ = await machines_and_images()
        assert machines == {kept}  # what machined reports, not what the daemon believes
        await call(second, "destroy_sandbox", sandbox_id=kept)


async def test_cancelling_a_call_kills_its_command(client: Client) -> None:
    sandbox = (await call(client, "create_sandbox"))["sandbox_id"]
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(
                functools.partial(
                    client.call_tool,
                    "exec_in_sandbox",
                    {"sandbox_id": sandbox, "command": "echo $$ > /root/pid; exec sleep 1000"},
                )
            )
            with anyio.fail_after(20):
                while not (
                    await call(client, "exec_in_sandbox", sandbox_id=sandbox, command="cat /root/pid")
                )["stdout"]:
                    await anyio.sleep(0.05)
            tasks.cancel_scope.cancel()
        probe = "test -d /proc/$(cat /root/pid) && echo alive || echo gone"
        with anyio.fail_after(20):
            while (await call(client, "exec_in_sandbox", sandbox_id=sandbox, command=probe))[
                "stdout"
            ] != "gone\n":
                await anyio.sleep(0.05)
    finally:
        await call(client, "destroy_sandbox", sandbox_id=sandbox)


async def test_the_dev_policy_binds_the_project_read_only_and_scratch_read_write(
    client: Client, workdir: Path
) -> None:
    # a writable root must belong to an unprivileged user alone: root inside writes as its owner
    scratch = workdir / "scratch"
    (workdir / "main.py").write_text("print('from the host')\n")
    scratch.mkdir(mode=0o777)
    refused = await error_text(
        client,
        "create_sandbox",
        policy="dev",
        mounts=[{"host": "scratch", "sandbox": "/s", "writable": True}],
    )
    assert "root inside would write as host root" in refused
    assert "mounts.allowed" in refused
    os.chown(scratch, 4242, 4242)
    scratch.chmod(0o700)
    created = await call(
        client,
        "create_sandbox",
        policy="dev",
        mounts=[
            {"host": ".", "sandbox": "/work"},
            {"host": "scratch", "sandbox": "/scratch", "writable": True},
        ],
    )
    sandbox = created["sandbox_id"]
    try:
        assert [(m["sandbox"], m["writable"]) for m in created["mounts"]] == [
            ("/work", False),
            ("/scratch", True),
        ]
        ran = await call(
            client,
            "exec_in_sandbox",
            sandbox_id=sandbox,
            command="python3 /work/main.py > /scratch/out.txt; touch /work/x",
        )
        assert "Read-only file system" in ran["stderr"]
        assert (scratch / "out.txt").read_text() == "from the host\n"
        assert (scratch / "out.txt").stat().st_uid == 4242
        assert not (workdir / "x").exists()
    finally:
        await call(client, "destroy_sandbox", sandbox_id=sandbox)
    message = await error_text(
        client, "create_sandbox", policy="dev", mounts=[{"host": ".", "sandbox": "/work", "writable": True}]
    )
    assert "mounts.allowed.writable" in message
    message = await error_text(
        client, "create_sandbox", policy="dev", mounts=[{"host": "/etc", "sandbox": "/x"}]
    )
    assert "mounts.allowed" in message
    assert (await call(client, "list_sandboxes"))["sandboxes"] == []


FETCH = """
import socket, ssl

def hello(name):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    out = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()

for host, port, name in [("allowed.test", 8443, "allowed.test"), ("198.18.0.4", 8443, None),
                         ("198.18.0.3", 8443, None), ("also.test", 8443, None)]:
    try:
        with socket.create_connection((host, port), timeout=2) as c:
            if name:
                c.sendall(hello(name))
            print(c.recv(100).decode().strip())
    except OSError as exc:
        print(type(exc).__name__)
"""


async def test_an_egress_policy_reaches_its_listed_hosts_only(
    daemon_with_policies: Path, workdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    policies = daemon_with_policies
    (policies / "lab.toml").write_text(EGRESS_POLICY)
    params = serve("--policy-dir", str(policies), cwd=workdir)
    with outside_hosts(tmp_path_factory.mktemp("outside") / "seen.log") as seen:
        async with Client(params) as client:
            sandbox = (await call(client, "create_sandbox", policy="lab"))["sandbox_id"]
            try:
                result = await call(
                    client, "exec_in_sandbox", sandbox_id=sandbox, command=["python3", "-c", FETCH]
                )
            finally:
                await call(client, "destroy_sandbox", sandbox_id=sandbox)
        assert result["stdout"].splitlines() == [
            "hello from 198.18.0.2:8443",
            "hello from 198.18.0.4:8443",
            "TimeoutError",
            "gaierror",
        ]
        assert "dns also.test." not in seen.read_text()
    table = await anyio.run_process(["nft", "list", "table", "inet", "nspawn_mcp"], check=False)
    assert table.returncode != 0  # the last egress sandbox took the host's rules with it


async def test_a_daemon_killed_mid_create_leaves_nothing_half_made(client: Client) -> None:
    kept = (await call(client, "create_sandbox"))["sandbox_id"]
    async with anyio.create_task_group() as tasks:
        # less memory than the warm pool's sandboxes started with: a cold create, under way for a while
        tasks.start_soon(client.call_tool, "create_sandbox", {"memory_mb": 256})
        await anyio.sleep(0.03)  # the second create is under way
        kill_daemon()
    with anyio.fail_after(30):
        listed = {s["sandbox_id"] for s in (await call(client, "list_sandboxes"))["sandboxes"]}
    assert kept in listed
    machines, images = await machines_and_images()
    assert machines == listed  # adopted, or removed: nothing half-made runs
    assert images == listed
    for sandbox in listed:
        assert (await call(client, "exec_in_sandbox", sandbox_id=sandbox, command="echo ok"))[
            "stdout"
        ] == "ok\n"
        await call(client, "destroy_sandbox", sandbox_id=sandbox)


async def test_kill_process_answers_once_the_signal_took_effect(client: Client) -> None:
    sandbox = (await call(client, "create_sandbox"))["sandbox_id"]
    try:
        await call(client, "exec_in_sandbox", sandbox_id=sandbox, command="sleep 600", background=True)
        stubborn = "trap '' TERM; echo ready; while :; do sleep 1; done"
        await call(client, "exec_in_sandbox", sandbox_id=sandbox, command=stubborn, background=True)
        killed = await call(client, "kill_process", sandbox_id=sandbox, process_id="p1")
        assert (killed["running"], killed["signal"], killed["signalled"]) == (False, 15, "TERM")
        with anyio.fail_after(30):  # the trap is set once it printed
            while (
                "ready"
                not in (await call(client, "read_process_output", sandbox_id=sandbox, process_id="p2"))[
                    "stdout"
                ]
            ):
                await anyio.sleep(0.05)
        survived = await call(client, "kill_process", sandbox_id=sandbox, process_id="p2")
        assert (survived["running"], survived["signalled"]) == (True, "TERM")  # it ignores TERM: said so
        ended = await call(client, "kill_process", sandbox_id=sandbox, process_id="p2", signal="KILL")
        assert (ended["running"], ended["signal"]) == (False, 9)
    finally:
        await call(client, "destroy_sandbox", sandbox_id=sandbox)


async def test_over_the_cap_the_caller_chooses_the_start_or_the_end(client: Client) -> None:
    sandbox = (await call(client, "create_sandbox"))["sandbox_id"]
    try:
        noisy = "seq 1 400000; seq 1 400000 >&2"  # 2.6 MiB per stream, over the 1 MiB cap
        head = await call(client, "exec_in_sandbox", sandbox_id=sandbox, command=noisy)
        tail = await call(client, "exec_in_sandbox", sandbox_id=sandbox, command=noisy, keep="tail")
        for result in (head, tail):
            assert result["truncated"] is True
            assert len(result["stdout"]) + len(result["stderr"]) == 1 << 20
        assert head["stdout"].startswith("1\n2\n")
        assert tail["stdout"].endswith("\n399999\n400000\n")
        assert tail["stderr"].endswith("\n399999\n400000\n")
        assert (head["kept"], tail["kept"]) == ("head", "tail")
    finally:
        await call(client, "destroy_sandbox", sandbox_id=sandbox)
