"""Resolving create and exec requests against a policy: defaults, maxima, refusals naming the rule."""

from __future__ import annotations

import pytest

from nspawn_mcp.errors import InvalidRequest, PolicyRefused
from nspawn_mcp.policy import (
    CreateRequest,
    ExecRequest,
    Policy,
    confine_host_path,
    resolve_create,
    resolve_exec,
)
from nspawn_mcp.policy.loader import load_policy_text

POLICY = load_policy_text(
    """
    [limits.default]
    memory = "256MiB"
    cpus = 0.5
    processes = 64
    ttl_seconds = 600
    [limits.max]
    memory = "1GiB"
    cpus = 2.0
    processes = 512
    ttl_seconds = 3600
    [exec]
    default_timeout_seconds = 30
    max_timeout_seconds = 120
    max_output_bytes = "64KiB"
    max_stdin_bytes = "1KiB"
    [files]
    allowed_host_dirs = [".", "/srv/data"]
    [sandboxes]
    images = ["default", "tools"]
    """,
    "test.toml",
)


def test_an_empty_request_gets_the_policy_defaults() -> None:
    plan = resolve_create("test", POLICY, CreateRequest(), cwd="/home/op/project")
    assert plan.policy == "test"
    assert plan.image == "default"
    assert plan.network == "none"
    assert (plan.limits.memory_bytes, plan.limits.cpus, plan.limits.processes, plan.limits.ttl_seconds) == (
        256 << 20,
        0.5,
        64,
        600,
    )
    assert plan.allowed_host_roots == ("/home/op/project", "/srv/data")


def test_requests_within_the_maxima_are_granted() -> None:
    request = CreateRequest(image="tools", memory_mb=1024, cpus=2, max_processes=512, ttl_seconds=3600)
    limits = resolve_create("test", POLICY, request, cwd="/srv").limits
    assert (limits.memory_bytes, limits.cpus, limits.processes, limits.ttl_seconds) == (
        1 << 30,
        2.0,
        512,
        3600,
    )


@pytest.mark.parametrize(
    ("request_", "rule"),
    [
        (CreateRequest(memory_mb=1025), "limits.max.memory"),
        (CreateRequest(cpus=2.5), "limits.max.cpus"),
        (CreateRequest(max_processes=513), "limits.max.processes"),
        (CreateRequest(ttl_seconds=3601), "limits.max.ttl_seconds"),
        (CreateRequest(image="kali"), "sandboxes.images"),
    ],
)
def test_requests_above_the_policy_are_refused_naming_the_rule(request_: CreateRequest, rule: str) -> None:
    with pytest.raises(PolicyRefused) as caught:
        resolve_create("test", POLICY, request_, cwd="/")
    assert caught.value.rule == rule
    assert f"(policy rule: {rule})" in str(caught.value)


@pytest.mark.parametrize(
    "request_",
    [
        CreateRequest(memory_mb=0),
        CreateRequest(memory_mb=-5),
        CreateRequest(cpus=float("nan")),
        CreateRequest(cpus=-1),
        CreateRequest(max_processes=1),
        CreateRequest(ttl_seconds=0),
    ],
)
def test_nonsense_values_are_invalid_requests(request_: CreateRequest) -> None:
    with pytest.raises(InvalidRequest, match=r"must be at least"):
        resolve_create("test", POLICY, request_, cwd="/")


def test_exec_defaults_and_maxima() -> None:
    assert resolve_exec(POLICY, ExecRequest()).timeout_seconds == 30
    assert resolve_exec(POLICY, ExecRequest(timeout_seconds=120)).timeout_seconds == 120
    assert resolve_exec(POLICY, ExecRequest()).max_output_bytes == 64 << 10
    with pytest.raises(PolicyRefused, match=r"exec.max_timeout_seconds"):
        resolve_exec(POLICY, ExecRequest(timeout_seconds=121))
    with pytest.raises(PolicyRefused, match=r"exec.max_stdin_bytes"):
        resolve_exec(POLICY, ExecRequest(stdin_bytes=1025))
    with pytest.raises(InvalidRequest):
        resolve_exec(POLICY, ExecRequest(timeout_seconds=0))


@pytest.mark.parametrize(
    "root", ["/", "/etc", "/proc/self", "/var/lib/machines", "/run/dbus", "/var/lib/nspawn-mcp/pool", "."]
)
def test_protected_host_directories_are_never_allowed_even_if_a_policy_lists_them(root: str) -> None:
    policy = Policy.model_validate({"files": {"allowed_host_dirs": [root, "/srv/ok"]}})
    plan = resolve_create("p", policy, CreateRequest(), cwd="/etc/ssh")
    assert plan.allowed_host_roots == ("/srv/ok",)


def test_with_no_allowed_directory_left_copies_are_refused_with_the_rule() -> None:
    plan = resolve_create("default", Policy(), CreateRequest(), cwd="/")  # allowed_host_dirs = ["."]
    assert plan.allowed_host_roots == ()
    with pytest.raises(PolicyRefused, match=r"allows no host directory.*files.allowed_host_dirs"):
        confine_host_path("file.txt", plan.allowed_host_roots, cwd="/")


def test_disk_quotas_are_opt_in_and_capped() -> None:
    assert resolve_create("p", Policy(), CreateRequest(), cwd="/srv").limits.disk_bytes is None
    with pytest.raises(PolicyRefused, match=r"no disk quotas.*limits.max.disk"):
        resolve_create("p", Policy(), CreateRequest(disk_mb=1024), cwd="/srv")
    capped = Policy.model_validate({"limits": {"max": {"disk": "4GiB"}}})
    assert resolve_create("p", capped, CreateRequest(), cwd="/srv").limits.disk_bytes == 4 << 30
    assert resolve_create("p", capped, CreateRequest(disk_mb=1024), cwd="/srv").limits.disk_bytes == 1 << 30
    with pytest.raises(PolicyRefused, match=r"limits.max.disk"):
        resolve_create("p", capped, CreateRequest(disk_mb=5000), cwd="/srv")
    with pytest.raises(InvalidRequest, match=r"at least 512"):
        resolve_create("p", capped, CreateRequest(disk_mb=100), cwd="/srv")
