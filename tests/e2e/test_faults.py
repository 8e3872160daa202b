"""The daemon SIGKILLed in the middle of every kind of operation, over and over.

Each round starts one operation (create, exec, copy in, copy out, destroy), kills the daemon
a seeded random fraction of that operation's measured duration later, and once systemd has
restarted it checks, through the same client (whose front end reconnects) and through
machined:

- nothing half-made: machined's machines and images are exactly the sandboxes the client
  lists, every listed sandbox answers a command, and an egress one has its resolver;
- nothing lost: every sandbox whose create returned (and that was not being destroyed) is
  still listed;
- no hang: every call returns within its bound; one in flight when the daemon died says
  "daemon restarted during this call", which is the expected answer, not a failure;
- systemd restarted the daemon each time (its restart counter went up by one: no start
  limit stopped it).

A daemon that refuses to start, on the other hand, is not restarted over and over.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from mcp.client import Client

from nspawn_mcp.backend.bus import Bus
from nspawn_mcp.backend.systemd1 import Systemd
from nspawn_mcp.daemon.unit import DAEMON_UNIT
from nspawn_mcp.layout import Layout
from nspawn_mcp.runtime import find_daemons
from tests.e2e.conftest import SERVER, add_token, call, kill_daemon, remove_token, serve, stop_daemon
from tests.e2e.leaks import Remains, assert_no_leaks, egress_rules, machines_and_images, nft_rules, snapshot

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SEED = int(os.environ.get("NSPAWN_MCP_FAULT_SEED", "20240611"))
"""Set NSPAWN_MCP_FAULT_SEED to replay another sequence of kill points."""
OPERATIONS = ("create", "exec", "copy_in", "copy_out", "destroy")
KILLS_PER_OPERATION = 8
POOL = 3
"""Sandboxes kept alive between rounds (more are destroyed, cleanly, after each round)."""
PAYLOAD_BYTES = 8 << 20
RESTARTED = "daemon restarted during this call"
RESTART_TIMEOUT = 30.0
WHOLE_TEST = 240.0
EXEC = "head -c 4000000 /dev/urandom | sha256sum >/dev/null; sleep 0.2; echo done"
EGRESS = """
[network]
mode = "egress"
allow = [{ cidr = "198.18.0.4/32", ports = [8443] }]
upstream_dns = "198.18.0.2"
"""


@pytest.fixture
def faults_daemon(box_lifetime: None, tmp_path: Path) -> Iterator[list[str]]:
    """A daemon started afresh (its restart counter at 0) with an egress policy; yields the
    options front ends pass. Stopped afterwards, like every daemon a test set options on."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "faults-egress.toml").write_text(EGRESS)
    options = ["--policy-dir", str(policies)]
    stop_daemon()
    yield options
    stop_daemon()


async def _unit_state() -> tuple[str, int]:
    """The daemon's unit: its state ("absent" if there is none) and how often systemd restarted it."""
    daemons = await anyio.to_thread.run_sync(find_daemons, Layout.from_env())
    bus = await Bus.connect(daemons.bus_address)
    try:
        systemd = Systemd(bus)
        units = await systemd.list_units([DAEMON_UNIT])
        if not units:
            return "absent", 0
        count = await systemd.unit_property(DAEMON_UNIT, "org.freedesktop.systemd1.Service", "NRestarts")
    finally:
        bus.disconnect()
    return f"{units[0].active_state} ({units[0].sub_state})", int(count)


async def _restarts() -> int:
    """How often systemd restarted the running daemon's unit (``NRestarts``), or -1 if none runs."""
    state, count = await _unit_state()
    return count if state.startswith("active ") else -1


async def _wait_for_restart(expected: int) -> None:
    """Until the daemon's unit is active again with a changed restart counter, which must be ``expected``."""
    seen = -1
    try:
        with anyio.fail_after(RESTART_TIMEOUT):
            while (seen := await _restarts()) in (-1, expected - 1):
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(
            f"the daemon did not come back (NRestarts {seen}, expected {expected})"
        ) from None
    assert seen == expected, (
        f"the daemon's unit restarted {seen} times for {expected} kills: a start limit stopped systemd "
        "restarting it, and a front end started a new one"
    )


def _text(result: Any) -> str:
    return " ".join(getattr(part, "text", "") for part in result.content)


async def _call_through_restart(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """A call right after a kill may still reach the dead daemon's connection: the front end says
    so, and the call is repeated (bounded) until the reconnected front end carries it."""
    with anyio.fail_after(RESTART_TIMEOUT):
        while True:
            result = await client.call_tool(tool, arguments)
            if not result.is_error:
                assert result.structured_content is not None
                return dict(result.structured_content)
            assert RESTARTED in _text(result), f"{tool}: {_text(result)}"
            await anyio.sleep(0.05)


@asynccontextmanager
async def _leaving_nothing(client: Client) -> AsyncIterator[None]:
    """Destroy, at the end, every sandbox of the client's that it did not have at the start, whether
    the test passed or not (an orphan of a failed run would outlive it: each daemon restart gives its
    session a new grace period)."""
    had = {s["sandbox_id"] for s in (await _call_through_restart(client, "list_sandboxes"))["sandboxes"]}
    try:
        yield
    finally:
        with anyio.move_on_after(60, shield=True):
            listed = await _call_through_restart(client, "list_sandboxes")
            for sandbox in {s["sandbox_id"] for s in listed["sandboxes"]} - had:
                await client.call_tool("destroy_sandbox", {"sandbox_id": sandbox})


class _Round:
    """One operation, and the daemon killed ``delay`` seconds after it started."""

    def __init__(self, client: Client, workdir: Path) -> None:
        self.client = client
        self.workdir = workdir

    def operation(self, name: str, target: str | None, egress: bool) -> Callable[[], Awaitable[Any]]:
        tool: str
        arguments: dict[str, Any]
        if name == "create":
            tool, arguments = "create_sandbox", {"policy": "faults-egress" if egress else "default"}
        elif name == "exec":
            tool, arguments = "exec_in_sandbox", {"sandbox_id": target, "command": EXEC}
        elif name == "copy_in":
            tool = "copy_file"
            arguments = {"sandbox_id": target, "source": "payload", "destination": "/root/payload"}
            arguments["direction"] = "to_sandbox"
        elif name == "copy_out":
            tool = "copy_file"
            arguments = {"sandbox_id": target, "source": "/root/payload", "destination": "out"}
            arguments["direction"] = "from_sandbox"
        else:
            tool, arguments = "destroy_sandbox", {"sandbox_id": target}

        async def run() -> Any:
            with anyio.fail_after(60):
                return await self.client.call_tool(tool, arguments)

        return run

    async def timed(self, run: Callable[[], Awaitable[Any]]) -> float:
        """How long the operation takes undisturbed (it must succeed)."""
        started = time.monotonic()
        result = await run()
        assert not result.is_error, _text(result)
        return time.monotonic() - started

    async def killed(self, run: Callable[[], Awaitable[Any]], delay: float) -> Any:
        results: list[Any] = []

        async def operation() -> None:
            results.append(await run())

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(operation)
            await anyio.sleep(delay)
            kill_daemon()
        return results[0]


async def _check_nothing_half_made(client: Client, before: Remains) -> dict[str, str]:
    """The listed sandboxes (id -> policy) are exactly what machined runs, and each one works."""
    sandboxes = (await _call_through_restart(client, "list_sandboxes"))["sandboxes"]
    listed = {s["sandbox_id"]: s["policy"] for s in sandboxes if s["sandbox_id"] not in before.machines}
    machines, images = await machines_and_images()
    assert machines - before.machines == set(listed), "machined runs other sandboxes than the daemon lists"
    assert images - before.images == set(listed), "machined holds other images than the daemon lists"
    rules = await nft_rules()
    for sandbox, policy in listed.items():
        command = "echo ok"
        if policy == "faults-egress":
            # its rules in the host's table, and (the last step of making it) its resolver in resolv.conf
            missing = egress_rules(sandbox) - rules
            assert not missing, f"{sandbox} lacks its egress rules: {', '.join(sorted(missing))}"
            command = "grep -q '^nameserver 10\\.213\\.' /etc/resolv.conf && echo ok"
        ran = await call(client, "exec_in_sandbox", sandbox_id=sandbox, command=command)
        assert ran["stdout"] == "ok\n", f"{sandbox} ({policy}) is half-made: {ran}"
    return listed


async def test_a_daemon_killed_at_random_points_of_every_operation(
    faults_daemon: list[str], workdir: Path
) -> None:
    rng = random.Random(SEED)
    rounds = [name for name in OPERATIONS for _ in range(KILLS_PER_OPERATION)]
    rng.shuffle(rounds)
    payload = os.urandom(PAYLOAD_BYTES)
    (workdir / "payload").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    params = serve(*faults_daemon, cwd=workdir)
    interrupted = 0
    started = time.monotonic()
    with anyio.fail_after(WHOLE_TEST):
        async with Client(params) as client, _leaving_nothing(client):
            before = await snapshot()  # the daemon runs now: what it adopted is not this test's
            kills = await _restarts()
            assert kills == 0, "the fixture's daemon should be fresh"
            steps = _Round(client, workdir)
            known: set[str] = set()  # created, their create returned, and not destroyed since

            async def new_sandbox(egress: bool = False) -> str:
                created = await call(
                    client, "create_sandbox", policy="faults-egress" if egress else "default"
                )
                sandbox: str = created["sandbox_id"]
                known.add(sandbox)
                return sandbox

            # how long each operation takes here, undisturbed: the kills land within that
            durations = {"create": await steps.timed(steps.operation("create", None, False))}
            known |= set(await _check_nothing_half_made(client, before))
            first = next(iter(known))
            for name in ("copy_in", "exec", "copy_out"):
                durations[name] = await steps.timed(steps.operation(name, first, False))
            doomed = await new_sandbox()
            durations["destroy"] = await steps.timed(steps.operation("destroy", doomed, False))
            known.discard(doomed)

            for number, name in enumerate(rounds):
                egress = rng.random() < 0.5
                fraction = rng.random()
                target: str | None = None
                if name == "destroy":
                    target = await new_sandbox(egress)
                elif name != "create":
                    target = rng.choice(sorted(known)) if known else await new_sandbox(egress)
                    if name == "copy_out":
                        await call(
                            client,
                            "copy_file",
                            sandbox_id=target,
                            source="payload",
                            destination="/root/payload",
                            direction="to_sandbox",
                        )
                (workdir / "out").unlink(missing_ok=True)
                lasting = known - {target}

                result = await steps.killed(steps.operation(name, target, egress), durations[name] * fraction)
                kills += 1
                if result.is_error:
                    assert RESTARTED in _text(result), f"round {number} ({name}): {_text(result)}"
                    interrupted += 1
                await _wait_for_restart(kills)

                listed = await _check_nothing_half_made(client, before)
                assert lasting <= set(listed), f"round {number} ({name}): lost {lasting - set(listed)}"
                if name == "create" and not result.is_error:
                    assert (result.structured_content or {})["sandbox_id"] in listed
                if name == "destroy" and not result.is_error:
                    assert target not in listed
                if name == "copy_out" and (workdir / "out").exists():  # published whole, or not at all
                    assert hashlib.sha256((workdir / "out").read_bytes()).hexdigest() == digest
                known = set(listed)  # adopted creates count from now on; destroyed ones are gone
                for extra in sorted(known)[POOL:]:
                    await call(client, "destroy_sandbox", sandbox_id=extra)
                    known.discard(extra)
        await assert_no_leaks(before)
    elapsed = time.monotonic() - started
    print(
        f"{kills} kills ({interrupted} in flight), seed {SEED}, "
        f"durations {', '.join(f'{k} {v * 1000:.0f} ms' for k, v in durations.items())}: {elapsed:.1f} s"
    )


async def test_a_daemon_that_refuses_to_start_is_not_restarted(box_lifetime: None) -> None:
    name = f"refused-{secrets.token_hex(3)}"
    add_token(name)  # tokens are not what it lacks
    stop_daemon()
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            address = f"127.0.0.1:{taken.getsockname()[1]}"
            with anyio.fail_after(60):
                refused = await anyio.run_process([str(SERVER), "serve", "--http", address], check=False)
            assert refused.returncode == 1, refused
            assert b"did not start" in refused.stderr
            state, restarts = await _unit_state()
        # failed (and collected), not waiting to be restarted every half second for ever
        assert state in ("absent", "failed (failed)"), state
        assert restarts == 0
    finally:
        stop_daemon()
        remove_token(name)
