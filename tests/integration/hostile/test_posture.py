"""What every process of a sandbox has, pinned from the host side (HOSTILE-TESTS E29).

Each denial is paired with a control that proves the probe would have seen the attack work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.policy import Policy
from tests.integration.conftest import Factory, HostView
from tests.integration.test_sandbox_lifecycle import command, run, status_fields
from tests.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PROBES = Path(__file__).parents[1] / "probes"
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "user")
NSPAWN_BOUNDING_SET = 0xFDECBFFF
"""nspawn's default capability set for containers (CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_TIME,
CAP_MAC_*, CAP_BPF, CAP_PERFMON, ... dropped); the same for every process of the sandbox."""


def sandbox_processes(host: HostView, leader: int) -> dict[int, str]:
    """PID -> comm of the leader and all its descendants, as the daemons number them."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in (host.root / "proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            names[int(entry.name)] = stat[stat.index("(") + 1 : stat.rindex(")")]
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found = {leader}
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return {pid: names[pid] for pid in found}


def fd_targets(host: HostView, pid: int) -> dict[int, str]:
    directory = host.root / "proc" / str(pid) / "fd"
    return {int(fd): os.readlink(directory / fd) for fd in os.listdir(directory)}


async def test_every_process_of_a_sandbox_has_the_pinned_posture(
    backend: NspawnBackend, make_sandbox: Factory, host: HostView
) -> None:
    sandbox = await make_sandbox()
    await backend.jail(sandbox).spawn(command("sleep", "300"), None)
    leader = await backend.machined.machine_leader(sandbox)
    processes: dict[int, str] = {}

    def three_processes() -> bool:
        processes.update(sandbox_processes(host, leader))
        return sorted(processes.values()) == ["(sd-stubinit)", "python3", "sleep"]

    await wait_until(three_processes, what="stub init, supervisor and sleep")
    ours = {name: os.readlink(f"/proc/self/ns/{name}") for name in NAMESPACES}
    daemons = {name: os.readlink(host.root / "proc/1/ns" / name) for name in NAMESPACES}
    for pid, name in processes.items():
        proc = host.root / "proc" / str(pid)
        status = status_fields((proc / "status").read_text(), "CapBnd", "CapEff", "NoNewPrivs", "Seccomp")
        assert int(status["CapBnd"], 16) == NSPAWN_BOUNDING_SET, name
        assert int(status["CapEff"], 16) & ~NSPAWN_BOUNDING_SET == 0, name
        assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2"), name
        inside, outside, count = (proc / "uid_map").read_text().split()
        assert (inside, count) == ("0", "65536")
        assert int(outside) >= 0x80000, f"{name}: root inside is host uid {outside}"
        for namespace in NAMESPACES:
            mine = os.readlink(proc / "ns" / namespace)
            assert mine not in (ours[namespace], daemons[namespace]), (
                f"{name} shares the {namespace} namespace"
            )
        fds = fd_targets(host, pid)
        if name == "sleep":  # a command: its three pipes, nothing else
            assert sorted(fds) == [0, 1, 2]
            assert all(target.startswith("pipe:") for target in fds.values())
        else:  # nothing opened from the host's tree reaches the sandbox
            assert all(
                target.startswith(
                    (
                        "pipe:",
                        "socket:",
                        "anon_inode:",
                        "/dev/null",
                        "/var/tmp/.nspawn-mcp/",
                        "/sys/fs/cgroup/",
                    )
                )
                for target in fds.values()
            ), f"{name}: {fds}"


FAMILIES_PROBE = (PROBES / "families.py").read_bytes()


async def test_address_families_a_sandbox_has_no_use_for_are_refused(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    sandbox = await make_sandbox()
    outcome = await backend.jail(sandbox).run(command("python3", "-", stdin=FAMILIES_PROBE))
    assert json.loads(outcome.stdout) == {
        # the allowed ones are the control: the probe sees a family that works
        "AF_UNIX": "allowed",
        "AF_INET": "allowed",
        "AF_INET6": "allowed",
        "AF_NETLINK": "allowed",
        # vsock is not confined by network namespaces: on a VM host it reaches the hypervisor
        "AF_VSOCK": "EAFNOSUPPORT",
        "AF_PACKET": "EAFNOSUPPORT",
        "AF_KEY": "EAFNOSUPPORT",
        "AF_BLUETOOTH": "EAFNOSUPPORT",
        "AF_ALG": "EAFNOSUPPORT",
        "AF_XDP": "EAFNOSUPPORT",
    }


@pytest.mark.parametrize(("no_new_privileges", "euid"), [(True, b"1000\n"), (False, b"0\n")])
async def test_setuid_programs_gain_nothing_unless_the_policy_allows_them(
    backend: NspawnBackend, make_sandbox: Factory, no_new_privileges: bool, euid: bytes
) -> None:
    """The policy that allows setuid is the control: the same program then does become root."""
    policy = Policy.model_validate({"exec": {"no_new_privileges": no_new_privileges}})
    sandbox = await make_sandbox(policy=policy)
    # not in /tmp: nspawn mounts it nosuid, which would hide the control's effect
    planted = await run(
        backend, sandbox, "cp /usr/bin/python3 /usr/local/bin/s && chmod 4755 /usr/local/bin/s"
    )
    assert planted.exit_code == 0
    as_user = command("/usr/local/bin/s", "-c", "import os; print(os.geteuid())", user="sandbox")
    outcome = await backend.jail(sandbox).run(as_user)
    assert (outcome.exit_code, outcome.stdout) == (0, euid), outcome.stderr


async def test_the_oom_killer_picks_commands_not_the_supervisor(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    """A command filling /dev/shm past the memory cap, then a memory hog: the sandbox keeps answering."""
    sandbox = await make_sandbox(memory_mb=128)
    adjusted = await run(backend, sandbox, "cat /proc/self/oom_score_adj /proc/2/oom_score_adj")
    assert adjusted.stdout == b"1000\n0\n"  # the control: commands are the chosen ones
    await run(backend, sandbox, "head -c 200M /dev/zero > /dev/shm/fill; echo $?", timeout=60)
    hog = await run(backend, sandbox, "python3 -c 'b = bytearray(300 << 20)'", timeout=60)
    assert hog.exit_code != 0
    alive = await run(backend, sandbox, "rm -f /dev/shm/fill; echo alive")
    assert alive.stdout == b"alive\n"
