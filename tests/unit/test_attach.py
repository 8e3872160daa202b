"""The bind helper's protocol and the request the backend builds for it (pure parts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from inline_snapshot import snapshot

from nspawn_mcp.backend.attach import MAX_REPLY_BYTES, MAX_REQUEST_BYTES, AttachReply, AttachRequest
from nspawn_mcp.backend.binds import attach_request
from nspawn_mcp.errors import BackendError
from nspawn_mcp.policy import BindMount

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
