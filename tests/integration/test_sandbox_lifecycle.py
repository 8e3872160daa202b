"""The real backend against real systemd + machined: what the daemons report, not what we believe."""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.backend.api import CommandOutcome, CommandSpec
from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.errors import BackendError, CopyRefused
from nspawn_mcp.layout import Layout
from nspawn_mcp.naming import new_sandbox_id, service_unit, slice_unit
from nspawn_mcp.policy import Policy, PolicySet
from nspawn_mcp.policy.loader import shipped_policy_dir
from nspawn_mcp.provision import QuotaMode, choose_quotas, disable_quotas, enable_quotas, quota_mode
from nspawn_mcp.runtime import Daemons
from tests.integration.conftest import Factory, HostView, plan

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def command(*argv: str, timeout: float = 30, stdin: bytes = b"", user: str = "root") -> CommandSpec:
    return CommandSpec(
        argv=argv, cwd=None, env={}, stdin=stdin, timeout_seconds=timeout, max_output_bytes=1 << 20, user=user
    )


async def run(backend: NspawnBackend, sandbox_id: str, script: str, timeout: float = 30) -> CommandOutcome:
    return await backend.jail(sandbox_id).run(command("/bin/sh", "-c", script, timeout=timeout))


def status_fields(text: str, *names: str) -> dict[str, str]:
    found = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return {name: found[name].strip() for name in names}


async def test_a_created_sandbox_is_a_registered_machine_in_its_own_slice(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    sandbox = await make_sandbox()
    machines = {m.name: m for m in await backend.machined.list_machines()}
    assert machines[sandbox].machine_class == "container"
    assert await backend.machined.machine_unit(sandbox) == service_unit(sandbox)
    units = {u.name: u for u in await backend.systemd.list_units([f"*{sandbox.removeprefix('sbx-')}*"])}
    assert units[service_unit(sandbox)].active_state == "active"
    assert units[slice_unit(sandbox)].active_state == "active"
    assert await backend.systemd.unit_property(
        service_unit(sandbox), "org.freedesktop.systemd1.Service", "Slice"
    ) == slice_unit(sandbox)
    assert sandbox in await backend.running()


async def test_the_snapshot_is_a_copy_on_write_subvolume(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    sandbox = await make_sandbox()
    images = {image.name: image for image in await backend.machined.list_images()}
    assert images[sandbox].image_type == "subvolume"
    assert images[sandbox].read_only is False
    assert images["nspawn-mcp-default"].read_only is True


async def test_caps_reach_the_cgroup_files(backend: NspawnBackend, make_sandbox: Factory) -> None:
    sandbox = await make_sandbox(memory_mb=192, cpus=0.5, max_processes=48)
    slice_path = f"nspawnmcp.slice/{slice_unit(sandbox)}"
    memory = HostView.cgroup_file(slice_path, "memory", "memory.limit_in_bytes", "memory.max")
    pids = HostView.cgroup_file(slice_path, "pids", "pids.max", "pids.max")
    assert int(memory.read_text()) == 192 << 20
    assert int(pids.read_text()) == 48
    quota = HostView.cgroup_file(slice_path, "cpu", "cpu.cfs_quota_us", "cpu.max")
    assert quota.read_text().split()[0] == "50000"


async def test_root_inside_is_an_unprivileged_uid_outside(
    backend: NspawnBackend, make_sandbox: Factory, host: HostView
) -> None:
    sandbox = await make_sandbox()
    inside = await run(backend, sandbox, "id -u; cat /proc/self/uid_map")
    assert inside.stdout.split(b"\n")[0] == b"0"
    leader = await backend.machined.machine_leader(sandbox)
    host_uid = int(status_fields(host.process_status(leader), "Uid")["Uid"].split()[0])
    assert host_uid >= 65536
    # files in the snapshot keep their real owners (ID-mapped, not chowned)
    owners = await run(backend, sandbox, "stat -c %u:%g /usr/bin/python3 /etc/passwd")
    assert owners.stdout == b"0:0\n0:0\n"


async def test_exec_has_the_same_jail_as_the_sandbox_init(
    backend: NspawnBackend, make_sandbox: Factory, host: HostView
) -> None:
    sandbox = await make_sandbox()
    leader = await backend.machined.machine_leader(sandbox)
    init = status_fields(host.process_status(leader), "CapBnd", "Seccomp", "NoNewPrivs")
    outcome = await run(backend, sandbox, "cat /proc/self/status")
    child = status_fields(outcome.stdout.decode(), "CapBnd", "Seccomp", "NoNewPrivs")
    assert child["CapBnd"] == init["CapBnd"]
    assert child["CapBnd"] != "000001ffffffffff"
    assert child["Seccomp"] == init["Seccomp"] == "2"
    assert int(child["NoNewPrivs"]) >= int(init["NoNewPrivs"])


FORK_40 = """python3 - <<'EOF'
import os, time
started = 0
for _ in range(40):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    started += 1
print(f"started={started}")
EOF"""


async def test_exec_processes_count_against_the_pids_cap(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    sandbox = await make_sandbox(max_processes=16)
    outcome = await run(backend, sandbox, FORK_40, 20)
    started = re.search(rb"started=(\d+)", outcome.stdout)
    assert started is not None, outcome
    assert 0 < int(started.group(1)) < 16
    control = await run(backend, sandbox, "echo alive")
    assert control.stdout == b"alive\n"


async def test_a_memory_hog_is_killed_inside_while_the_sandbox_lives_on(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    sandbox = await make_sandbox(memory_mb=64)
    other = await make_sandbox()
    hog = await run(backend, sandbox, "python3 -c 'b = bytearray(256 << 20); print(len(b))'")
    assert hog.exit_code != 0
    assert hog.stdout == b""
    assert (await backend.oom_kills(sandbox) or 0) >= 1
    assert await backend.oom_kills(other) == 0

    assert (await run(backend, sandbox, "echo alive")).stdout == b"alive\n"
    assert (await run(backend, other, "echo alive")).stdout == b"alive\n"


async def test_only_loopback_exists_and_host_listeners_are_unreachable(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    sandbox = await make_sandbox()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        probe = (
            "python3 - <<'EOF'\n"
            "import socket\n"
            f"s = socket.socket(); s.settimeout(2)\n"
            f"print(s.connect_ex(('127.0.0.1', {port})))\n"
            "EOF\n"
            "ls /sys/class/net"
        )
        outcome = await run(backend, sandbox, probe)
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing arrived at the host side
    connect_result, interfaces = outcome.stdout.decode().split("\n", 1)
    assert int(connect_result) != 0
    assert interfaces.split() == ["lo"]
    # control: the sandbox's own loopback works
    own = await run(
        backend,
        sandbox,
        "python3 -c \"import socket; s=socket.create_server(('127.0.0.1',0)); "
        "c=socket.create_connection(s.getsockname()); print('ok')\"",
    )
    assert own.stdout == b"ok\n"


async def test_the_host_network_is_shared_only_under_a_policy_that_says_so(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    sandbox = await make_sandbox(policy=Policy.model_validate({"network": {"mode": "host"}}))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        outcome = await run(
            backend,
            sandbox,
            f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port})); print('ok')\"",
        )
        listener.settimeout(5)
        connection, _ = listener.accept()
        connection.close()
    assert outcome.stdout == b"ok\n"


async def test_copies_round_trip_through_machined_and_the_supervisor(
    backend: NspawnBackend, make_sandbox: Factory, layout: Layout
) -> None:
    sandbox = await make_sandbox()
    staged = layout.staging_dir / f"test-{sandbox}"
    staged.write_bytes(b"payload\x00\xff")
    try:
        await backend.copy_in(sandbox, staged, "/root/payload")
        inside = await run(backend, sandbox, "stat -c %u:%s /root/payload; od -An -c /root/payload")
        assert inside.stdout.startswith(b"0:9\n")
        received = bytearray()

        async def sink(data: bytes) -> None:
            received.extend(data)

        done = await backend.jail(sandbox).read_file("/root/payload", 1 << 20, sink)
        assert (bytes(received), done.size) == (b"payload\x00\xff", 9)
        with pytest.raises(CopyRefused, match="does not exist"):
            await backend.jail(sandbox).read_file("/root/missing", 1 << 20, sink)
    finally:
        staged.unlink()


async def test_destroy_leaves_nothing_behind(
    backend: NspawnBackend, make_sandbox: Factory, host: HostView, layout: Layout
) -> None:
    sandbox = await make_sandbox()
    assert (host.machines_dir / sandbox).is_dir()
    await backend.destroy(sandbox)
    assert sandbox not in {m.name for m in await backend.machined.list_machines()}
    assert await backend.systemd.list_units([f"*{sandbox.removeprefix('sbx-')}*"]) == []
    assert sandbox not in {i.name for i in await backend.machined.list_images()}
    assert not (host.machines_dir / sandbox).exists()
    assert not layout.sandbox_dir(sandbox).exists()
    assert sandbox not in host.mountinfo()
    slice_dir = HostView.cgroup_file(f"nspawnmcp.slice/{slice_unit(sandbox)}", "pids", "", "")
    assert not slice_dir.exists()
    assert sandbox not in await backend.leftovers()
    await backend.destroy(sandbox)  # idempotent


async def test_a_timeout_kills_the_command_not_the_sandbox(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    sandbox = await make_sandbox()
    with anyio.fail_after(20):
        outcome = await run(backend, sandbox, "sleep 1000 & sleep 1000", timeout=1)
    assert outcome.timed_out
    leftover = await run(backend, sandbox, "ps -e -o comm= 2>/dev/null || ls /proc | grep -c '^[0-9]'")
    assert b"sleep" not in leftover.stdout
    assert sandbox in await backend.running()


async def test_twenty_snapshots_cost_little_disk(
    backend: NspawnBackend, make_sandbox: Factory, host: HostView
) -> None:
    def used() -> int:
        stats = os.statvfs(host.machines_dir)
        return (stats.f_blocks - stats.f_bfree) * stats.f_frsize

    before = used()
    for _ in range(20):
        await make_sandbox()
    os.sync()
    assert used() - before < 50 << 20


async def test_a_timeout_also_kills_setsid_escapers(backend: NspawnBackend, make_sandbox: Factory) -> None:
    sandbox = await make_sandbox()
    escape = "setsid sh -c 'exec sleep 1000' >/dev/null 2>&1 </dev/null & sleep 1000"
    with anyio.fail_after(20):
        outcome = await run(backend, sandbox, escape, timeout=1)
    assert outcome.timed_out
    survivors = await run(backend, sandbox, "grep -l '^sleep' /proc/[0-9]*/comm || true")
    assert survivors.stdout == b""


async def test_commands_can_run_as_the_images_unprivileged_user(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    sandbox = await make_sandbox()
    outcome = await backend.jail(sandbox).run(
        command("/bin/sh", "-c", "id -un; id -u; pwd; touch /etc/x", user="sandbox")
    )
    assert outcome.stdout == b"sandbox\n1000\n/home/sandbox\n"
    assert b"Permission denied" in outcome.stderr


async def test_background_processes_outlive_their_request(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    sandbox = await make_sandbox()
    process = await backend.jail(sandbox).spawn(command("/bin/sh", "-c", "echo started; sleep 1000"), None)
    with anyio.fail_after(10):
        while (output := await backend.jail(sandbox).read(process, 0, 0, 1 << 20)).stdout != b"started\n":
            await anyio.sleep(0.01)
    assert output.state.running
    await backend.jail(sandbox).kill(process, 9)
    with anyio.fail_after(10):
        while (await backend.jail(sandbox).read(process, 0, 0, 1 << 20)).state.running:
            await anyio.sleep(0.01)
    survivors = await run(backend, sandbox, "grep -l '^sleep' /proc/[0-9]*/comm || true")
    assert survivors.stdout == b""


@pytest.fixture(scope="session")
def disk_quotas(host: HostView) -> Iterator[None]:
    """Simple quotas on the pool, as `nspawn-mcp setup` leaves it (a pool found without is left so after)."""
    found = quota_mode(host.machines_dir)
    if found is None:
        enable_quotas(host.machines_dir, QuotaMode.SIMPLE)
    yield
    if found is None:
        disable_quotas(host.machines_dir)


@pytest.fixture
def no_disk_quotas(host: HostView, disk_quotas: None) -> Iterator[None]:
    """The pool without quotas for one test; its mode is restored afterwards."""
    found = quota_mode(host.machines_dir)
    assert found is not None
    disable_quotas(host.machines_dir)
    yield
    if quota_mode(host.machines_dir) is None:
        enable_quotas(host.machines_dir, found)


def pool_used(host: HostView) -> int:
    os.sync()
    stats = os.statvfs(host.machines_dir)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


async def test_writing_past_the_disk_quota_fails_inside_only(
    backend: NspawnBackend, make_sandbox: Factory, disk_quotas: None, host: HostView
) -> None:
    sandbox = await make_sandbox(disk_mb=512)
    before = pool_used(host)
    outcome = await run(backend, sandbox, "dd if=/dev/urandom of=/root/fill bs=1M count=600 2>&1; sync", 60)
    assert b"Disk quota exceeded" in outcome.stdout
    assert (await run(backend, sandbox, "echo alive")).stdout == b"alive\n"
    assert pool_used(host) - before < 600 << 20


async def test_the_default_policy_caps_disk_and_a_full_sandbox_starves_no_other(
    backend: NspawnBackend, make_sandbox: Factory, disk_quotas: None, host: HostView
) -> None:
    default = PolicySet.load([shipped_policy_dir()]).get("default")
    cap = default.limits.default.disk
    assert cap is not None
    hog = await make_sandbox(policy=default)
    bystander = await make_sandbox(policy=default)
    before = pool_used(host)

    grab = await run(backend, hog, f"fallocate -l {2 * cap} /root/grab 2>&1; echo $?")
    assert grab.stdout.splitlines() == [b"fallocate: fallocate failed: Disk quota exceeded", b"1"]
    cap_mib = cap >> 20
    fill = await run(
        backend, hog, f"dd if=/dev/zero of=/root/fill bs=1M count={cap_mib + 64} 2>&1; sync", 120
    )
    assert b"Disk quota exceeded" in fill.stdout
    assert pool_used(host) - before < cap + (64 << 20)

    # The control: another sandbox still writes, and a background process's output is kept.
    jail = backend.jail(bystander)
    process = await jail.spawn(
        command("/bin/sh", "-c", "dd if=/dev/zero of=/root/data bs=1M count=64 2>/dev/null && echo written"),
        None,
    )
    with anyio.fail_after(30):
        while (output := await jail.read(process, 0, 0, 1 << 20)).state.running:
            await anyio.sleep(0.01)
    assert output.stdout == b"written\n"
    assert (await run(backend, bystander, "stat -c %s /root/data")).stdout == b"67108864\n"


async def test_without_host_quotas_a_disk_cap_is_refused_clearly(
    backend: NspawnBackend, make_sandbox: Factory, no_disk_quotas: None
) -> None:
    with pytest.raises(BackendError, match=r"disk quotas are off .* run `nspawn-mcp setup`"):
        await make_sandbox(disk_mb=512)


async def test_setup_enables_simple_quotas_only_on_a_pool_of_its_own(
    host: HostView, no_disk_quotas: None
) -> None:
    assert "does not enable quotas" in choose_quotas(
        host.machines_dir, QuotaMode.SIMPLE, own_filesystem=False
    )
    assert quota_mode(host.machines_dir) is None
    assert "enabled disk quotas (simple)" in choose_quotas(host.machines_dir, QuotaMode.SIMPLE)
    assert quota_mode(host.machines_dir) is QuotaMode.SIMPLE
    assert "as found" in choose_quotas(host.machines_dir, QuotaMode.CLASSIC)
    assert quota_mode(host.machines_dir) is QuotaMode.SIMPLE


POSTURE_PROBE = (Path(__file__).parent / "probes" / "posture.py").read_bytes()


async def test_the_kernels_dangerous_interfaces_are_out_of_reach(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    sandbox = await make_sandbox()
    outcome = await backend.jail(sandbox).run(command("python3", "-", stdin=POSTURE_PROBE))
    assert outcome.stderr == b""
    assert json.loads(outcome.stdout) == {
        "add_key": "EPERM",
        "bpf": "EPERM",
        "finit_module": "EPERM",
        "init_module": "EPERM",
        "io_uring_setup": "EPERM",
        "kexec_load": "EPERM",
        "keyctl": "EPERM",
        "open_by_handle_at": "EPERM",
        "perf_event_open": "EPERM",
        "settimeofday": "EPERM",
        "swapon": "EPERM",
        "userfaultfd": "EPERM",
        "reboot": "EINVAL",  # in a pid namespace reboot(2) can only end that namespace
        "mknod /dev/sda": "EPERM",
        "read /dev/kmsg": "ENOENT",
        "read /dev/mem": "ENOENT",
        "read /proc/kcore": "ENOENT",
        "write /proc/sysrq-trigger": "ENOENT",
        "write core_pattern": "EROFS",
        "write uevent_helper": "EROFS",
        "kallsyms addresses": "hidden",
        "host dbus socket": "absent",
        "systemd private socket": "absent",
        "processes visible": "3",  # nspawn's stub init, the supervisor, the probe: no host PIDs
    }


async def test_a_planted_nspawn_settings_file_is_ignored(
    backend: NspawnBackend, host: HostView, daemons: Daemons
) -> None:
    sandbox_id = new_sandbox_id()
    settings = host.machines_dir / f"{sandbox_id}.nspawn"
    settings.write_text("[Files]\nBind=/etc:/host-etc\n[Network]\nPrivate=no\nVirtualEthernet=no\n")
    try:
        await backend.create(sandbox_id, plan())
        outcome = await run(
            backend, sandbox_id, "test -e /host-etc && echo bound || echo absent; ls /sys/class/net"
        )
        assert outcome.stdout == b"absent\nlo\n"
    finally:
        await backend.destroy(sandbox_id)
        settings.unlink(missing_ok=True)  # machined removes an image's settings file with it
