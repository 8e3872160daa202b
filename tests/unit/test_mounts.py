"""Binds of host paths: which the policy allows, read-only unless the root allows writes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from nspawn_mcp.backend.attach import writable_root_refusal
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
        { host = "./downloads", noexec = true },
        { host = "/etc", writable = true },
    ]
    max_mounts = 2
    """,
    "dev.toml",
)


def mounts(*requests: MountRequest, cwd: str = "/srv/project") -> list[tuple[str, str, str, bool, bool]]:
    plan = resolve_create("dev", POLICY, CreateRequest(mounts=requests), cwd=cwd)
    return [(m.root, m.source, m.target, m.writable, m.noexec) for m in plan.mounts]


def test_allowed_paths_are_bound_read_only_or_writable_as_their_root_allows() -> None:
    assert mounts(MountRequest("src", "/work"), MountRequest("scratch/tmp", "/scratch", writable=True)) == [
        ("/srv/project", "/srv/project/src", "/work", False, False),
        ("/srv/project/scratch", "/srv/project/scratch/tmp", "/scratch", True, False),
    ]


def test_a_root_marked_noexec_gives_noexec_binds() -> None:
    assert mounts(MountRequest("downloads/x", "/dl")) == [
        ("/srv/project/downloads", "/srv/project/downloads/x", "/dl", False, True)
    ]


def test_host_paths_may_contain_colons_and_commas_now_that_nspawn_does_not_parse_them() -> None:
    assert mounts(MountRequest("a:b,c", "/work"))[0][1] == "/srv/project/a:b,c"


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


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("../other", r"contains '\.\.'"),
        ("/srv/elsewhere", r"outside the directories allowed for mounts: /srv/project, "),
    ],
)
def test_refusals_of_mounts_say_why_and_name_the_mount_rule_not_the_copy_rule(host: str, reason: str) -> None:
    with pytest.raises(PolicyRefused, match=reason) as caught:
        mounts(MountRequest(host, "/work"))
    assert caught.value.rule == "mounts.allowed"
    assert str(caught.value).endswith("(policy rule: mounts.allowed)")
    assert "files.allowed_host_dirs" not in str(caught.value)


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
    found = resolve_bind_source(HostTarget(str(root), "inside"), writable=False)
    assert (found.root, found.path) == (str(root), str(root / "src"))
    assert (found.device, found.inode) == (os.stat(root / "src").st_dev, os.stat(root / "src").st_ino)
    with pytest.raises(PolicyRefused, match=r"leads outside"):
        resolve_bind_source(HostTarget(str(root), "outside"), writable=False)


def test_host_refusals_of_a_bind_name_the_mount_rule_and_never_speak_of_copies(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path)
    (tmp_path / "etc-link").symlink_to("/etc")
    refusals = [
        (HostTarget(str(root), "escape"), r"leads outside the allowed directory"),
        (HostTarget(str(tmp_path / "etc-link"), "."), r"resolves into a protected location"),
        (HostTarget(str(tmp_path / "gone"), "."), r"allowed host directory .*/gone does not exist"),
    ]
    for target, message in refusals:
        with pytest.raises(PolicyRefused, match=message) as caught:
            resolve_bind_source(target, writable=False)
        assert caught.value.rule == "mounts.allowed"
    (root / "plain").write_text("x")
    for relative, reason in (("missing", "it does not exist"), ("plain/x", "not a directory")):
        with pytest.raises(InvalidRequest, match=rf"cannot be mounted: .*{reason}") as invalid:
            resolve_bind_source(HostTarget(str(root), relative), writable=False)
        assert "copy" not in str(invalid.value)


def test_only_directories_and_regular_files_can_be_bound(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert resolve_bind_source(HostTarget(str(tmp_path), "file"), writable=False).path == str(
        tmp_path / "file"
    )
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "docker.sock"))
        with pytest.raises(PolicyRefused, match=r"not a directory or a regular file"):
            resolve_bind_source(HostTarget(str(tmp_path), "docker.sock"), writable=False)


@pytest.mark.parametrize(
    ("uid", "gid", "mode", "refused"),
    [
        (1000, 1000, 0o700, None),
        (1000, 1000, 0o40700, None),
        (0, 1000, 0o700, "host root"),
        (1000, 0, 0o700, "host root"),
        (0, 0, 0o755, "host root"),
        (1000, 1000, 0o750, "other host users can reach it"),
        (1000, 1000, 0o701, "other host users can reach it"),
        (1000, 1000, 0o1777, "other host users can reach it"),
    ],
)
def test_a_writable_root_must_belong_to_an_unprivileged_owner_alone(
    uid: int, gid: int, mode: int, refused: str | None
) -> None:
    refusal = writable_root_refusal(uid, gid, mode)
    assert refusal is None if refused is None else refused in (refusal or "")


def test_writable_binds_of_a_root_owned_or_shared_directory_are_refused_naming_the_rule(
    tmp_path: Path,
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(scratch, 0, 0)
        with pytest.raises(PolicyRefused, match=r"root inside would write as host root") as caught:
            resolve_bind_source(HostTarget(str(scratch), "."), writable=True)
        assert caught.value.rule == "mounts.allowed"
        os.chown(scratch, 4242, 4242)
    assert resolve_bind_source(HostTarget(str(scratch), "."), writable=True).path == str(scratch)
    assert resolve_bind_source(HostTarget(str(scratch), "."), writable=False).path == str(scratch)
    scratch.chmod(0o750)
    with pytest.raises(PolicyRefused, match=r"other host users can reach it") as caught:
        resolve_bind_source(HostTarget(str(scratch), "."), writable=True)
    assert caught.value.rule == "mounts.allowed"
    assert resolve_bind_source(HostTarget(str(scratch), "."), writable=False).path == str(scratch)
