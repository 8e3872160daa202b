"""Many clients at once: three stdio front ends and an HTTP client drive ``SANDBOXES`` sandboxes
through their whole life concurrently, while another front end comes and goes; nothing fails
that the test did not cause, and nothing is left behind."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest
from mcp.client import Client

from tests.e2e.conftest import HttpDaemon, call, daemon_pids, http_client, http_daemon, serve
from tests.e2e.leaks import assert_no_leaks, snapshot
from tests.netns import EGRESS_TO_OUTSIDE_HOSTS

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SANDBOXES = 50
"""Sandboxes alive at once at the peak, across all clients."""
EGRESS_EVERY = 5
"""Every fifth sandbox has egress networking (a veth, nftables rules, a resolver of its own)."""
STDIO_FRONT_ENDS = 3
PAYLOAD_BYTES = 256 << 10
WHOLE_TEST = 90.0
"""Bound on the whole run; it takes 8-10 s on the project's machine (2 cores)."""


def _policy(workdir: Path, network: str = "") -> str:
    # absolute: HTTP clients have no working directory of their own on the host
    return f'[files]\nallowed_host_dirs = ["{workdir}"]\n\n[sandboxes]\nmax_live = 64\n{network}'


@pytest.fixture
def stress_daemon(box_lifetime: None, tmp_path: Path, workdir: Path) -> Iterator[HttpDaemon]:
    """The daemon with the test's policies, HTTP on loopback for one token, and no rate limit
    (the three stdio front ends are one identity, uid 0, and would share one)."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "stress.toml").write_text(_policy(workdir))
    (policies / "stress-egress.toml").write_text(_policy(workdir, EGRESS_TO_OUTSIDE_HOSTS))
    options = ["--policy-dir", str(policies), "--max-calls-per-second", "0"]
    with http_daemon(["stress"], options) as daemon:
        yield daemon


class _Gate:
    """Opens once ``parties`` have arrived (a barrier that a failed party still passes)."""

    def __init__(self, parties: int) -> None:
        self._left = parties
        self._open = anyio.Event()

    def arrive(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._open.set()

    async def wait(self) -> None:
        with anyio.fail_after(120):
            await self._open.wait()


async def test_many_clients_drive_many_sandboxes_at_once(stress_daemon: HttpDaemon, workdir: Path) -> None:
    before = await snapshot()
    daemon = daemon_pids()
    errors: list[str] = []
    all_created = _Gate(SANDBOXES)
    lives_done = anyio.Event()
    churned = 0
    params = serve(cwd=workdir)
    started = time.monotonic()

    async def life(index: int, client: Client) -> None:
        """Create, exec, copy in, (all alive) check, copy out, destroy: one sandbox's life."""
        egress = index % EGRESS_EVERY == 0
        arrived = False
        sandbox = None
        try:
            created = await call(client, "create_sandbox", policy="stress-egress" if egress else "stress")
            sandbox = created["sandbox_id"]
            payload = os.urandom(PAYLOAD_BYTES)
            digest = hashlib.sha256(payload).hexdigest()
            (workdir / f"in-{index}").write_bytes(payload)
            ran = await call(
                client,
                "exec_in_sandbox",
                sandbox_id=sandbox,
                command=f"echo {index} > /root/index; cat /root/index",
            )
            assert ran["stdout"] == f"{index}\n", ran
            copied = await call(
                client,
                "copy_file",
                sandbox_id=sandbox,
                source=str(workdir / f"in-{index}"),
                destination="/root/payload",
                direction="to_sandbox",
            )
            assert copied["sha256"] == digest
            arrived = True
            all_created.arrive()
            await all_created.wait()  # every sandbox is alive now

            check = "cat /root/index; sha256sum /root/payload | cut -d' ' -f1"
            ran = await call(client, "exec_in_sandbox", sandbox_id=sandbox, command=check)
            assert ran["stdout"].split() == [str(index), digest], ran
            if egress:  # its own resolver, on the host end of its veth
                resolv = await call(
                    client, "exec_in_sandbox", sandbox_id=sandbox, command="cat /etc/resolv.conf"
                )
                assert resolv["stdout"].startswith("nameserver 10.213."), resolv
            out = await call(
                client,
                "copy_file",
                sandbox_id=sandbox,
                source="/root/payload",
                destination=str(workdir / f"out-{index}"),
                direction="from_sandbox",
            )
            assert out["sha256"] == digest
            assert (workdir / f"out-{index}").read_bytes() == payload
            await call(client, "destroy_sandbox", sandbox_id=sandbox)
        except Exception as exc:  # every failure is reported, not only the first
            errors.append(f"sandbox {index} ({'egress' if egress else 'no network'}): {exc!r}")
            if sandbox is not None:  # an HTTP client's would outlive it (until its TTL)
                with anyio.move_on_after(30, shield=True):
                    await client.call_tool("destroy_sandbox", {"sandbox_id": sandbox})
        finally:
            if not arrived:
                all_created.arrive()

    async def churn() -> None:
        """A front end that starts, looks, sometimes makes a sandbox, and goes, over and over."""
        nonlocal churned
        while not lives_done.is_set():
            try:
                with anyio.fail_after(60):
                    async with Client(params) as passer_by:
                        listed = await call(passer_by, "list_sandboxes")
                        assert listed["sandboxes"] == [], listed  # nobody else's are visible
                        if churned % 2:  # left behind: the disconnect destroys it
                            await call(passer_by, "create_sandbox", policy="stress")
            except Exception as exc:
                errors.append(f"passer-by {churned}: {exc!r}")
            churned += 1

    with anyio.fail_after(WHOLE_TEST):
        async with AsyncExitStack() as stack:
            clients: list[Client] = [
                await stack.enter_async_context(Client(params)) for _ in range(STDIO_FRONT_ENDS)
            ]
            url, token = stress_daemon.url, stress_daemon.tokens["stress"]
            clients.append(await stack.enter_async_context(http_client(url, token)))
            async with anyio.create_task_group() as outer:
                outer.start_soon(churn)
                async with anyio.create_task_group() as lives:
                    for index in range(SANDBOXES):
                        lives.start_soon(life, index, clients[index % len(clients)])
                lives_done.set()
            for client in clients:  # the clients destroyed everything they made
                assert (await call(client, "list_sandboxes"))["sandboxes"] == []
        elapsed = time.monotonic() - started
        await assert_no_leaks(before)

    assert errors == []
    assert churned >= 2, "the passer-by front end never came and went"
    assert daemon_pids() == daemon, "the daemon restarted during the run"
    print(f"{SANDBOXES} sandboxes, {churned} passer-by connections: {elapsed:.1f} s")
