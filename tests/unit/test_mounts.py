"""Binds of host paths: which the policy allows, read-only unless the root allows writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from nspawn_mcp.errors import InvalidRequest, PolicyRefused
from nspawn_mcp.hostfs import resolve_bind_source
from nspawn_mcp.policy import CreateRequest, HostTarget, MountRequest, resolve_create
from nspawn_mcp.policy.loader import load_policy_text

POLICY = load_policy_text(
    """
    [mounts]
    allowed = [
        { host = ".", writable = false },
        { host = "./scratch", writable = true },
        { host = "/etc", writable = true },
    ]
    max_mounts = 2
    """,
    "dev.toml",
)


def mounts(*requests: MountRequest, cwd: str = "/srv/project") -> list[tuple[str, str, str, bool]]:
    plan = resolve_create("dev", POLICY, CreateRequest(mounts=requests), cwd=cwd)
    return [(m.root, m.source, m.target, m.writable) for m in plan.mounts]


def test_allowed_paths_are_bound_read_only_or_writable_as_their_root_allows() -> None:
    assert mounts(MountRequest("src", "/work"), MountRequest("scratch/tmp", "/scratch", writable=True)) == [
        ("/srv/project", "/srv/project/src", "/work", False),
        ("/srv/project/scratch", "/srv/project/scratch/tmp", "/scratch", True),
    ]


@pytest.mark.parametrize(
    ("request_", "rule"),
    [
        (MountRequest("src", "/work", writable=True), "mounts.allowed.writable"),
        (MountRequest("../other", "/work"), "mounts.allowed"),
        (MountRequest("/srv/project/../../etc", "/work"), "mounts.allowed"),
        (MountRequest("/etc/ssh", "/work"), "mounts.allowed"),
        (MountRequest("/proc/self/root", "/work"), "mounts.allowed"),
        (MountRequest("/var/lib/machines", "/work"), "mounts.allowed"),
    ],
)
def test_escapes_and_writes_beyond_the_policy_are_refused_with_the_rule(
    request_: MountRequest, rule: str
) -> None:
    with pytest.raises(PolicyRefused) as caught:
        mounts(request_)
    assert caught.value.rule == rule


def test_protected_roots_listed_by_a_policy_never_count() -> None:
    with pytest.raises(PolicyRefused, match=r"mounts.allowed"):
        mounts(MountRequest("/etc", "/etc-copy"))
    only_cwd = load_policy_text('[mounts]\nallowed = [{ host = "." }]\n', "p.toml")
    with pytest.raises(PolicyRefused, match=r"allows no host mounts"):
        resolve_create("p", only_cwd, CreateRequest(mounts=(MountRequest("x", "/work"),)), cwd="/")


def test_too_many_mounts_are_refused() -> None:
    with pytest.raises(PolicyRefused, match=r"mounts.max_mounts"):
        mounts(MountRequest("a", "/a"), MountRequest("b", "/b"), MountRequest("c", "/c"))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("/", "reserved"),
        ("/proc/x", "reserved"),
        ("/run/nspawn-mcp/ctl", "reserved"),
        ("/dev", "reserved"),
        ("work", "absolute"),
        ("/work/../proc", "'..'"),
        ("/work:rw", "':'"),
    ],
)
def test_sandbox_mount_points_must_be_plain_and_unreserved(target: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        mounts(MountRequest("src", target))


def test_two_mounts_at_one_place_are_refused() -> None:
    with pytest.raises(InvalidRequest, match=r"two mounts at /work"):
        mounts(MountRequest("a", "/work"), MountRequest("b", "/work/"))


def test_bind_sources_are_resolved_beneath_their_root(tmp_path: Path) -> None:
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "inside").symlink_to("src")
    (root / "outside").symlink_to(tmp_path)
    assert resolve_bind_source(HostTarget(str(root), "inside")) == str(root / "src")
    with pytest.raises(PolicyRefused, match=r"leads outside"):
        resolve_bind_source(HostTarget(str(root), "outside"))
