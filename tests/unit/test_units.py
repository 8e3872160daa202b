"""What systemd is asked to run for a sandbox, pinned: any change here is a reviewable diff."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from inline_snapshot import snapshot

from nspawn_mcp.backend.properties import encode
from nspawn_mcp.backend.units import SandboxPaths, build_units
from nspawn_mcp.policy import BindMount, CreateRequest, Policy, resolve_create

PLAN = resolve_create(
    "default", Policy(), CreateRequest(memory_mb=256, cpus=0.5, max_processes=64, ttl_seconds=600), cwd="/srv"
)
PATHS = SandboxPaths(
    root="/var/lib/machines/sbx-0123abcd",
    lib_dir="/var/lib/nspawn-mcp/lib",
)
UNITS = build_units("sbx-0123abcd", PLAN, PATHS)


def test_nspawn_command_line() -> None:
    assert UNITS.argv == snapshot(
        [
            "/usr/bin/systemd-nspawn",
            "--quiet",
            "--keep-unit",
            "--register=yes",
            "--settings=no",
            "--machine=sbx-0123abcd",
            "--directory=/var/lib/machines/sbx-0123abcd",
            "--private-users=pick",
            "--private-users-ownership=map",
            "--private-network",
            "--link-journal=no",
            "--resolv-conf=off",
            "--timezone=off",
            "--console=pipe",
            "--as-pid2",
            "--system-call-filter=~io_uring_setup io_uring_enter io_uring_register",
            "--setenv=MALLOC_ARENA_MAX=1",
            "--tmpfs=/dev/shm:mode=1777,size=67108864",
            "--bind-ro=/var/lib/nspawn-mcp/lib:/run/nspawn-mcp/lib",
            "--",
            "/usr/bin/python3",
            "-I",
            "-S",
            "-c",
            "import sys; sys.path.insert(0, '/run/nspawn-mcp/lib'); import supervisor; sys.exit(supervisor.main(sys.argv))",
            "fd:0",
        ]
    )


def test_host_binds_never_reach_nspawn() -> None:
    """nspawn binds paths; the backend attaches binds itself, from checked descriptors."""
    bind = BindMount(root="/srv", source="/srv/src", target="/work", writable=True, device=1, inode=2)
    with_binds = build_units("sbx-0123abcd", replace(PLAN, mounts=(bind,)), PATHS)
    assert with_binds.argv == UNITS.argv


def test_service_properties() -> None:
    assert UNITS.service_name == "nspawn-mcp-sbx-0123abcd.service"
    assert {k: v for k, v in UNITS.service_properties.items() if k != "ExecStart"} == snapshot(
        {
            "Description": "nspawn-mcp sandbox sbx-0123abcd",
            "Slice": "nspawnmcp-0123abcd.slice",
            "CollectMode": "inactive-or-failed",
            "Type": "notify",
            "NotifyAccess": "main",
            "KillMode": "mixed",
            "Delegate": True,
            "DevicePolicy": "closed",
            "DeviceAllow": [("char-pts", "rw")],
            "TimeoutStartUSec": 30000000,
            "TimeoutStopUSec": 5000000,
            "SuccessExitStatus": ([1], [9]),
            "RuntimeMaxUSec": 86400000000,
            "StandardOutput": "journal",
            "StandardError": "journal",
            "NoNewPrivileges": True,
            "RestrictAddressFamilies": (True, ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]),
        }
    )


def test_slice_carries_the_caps() -> None:
    assert UNITS.slice_name == "nspawnmcp-0123abcd.slice"
    assert UNITS.slice_properties == snapshot(
        {
            "Description": "nspawn-mcp sandbox sbx-0123abcd (policy default)",
            "CollectMode": "inactive-or-failed",
            "MemoryAccounting": True,
            "MemoryMax": 268435456,
            "MemorySwapMax": 0,
            "TasksAccounting": True,
            "TasksMax": 64,
            "CPUAccounting": True,
            "CPUQuotaPerSecUSec": 500000,
        }
    )


def test_every_property_is_in_the_signature_table() -> None:
    encoded = encode(UNITS.service_properties) + encode(UNITS.slice_properties)
    assert ("MemoryMax", "t", 256 << 20) in encoded
    assert ("CPUQuotaPerSecUSec", "t", 500_000) in encoded
    assert encode({"RestartPreventExitStatus": ((78,), ())}) == [
        ("RestartPreventExitStatus", "(aiai)", [[78], []])
    ]


@pytest.mark.parametrize(
    ("properties", "message"),
    [
        ({"MemroyMax": 1}, "not in the property table"),
        ({"MemoryMax": "1G"}, "needs D-Bus type t"),
        ({"MemoryMax": -1}, "needs D-Bus type t"),
        ({"Delegate": 1}, "needs D-Bus type b"),
        ({"ExecStart": [("/bin/true", "true", False)]}, "needs D-Bus type a(sasb)"),
        ({"RestartPreventExitStatus": [78]}, "needs D-Bus type (aiai)"),
        ({"RestartPreventExitStatus": (["78"], [])}, "needs D-Bus type (aiai)"),
    ],
)
def test_bad_properties_fail_before_reaching_systemd(properties: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        encode(properties)


def test_the_host_network_only_when_the_policy_says_so() -> None:
    host_policy = Policy.model_validate({"network": {"mode": "host"}})
    plan = resolve_create("trusted", host_policy, CreateRequest(), cwd="/srv")
    assert "--private-network" not in build_units("sbx-0123abcd", plan, PATHS).argv
    assert "--private-network" in UNITS.argv
