"""Snapshots, forks and restores on the real daemons, through the service and the real backend.

What they promise: a snapshot holds the files written before it and nothing after; a
fork starts from those files and is independent of its parent and of its siblings; a
restore rolls the sandbox back (its processes restarted); the sandbox's processes are
frozen while a snapshot is taken, so one taken while a process writes is consistent;
and nothing of a snapshot or a fork outlives its sandbox (destroy, or a daemon killed
in the middle of a fork and started again) unless the policy keeps it as an image.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.commands import CommandRequest
from nspawn_mcp.errors import NotFound, PolicyRefused
from nspawn_mcp.images import Catalog
from nspawn_mcp.layout import Layout
from nspawn_mcp.naming import freezer_group, kept_image, template_image
from nspawn_mcp.policy import CreateRequest, PolicySet
from nspawn_mcp.policy.loader import load_policy_text
from nspawn_mcp.service import SandboxService
from tests.integration.conftest import HostView
from tests.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

POLICY = """
[snapshots]
max_per_sandbox = 4
keep_as_images = true
"""
FREEZER = Path("/sys/fs/cgroup/freezer")


def _service(backend: NspawnBackend, state: Path) -> SandboxService:
    policies = PolicySet({"default": load_policy_text(POLICY, "default.toml")})
    return SandboxService(
        backend, policies, records_dir=state / "records", cwd=str(state), catalog=Catalog(state / "images")
    )


@pytest.fixture
async def service(backend: NspawnBackend, tmp_path: Path) -> AsyncIterator[SandboxService]:
    made = _service(backend, tmp_path)
    try:
        yield made
    finally:
        with anyio.CancelScope(shield=True):
            for sandbox in made.list():
                await made.destroy(sandbox.sandbox_id)


async def sh(service: SandboxService, sandbox: str, script: str) -> str:
    result = await service.exec(sandbox, CommandRequest(command=script))
    assert result.exit_code == 0, result.stderr
    return result.stdout


async def ours(backend: NspawnBackend, *sandboxes: str) -> list[str]:
    """Whatever the daemons (and the host) still hold of these sandboxes: machines, images, units,
    freezer cgroups."""
    suffixes = [sandbox.removeprefix("sbx-") for sandbox in sandboxes]
    found = [m.name for m in await backend.machined.list_machines()]
    found += [i.name for i in await backend.machined.list_images()]
    found += [u.name for u in await backend.systemd.list_units([f"*{s}*" for s in suffixes])]
    found += [str(FREEZER / freezer_group(s)) for s in sandboxes if (FREEZER / freezer_group(s)).exists()]
    return [name for name in found if any(s in name for s in suffixes)]


async def test_a_fork_has_the_files_written_before_its_snapshot_and_a_restore_drops_later_ones(
    service: SandboxService,
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await sh(service, sandbox, "echo one > /root/before")
    taken = await service.snapshots.take(sandbox, "first")
    assert taken.name == "first"
    await sh(service, sandbox, "echo two > /root/after")
    sleeper = await service.start_background(sandbox, CommandRequest(command="sleep 1000"))

    (fork,) = (await service.snapshots.fork(sandbox, snapshot="first")).sandboxes
    assert await sh(service, fork.sandbox_id, "cat /root/before; ls /root") == "one\nbefore\n"
    (current,) = (await service.snapshots.fork(sandbox)).sandboxes
    assert await sh(service, current.sandbox_id, "ls /root") == "after\nbefore\n"
    assert fork.limits == current.limits == (await service.status(sandbox)).limits

    restored = await service.snapshots.restore(sandbox, "first")
    assert restored.gone_processes == [sleeper.process_id]
    assert await sh(service, sandbox, "ls /root") == "before\n"
    assert (await service.list_processes(sandbox)).processes == []
    assert [s.name for s in service.snapshots.listing(sandbox).snapshots] == ["first"]
    await service.snapshots.delete(sandbox, "first")
    with pytest.raises(NotFound, match="no snapshot 'first'"):
        await service.snapshots.restore(sandbox, "first")


async def test_forks_are_independent_of_each_other_and_of_their_parent(service: SandboxService) -> None:
    parent = (await service.create(CreateRequest())).sandbox_id
    await sh(service, parent, "echo base > /root/shared")
    forks = [info.sandbox_id for info in (await service.snapshots.fork(parent, count=3)).sandboxes]
    assert len(set(forks)) == 3
    for index, fork in enumerate(forks):
        await sh(service, fork, f"echo {index} > /root/shared; touch /root/only-{index}")
    await sh(service, parent, "touch /root/only-parent")
    assert await sh(service, parent, "cat /root/shared; ls /root") == "base\nonly-parent\nshared\n"
    for index, fork in enumerate(forks):
        assert await sh(service, fork, "cat /root/shared; ls /root") == f"{index}\nonly-{index}\nshared\n"


async def test_a_snapshot_taken_while_a_process_writes_is_consistent(
    service: SandboxService, backend: NspawnBackend, host: HostView
) -> None:
    """The writer appends each number to a, then to b: frozen at any instant, a is b or one ahead."""
    sandbox = (await service.create(CreateRequest())).sandbox_id
    writer = "i=0; while :; do i=$((i+1)); echo $i >> /root/a; echo $i >> /root/b; done"
    await service.start_background(sandbox, CommandRequest(command=writer))
    files = host.machines_dir / sandbox / "root"
    await wait_until(lambda: (files / "b").exists(), what="the writer to start")
    for round_ in range(4):
        name = f"s{round_}"
        await service.snapshots.take(sandbox, name)
        taken = host.machines_dir / f"nspawnmcp-snap-{sandbox.removeprefix('sbx-')}-{name}" / "root"
        a, b = (taken / "a").read_text(), (taken / "b").read_text()
        assert a.endswith("\n")
        assert b.endswith("\n")
        count_a, count_b = len(a.splitlines()), len(b.splitlines())
        assert count_b > 0
        assert count_a in (count_b, count_b + 1), (count_a, count_b)
        await service.snapshots.delete(sandbox, name)


async def test_a_frozen_sandbox_writes_nothing_until_thawed(
    backend: NspawnBackend, service: SandboxService, host: HostView
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await service.start_background(sandbox, CommandRequest(command="while :; do echo x >> /root/log; done"))
    log = host.machines_dir / sandbox / "root" / "log"
    await wait_until(lambda: log.exists() and log.stat().st_size > 0, what="the writer to start")
    size = log.stat().st_size
    await wait_until(lambda: log.stat().st_size > size, what="the writer to write (the control)")
    async with backend._freezer.frozen(sandbox):
        size = log.stat().st_size
        await anyio.sleep(0.3)  # nothing may change for a while: there is no event for "nothing happened"
        assert log.stat().st_size == size
    await wait_until(lambda: log.stat().st_size > size, what="the writer to write again once thawed")


async def test_the_policy_caps_snapshots_and_says_which_rule(service: SandboxService) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    for _ in range(4):
        await service.snapshots.take(sandbox)
    with pytest.raises(PolicyRefused, match=r"allows 4 snapshots per sandbox") as refused:
        await service.snapshots.take(sandbox)
    assert refused.value.rule == "snapshots.max_per_sandbox"


async def test_a_kept_snapshot_outlives_its_sandbox_as_an_image_for_its_policy(
    service: SandboxService, backend: NspawnBackend, tmp_path: Path
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await sh(service, sandbox, "echo kept > /root/mark")
    kept = await service.snapshots.take(sandbox, "golden", keep=True)
    image = kept_image(sandbox, "golden")
    assert kept.kept_as_image == image
    try:
        await service.destroy(sandbox)
        listed = {i.name: i for i in (await service.list_images()).images}
        assert listed[image].policies == ["default"]
        assert listed[image].source == "snapshot"
        started = (await service.create(CreateRequest(image=image))).sandbox_id
        assert await sh(service, started, "cat /root/mark") == "kept\n"
    finally:
        with anyio.CancelScope(shield=True):
            for live in service.list():
                await service.destroy(live.sandbox_id)
            await backend.machined.remove_image(template_image(image))
            Catalog(tmp_path / "images").remove(image)


async def test_destroying_sandboxes_with_snapshots_and_forks_leaves_nothing(
    service: SandboxService, backend: NspawnBackend
) -> None:
    parent = (await service.create(CreateRequest())).sandbox_id
    await service.snapshots.take(parent, "a")
    await service.snapshots.take(parent, "b")
    forks = [f.sandbox_id for f in (await service.snapshots.fork(parent, count=2)).sandboxes]
    forks += [f.sandbox_id for f in (await service.snapshots.fork(parent, snapshot="a")).sandboxes]
    assert await ours(backend, parent)  # the control: its machine, image, units and snapshots are seen
    for sandbox in [parent, *forks]:
        await service.destroy(sandbox)
    assert await ours(backend, parent, *forks) == []


_FORK_AND_DIE = """
import anyio, sys
from pathlib import Path
from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.layout import Layout
from nspawn_mcp.policy import CreateRequest
from nspawn_mcp.runtime import find_daemons
from tests.integration.test_snapshots import _service

async def main() -> None:
    layout = Layout.from_env()
    daemons = find_daemons(layout)
    backend = await NspawnBackend.connect(daemons.bus_address, layout, proc_root=daemons.proc_root)
    service = _service(backend, Path(sys.argv[1]))
    parent = (await service.create(CreateRequest())).sandbox_id
    print(parent, flush=True)
    while True:  # until killed: forks, and their removal when they are destroyed
        forks = await service.snapshots.fork(parent, count=3)
        for fork in forks.sandboxes:
            await service.destroy(fork.sandbox_id)

anyio.run(main)
"""


async def test_a_daemon_killed_during_a_fork_leaves_nothing_after_the_next_start(
    backend: NspawnBackend, tmp_path: Path, layout: Layout
) -> None:
    records = tmp_path / "records"
    process = await anyio.open_process(
        [sys.executable, "-c", _FORK_AND_DIE, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=None,
        cwd=Path(__file__).parents[2],
        env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert process.stdout is not None
        line = b""
        with anyio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive(1)
        parent = line.decode().strip()
        assert parent.startswith("sbx-"), parent
        # killed while forks are half made: more records than the parent's
        await wait_until(lambda: len(list(records.glob("sbx-*.json"))) > 2, timeout=30, what="forks")
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    forks = {path.stem for path in records.glob("sbx-*.json")} - {parent}
    assert forks  # the control: the killed daemon left half-made forks behind

    restarted = _service(backend, tmp_path)
    await restarted.reconcile()
    try:
        assert [s.sandbox_id for s in restarted.list()] == [parent]
        assert await ours(backend, *forks) == []
        assert [n for n in await ours(backend, parent) if "fork" in n] == []  # its fork snapshots too
    finally:
        with anyio.CancelScope(shield=True):
            await restarted.destroy(parent)
    assert await ours(backend, parent) == []
