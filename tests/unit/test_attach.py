"""The bind helper's protocol, the request the backend builds for it, and its recheck of each
source against what the policy check found (on a real filesystem; mounting is left to the
integration tests)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from inline_snapshot import snapshot

from nspawn_mcp.backend.attach import (
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    AttachReply,
    AttachRequest,
    BindSpec,
    _Refusal,
    open_checked_source,
)
from nspawn_mcp.backend.binds import attach_request
from nspawn_mcp.errors import BackendError
from nspawn_mcp.hostfs import resolve_bind_source
from nspawn_mcp.policy import BindMount, HostTarget

CHECKED = BindMount(
    root="/srv/project", source="/srv/project/src", target="/work", writable=False, device=64769, inode=42
)
SCRATCH = BindMount(
    root="/srv/scratch",
    source="/srv/scratch",
    target="/scratch",
    writable=True,
    noexec=True,
    device=64769,
    inode=43,
)


def test_the_request_names_each_source_beneath_its_root_with_its_checked_identity() -> None:
    request = attach_request(Path("/proc/1234"), (CHECKED, SCRATCH))
    assert json.loads(request.encode()) == snapshot(
        {
            "sandbox": "/proc/1234",
            "binds": [
                {
                    "root": "/srv/project",
                    "relative": "src",
                    "device": 64769,
                    "inode": 42,
                    "target": "/work",
                    "writable": False,
                    "noexec": False,
                },
                {
                    "root": "/srv/scratch",
                    "relative": ".",
                    "device": 64769,
                    "inode": 43,
                    "target": "/scratch",
                    "writable": True,
                    "noexec": True,
                },
            ],
        }
    )
    assert AttachRequest.decode(request.encode()) == request


def test_a_bind_never_checked_on_the_host_is_not_attached() -> None:
    unchecked = BindMount(root="/srv/project", source="/srv/project", target="/work", writable=False)
    with pytest.raises(BackendError, match=r"not checked on the host"):
        attach_request(Path("/proc/1"), (unchecked,))


def test_a_bind_whose_source_is_not_beneath_its_root_is_not_attached() -> None:
    """Root and source must be the same kind of path: a root through a symlink with a resolved
    source would send the helper looking for ``../real/src`` and refuse it as changed."""
    mixed = BindMount(
        root="/tmp/link", source="/tmp/real/src", target="/work", writable=False, device=1, inode=2
    )
    with pytest.raises(BackendError, match=r"not resolved beneath its allowed root"):
        attach_request(Path("/proc/1"), (mixed,))


@pytest.mark.parametrize(
    "change",
    [
        {"writable": "yes"},
        {"inode": "42"},
        {"inode": True},
        {"target": ["/work"]},
    ],
)
def test_a_request_of_the_wrong_shape_is_refused(change: dict[str, object]) -> None:
    raw = json.loads(attach_request(Path("/proc/1"), (CHECKED,)).encode())
    raw["binds"][0].update(change)
    with pytest.raises(ValueError, match=r"must be"):
        AttachRequest.decode(json.dumps(raw).encode())


def test_requests_and_replies_are_bounded() -> None:
    with pytest.raises(ValueError, match=r"too large"):
        AttachRequest.decode(b" " * (MAX_REQUEST_BYTES + 1))
    with pytest.raises(ValueError, match=r"too large"):
        AttachReply.decode(b" " * (MAX_REPLY_BYTES + 1))


def test_replies_round_trip_and_unknown_kinds_are_refused() -> None:
    reply = AttachReply("changed", "a mount's host path changed", "ELOOP")
    assert AttachReply.decode(reply.encode()) == reply
    with pytest.raises(ValueError, match=r"unknown reply kind"):
        AttachReply.decode(b'{"kind": "maybe", "message": "", "detail": ""}')


# -- the helper's recheck ------------------------------------------------------------


def checked_spec(root: Path, relative: str) -> BindSpec:
    """A bind as the service checks it (the policy's root, possibly through a symlink), as the
    backend then asks the helper to attach it."""
    found = resolve_bind_source(HostTarget(str(root), relative), writable=False)
    mount = BindMount(
        root=found.root,
        source=found.path,
        target="/work",
        writable=False,
        device=found.device,
        inode=found.inode,
    )
    (spec,) = attach_request(Path("/proc/1"), (mount,)).binds
    return spec


@contextmanager
def reopened(spec: BindSpec) -> Iterator[os.stat_result]:
    source, _root = open_checked_source(spec)
    try:
        yield os.fstat(source)
    finally:
        os.close(source)


def refusal(spec: BindSpec) -> str:
    with pytest.raises(_Refusal) as caught:
        open_checked_source(spec)
    return caught.value.kind


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """``real/src/README``, ``real/alias -> src`` and ``link -> real``: an allowed root reached
    through a symlink, as in ``mounts.allowed = ["/tmp/link"]`` with ``/tmp/link -> /tmp/real``."""
    (tmp_path / "real" / "src").mkdir(parents=True)
    (tmp_path / "real" / "src" / "README").write_text("x")
    (tmp_path / "real" / "alias").symlink_to("src")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    return tmp_path


@pytest.mark.parametrize(
    ("relative", "real", "beneath"),
    [(".", "real", "."), ("src", "real/src", "src"), ("alias", "real/src", "src")],
)
def test_through_a_symlinked_root_the_helper_reopens_the_very_object_the_check_found(
    host: Path, relative: str, real: str, beneath: str
) -> None:
    spec = checked_spec(host / "link", relative)
    assert (spec.root, spec.relative) == (str(host / "real"), beneath)  # real paths, no symlink
    found = (host / real).stat()
    assert (spec.device, spec.inode) == (found.st_dev, found.st_ino)
    with reopened(spec) as info:
        assert (info.st_dev, info.st_ino) == (found.st_dev, found.st_ino)


def test_a_source_swapped_for_another_directory_after_the_check_is_refused(host: Path) -> None:
    spec = checked_spec(host / "link", "src")
    (host / "real" / "src").rename(host / "real" / "elsewhere")
    (host / "real" / "src").mkdir()
    assert refusal(spec) == "changed"


def test_a_source_swapped_for_a_symlink_is_refused_even_to_the_checked_object(host: Path) -> None:
    spec = checked_spec(host / "link", "src")
    (host / "real" / "src").rename(host / "real" / "elsewhere")
    (host / "real" / "src").symlink_to("elsewhere")
    assert refusal(spec) == "changed"


def test_a_root_path_that_gained_a_symlink_since_the_check_is_refused(host: Path) -> None:
    spec = checked_spec(host / "link", "src")
    (host / "real").rename(host / "moved")
    (host / "real").symlink_to(host / "moved")  # the same objects, reached another way
    assert refusal(spec) == "changed"


def test_a_root_gone_since_the_check_is_reported_missing(host: Path) -> None:
    spec = checked_spec(host / "link", "src")
    (host / "real").rename(host / "moved")
    assert refusal(spec) == "missing"
