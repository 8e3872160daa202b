"""Host binds: nothing written through a bind gives a host user privilege (issue #7 item 1).

Every attack is paired with a control that shows the probe would have seen it work.
Host directories live in a 0711 directory under /tmp, so that the unprivileged host
user who owns a writable root can reach it (pytest's own tmp dirs are 0700 root).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nspawn_mcp.backend.api import CommandOutcome, CommandSpec
from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.errors import PolicyRefused
from nspawn_mcp.hostfs import resolve_bind_source
from nspawn_mcp.naming import new_sandbox_id
from nspawn_mcp.policy import BindMount, CreateRequest, HostTarget, MountRequest, Policy, resolve_create
from nspawn_mcp.runtime import Daemons
from tests.integration.conftest import Factory, plan

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

OWNER = 4242  # an unprivileged host user and group that owns writable roots
_VFS_CAP_REVISION_2 = 0x02000000
_VFS_CAP_REVISION_3 = 0x03000000
_VFS_CAP_FLAGS_EFFECTIVE = 0x1
_CAPS = (1 << 1) | (1 << 7)  # CAP_DAC_OVERRIDE, CAP_SETUID


async def run(backend: NspawnBackend, sandbox_id: str, script: str) -> CommandOutcome:
    spec = CommandSpec(
        argv=("/bin/sh", "-c", script),
        cwd=None,
        env={},
        stdin=b"",
        timeout_seconds=30,
        max_output_bytes=1 << 20,
        user="root",
    )
    return await backend.jail(sandbox_id).run(spec)


def as_the_service_checks(policy: Policy, requests: tuple[MountRequest, ...]) -> tuple[BindMount, ...]:
    """The binds ``policy`` allows for ``requests``, resolved on the host as the service does."""
    allowed = resolve_create("default", policy, CreateRequest(mounts=requests), cwd="/srv").mounts
    binds = []
    for mount in allowed:
        relative = os.path.relpath(mount.source, mount.root)
        source = resolve_bind_source(HostTarget(mount.root, relative), writable=mount.writable)
        binds.append(
            replace(mount, root=source.root, source=source.path, device=source.device, inode=source.inode)
        )
    return tuple(binds)


def checked(root: Path, target: str, *, writable: bool = False, noexec: bool = False) -> BindMount:
    """A bind as the service passes it on: allowed, and resolved on the host (identity recorded)."""
    source = resolve_bind_source(HostTarget(str(root), "."), writable=writable)
    return BindMount(
        root=source.root,
        source=source.path,
        target=target,
        writable=writable,
        noexec=noexec,
        device=source.device,
        inode=source.inode,
    )


@pytest.fixture
def host_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="nspawn-mcp-binds-", dir="/tmp"))
    base.chmod(0o711)
    yield base
    shutil.rmtree(base)


def owned_dir(path: Path, mode: int = 0o700) -> Path:
    path.mkdir()
    os.chown(path, OWNER, OWNER)
    path.chmod(mode)
    return path


def as_owner(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` on the host as the unprivileged owner of the writable roots."""
    drop = ["setpriv", f"--reuid={OWNER}", f"--regid={OWNER}", "--clear-groups", "--"]
    return subprocess.run([*drop, *argv], capture_output=True, text=True, timeout=30, check=False)


def ids_and_caps(status: str) -> tuple[int, int, int]:
    """(effective uid, effective gid, CapEff) from a /proc/PID/status text."""
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return int(fields["Uid"].split()[1]), int(fields["Gid"].split()[1]), int(fields["CapEff"], 16)


def v2_capability(permitted: int) -> bytes:
    return struct.pack("<IIIII", _VFS_CAP_REVISION_2 | _VFS_CAP_FLAGS_EFFECTIVE, permitted, 0, 0, 0)


async def test_root_inside_writes_to_a_writable_bind_as_the_directorys_owner(
    backend: NspawnBackend, make_sandbox: Factory, host_dir: Path, daemons: Daemons
) -> None:
    scratch = owned_dir(host_dir / "scratch")
    sandbox = await make_sandbox(mounts=(checked(scratch, "/scratch", writable=True),))
    # the bind exists in the sandbox only: not in the server's mount namespace, nor the daemons'
    assert str(scratch) not in Path("/proc/self/mountinfo").read_text()
    assert str(scratch) not in (daemons.proc_root / "1" / "mountinfo").read_text()
    outcome = await run(
        backend, sandbox, "stat -c %u:%g /scratch; mkdir /scratch/d && echo made > /scratch/d/out"
    )
    assert outcome.stdout == b"0:0\n"  # inside, root owns its scratch directory
    written = scratch / "d" / "out"
    assert written.read_text() == "made\n"
    assert (written.stat().st_uid, written.stat().st_gid) == (OWNER, OWNER)
    assert ((scratch / "d").stat().st_uid, (scratch / "d").stat().st_gid) == (OWNER, OWNER)


async def test_setuid_setgid_and_capabilities_planted_in_a_writable_bind_give_a_host_user_nothing(
    backend: NspawnBackend, make_sandbox: Factory, host_dir: Path
) -> None:
    scratch = owned_dir(host_dir / "scratch")
    sandbox = await make_sandbox(mounts=(checked(scratch, "/scratch", writable=True),))
    plant = (
        "cp /bin/cat /scratch/suid && chmod 6755 /scratch/suid && cp /bin/cat /scratch/caps && "
        'python3 -c \'import os, sys; os.setxattr("/scratch/caps", "security.capability", '
        f"bytes.fromhex(sys.argv[1]))' {v2_capability(_CAPS).hex()} && stat -c %a /scratch/suid"
    )
    outcome = await run(backend, sandbox, plant)
    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.stdout == b"6755\n"
    assert os.stat(scratch / "suid").st_mode & 0o6000 == 0o6000  # the bits are there on the host

    setuid_run = as_owner(str(scratch / "suid"), "/proc/self/status")
    assert ids_and_caps(setuid_run.stdout) == (OWNER, OWNER, 0)  # not root, no root group
    caps_run = as_owner(str(scratch / "caps"), "/proc/self/status")
    assert ids_and_caps(caps_run.stdout) == (OWNER, OWNER, 0)
    magic, *_, rootid = struct.unpack("<IIIIII", os.getxattr(scratch / "caps", "security.capability"))
    assert (magic & ~_VFS_CAP_FLAGS_EFFECTIVE, rootid) == (_VFS_CAP_REVISION_3, OWNER)

    # controls: the same binaries made privileged by host root do give the same user privilege
    shutil.copy("/bin/cat", scratch / "root-suid")
    os.chown(scratch / "root-suid", 0, 0)
    (scratch / "root-suid").chmod(0o6755)
    shutil.copy("/bin/cat", scratch / "root-caps")
    os.setxattr(scratch / "root-caps", "security.capability", v2_capability(_CAPS))
    try:
        assert ids_and_caps(as_owner(str(scratch / "root-suid"), "/proc/self/status").stdout)[:2] == (0, 0)
        assert ids_and_caps(as_owner(str(scratch / "root-caps"), "/proc/self/status").stdout)[2] == _CAPS
    finally:
        (scratch / "root-suid").unlink()
        (scratch / "root-caps").unlink()


async def test_binds_are_nosuid_nodev_inside_and_noexec_where_the_policy_says(
    backend: NspawnBackend, make_sandbox: Factory, host_dir: Path
) -> None:
    runnable = owned_dir(host_dir / "runnable")
    downloads = owned_dir(host_dir / "downloads")
    sandbox = await make_sandbox(
        mounts=(
            checked(runnable, "/runnable", writable=True),
            checked(downloads, "/downloads", writable=True, noexec=True),
        )
    )
    options = await run(backend, sandbox, "grep -E ' /(runnable|downloads) ' /proc/self/mountinfo")
    lines = options.stdout.decode().splitlines()
    assert len(lines) == 2
    for line in lines:
        flags = line.split()[5].split(",")
        assert {"rw", "nosuid", "nodev"} <= set(flags)
        assert ("noexec" in flags) == (" /downloads " in line)
        assert "idmapped" in line.split(" - ")[0]
    script = (
        "cp /bin/true /runnable/t && cp /bin/true /downloads/t && "
        "/runnable/t && echo ran; /downloads/t 2>/dev/null || echo refused"
    )
    assert (await run(backend, sandbox, script)).stdout == b"ran\nrefused\n"


async def test_a_read_only_bind_refuses_writes_and_cannot_be_remounted_writable(
    backend: NspawnBackend, make_sandbox: Factory, host_dir: Path
) -> None:
    project = host_dir / "project"
    project.mkdir()
    (project / "README").write_text("project\n")
    sandbox = await make_sandbox(mounts=(checked(project, "/work"),))
    script = (
        "stat -c %u /work/README; cat /work/README; "
        "touch /work/new 2>&1 | grep -o 'Read-only file system'; "
        "mount -o remount,bind,rw /work 2>&1 | grep -o 'permission denied'; "
        "mount -o remount,bind,suid,dev,exec /work 2>&1 | grep -o 'permission denied'; "
        'python3 -c \'import os; os.setxattr("/work/README", "user.x", b"1")\' 2>&1 | grep -o \'Read-only\''
    )
    outcome = await run(backend, sandbox, script)
    assert (
        outcome.stdout
        == b"0\nproject\nRead-only file system\npermission denied\npermission denied\nRead-only\n"
    )
    assert not (project / "new").exists()
    # control: the same remount of a bind root inside made itself works, so the refusal above is the lock
    control = (
        "mkdir -p /mnt/u && mount --bind /etc /mnt/u && mount -o remount,bind,ro /mnt/u && "
        "mount -o remount,bind,rw /mnt/u && echo remounted"
    )
    assert (await run(backend, sandbox, control)).stdout == b"remounted\n"
    # unmounting is allowed (the kernel locks flags, not the top mount) and shows only the sandbox's own dir
    assert (await run(backend, sandbox, "umount /work && ls -A /work | wc -l")).stdout == b"0\n"


async def test_files_of_other_owners_in_a_writable_bind_are_not_writable_inside(
    backend: NspawnBackend, make_sandbox: Factory, host_dir: Path
) -> None:
    scratch = owned_dir(host_dir / "scratch")
    (scratch / "theirs").write_text("theirs\n")
    os.chown(scratch / "theirs", 65534, 65534)
    (scratch / "their-dir").mkdir(mode=0o755)
    os.chown(scratch / "their-dir", 65534, 65534)
    sandbox = await make_sandbox(mounts=(checked(scratch, "/scratch", writable=True),))
    script = (
        "stat -c %U /scratch/theirs; cat /scratch/theirs; "
        "echo x >> /scratch/theirs || echo refused; touch /scratch/their-dir/x || echo refused; "
        "echo mine > /scratch/mine && echo allowed"
    )
    outcome = await run(backend, sandbox, script)
    assert outcome.stdout == b"nobody\ntheirs\nrefused\nrefused\nallowed\n"
    assert (scratch / "theirs").read_text() == "theirs\n"
    assert not (scratch / "their-dir" / "x").exists()


@pytest.mark.parametrize("swap", ["symlink", "directory"])
async def test_a_bind_source_swapped_after_the_check_is_refused_and_nothing_is_mounted(
    backend: NspawnBackend, daemons: Daemons, host_dir: Path, swap: str
) -> None:
    (host_dir / "data").mkdir()
    bind = checked(host_dir, "/work")
    bind = BindMount(
        root=bind.root,
        source=str(host_dir / "data"),
        target="/work",
        writable=False,
        device=os.stat(host_dir / "data").st_dev,
        inode=os.stat(host_dir / "data").st_ino,
    )
    (host_dir / "data").rename(host_dir / "elsewhere")  # the policy checked data; now it changes
    if swap == "symlink":
        (host_dir / "data").symlink_to("/etc")
    else:
        (host_dir / "data").mkdir()
    sandbox_id = new_sandbox_id()
    try:
        with pytest.raises(PolicyRefused, match=r"changed while the sandbox was being created") as caught:
            await backend.create(sandbox_id, plan((bind,)))
        assert caught.value.rule == "mounts.allowed"
        leader = await backend.machined.machine_leader(sandbox_id)
        mountinfo = (daemons.proc_root / str(leader) / "mountinfo").read_text()
        assert " /work " not in mountinfo
        assert str(host_dir) not in mountinfo
    finally:
        await backend.destroy(sandbox_id)


@pytest.mark.parametrize(("owner", "mode"), [(0, 0o700), (OWNER, 0o750)])
async def test_a_writable_root_that_is_roots_or_reachable_by_others_is_refused_at_mount_time(
    backend: NspawnBackend, make_sandbox: Factory, host_dir: Path, owner: int, mode: int
) -> None:
    scratch = owned_dir(host_dir / "scratch")
    bind = checked(scratch, "/scratch", writable=True)  # passes the check, then changes hands
    os.chown(scratch, owner, owner)
    scratch.chmod(mode)
    with pytest.raises(PolicyRefused, match=r"cannot be bound writable") as caught:
        await make_sandbox(mounts=(bind,))
    assert caught.value.rule == "mounts.allowed"


async def test_mounts_beneath_allowed_roots_reached_through_symlinks_are_mounted(
    backend: NspawnBackend, make_sandbox: Factory, host_dir: Path
) -> None:
    """``mounts.allowed = ["…/link"]`` with ``link -> real``: the check resolves the link, and the
    helper must find that same object again (the swapped-source tests are the counterpart)."""
    real = host_dir / "real"
    (real / "src").mkdir(parents=True)
    (real / "src" / "README").write_text("through the link\n")
    (host_dir / "link").symlink_to(real)
    scratch = owned_dir(host_dir / "scratch-real")
    (host_dir / "scratch").symlink_to("scratch-real")  # a relative link, to a writable root
    policy = Policy.model_validate(
        {
            "mounts": {
                "allowed": [
                    {"host": str(host_dir / "link")},
                    {"host": str(host_dir / "scratch"), "writable": True},
                ]
            }
        }
    )
    requests = (
        MountRequest(str(host_dir / "link"), "/whole"),
        MountRequest(str(host_dir / "link" / "src"), "/work"),
        MountRequest(str(host_dir / "scratch"), "/scratch", writable=True),
    )
    sandbox = await make_sandbox(mounts=as_the_service_checks(policy, requests))
    outcome = await run(backend, sandbox, "cat /whole/src/README /work/README; echo made > /scratch/out")
    assert (outcome.stdout, outcome.stderr) == (b"through the link\nthrough the link\n", b"")
    assert (scratch / "out").read_text() == "made\n"
    assert (scratch / "out").stat().st_uid == OWNER
