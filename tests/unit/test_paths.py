"""Lexical confinement of host paths: allowed roots, no '..', well-formed only."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nspawn_mcp.errors import InvalidRequest, PolicyRefused
from nspawn_mcp.policy import check_container_path, confine_host_path

ROOTS = ("/srv/work", "/srv/work/deep/shared", "/data")


@pytest.mark.parametrize(
    ("path", "root", "relative"),
    [
        ("file.txt", "/srv/work", "file.txt"),
        ("./sub/file.txt", "/srv/work", "sub/file.txt"),
        ("/srv/work/a/b", "/srv/work", "a/b"),
        ("/srv/work", "/srv/work", "."),
        ("/srv/work/deep/shared/x", "/srv/work/deep/shared", "x"),
        ("//data//x", "/data", "x"),
    ],
)
def test_paths_under_an_allowed_root_are_split_at_the_longest_root(
    path: str, root: str, relative: str
) -> None:
    target = confine_host_path(path, ROOTS, cwd="/srv/work")
    assert (target.root, target.relative) == (root, relative)


@pytest.mark.parametrize(
    "path",
    [
        "../../etc/shadow",
        "/etc/shadow",
        "/proc/self/root/etc/shadow",
        "/srv/work/../../etc",
        "/srv/workshop/file",
        "/",
        "//",
        "/srv/work/a/../../x",
    ],
)
def test_paths_outside_or_with_dotdot_are_refused_naming_the_rule_of_their_use(path: str) -> None:
    with pytest.raises(PolicyRefused, match=r"files.allowed_host_dirs") as copy:
        confine_host_path(path, ROOTS, cwd="/srv/work")
    assert copy.value.rule == "files.allowed_host_dirs"
    with pytest.raises(PolicyRefused) as mount:
        confine_host_path(path, ROOTS, cwd="/srv/work", rule="mounts.allowed")
    assert mount.value.rule == "mounts.allowed"
    assert "files.allowed_host_dirs" not in str(mount.value)
    assert "copies" not in str(mount.value)


def test_with_no_allowed_root_the_refusal_says_for_what() -> None:
    with pytest.raises(PolicyRefused, match=r"no host directory for copies.*files.allowed_host_dirs"):
        confine_host_path("/srv/x", (), cwd="/srv")
    with pytest.raises(PolicyRefused, match=r"no host directory for mounts.*mounts.allowed\)$"):
        confine_host_path("/srv/x", (), cwd="/srv", rule="mounts.allowed")


@pytest.mark.parametrize(
    ("path", "message"),
    [("", "empty"), ("a\x00b", "NUL"), ("x" * 5000, "longer than"), ("\udcff", "UTF-8")],
)
def test_malformed_paths_are_invalid_before_any_work(path: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        confine_host_path(path, ROOTS, cwd="/srv/work")
    with pytest.raises(InvalidRequest, match=message):
        check_container_path(path)


def test_sandbox_paths_must_be_absolute() -> None:
    assert check_container_path("/root/x") == "/root/x"
    with pytest.raises(InvalidRequest, match=r"must be absolute"):
        check_container_path("root/x")


segment = st.sampled_from(["a", "b", "..", ".", "", "work", "srv", "etc", "x y", "-"])


@given(st.lists(segment, max_size=8), st.booleans())
def test_any_accepted_path_lies_within_its_root(segments: list[str], absolute: bool) -> None:
    path = ("/" if absolute else "") + "/".join(segments)
    try:
        target = confine_host_path(path, ROOTS, cwd="/srv/work")
    except (PolicyRefused, InvalidRequest):
        return
    resolved = posixpath.normpath(posixpath.join(target.root, target.relative))
    assert resolved == target.root or resolved.startswith(target.root + "/")
    assert ".." not in target.relative.split("/")
    assert target.root in ROOTS
