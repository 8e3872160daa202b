"""The file tools on the real daemons: through the service, the real backend and each sandbox's supervisor.

What they promise: round trips of text and binary, large files paged, atomic writes,
errors that name the path and the limit, and that a symlink planted inside a sandbox
leads only to that sandbox's own files (every path is resolved inside its jail).
Directory copies: a hostile tree from inside never writes outside the host destination.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.errors import CopyRefused, PolicyRefused
from nspawn_mcp.files import SandboxFiles
from nspawn_mcp.policy import CreateRequest, PolicySet
from nspawn_mcp.policy.loader import load_policy_text
from nspawn_mcp.service import SandboxService
from tests.integration.conftest import HostView
from tests.integration.test_sandbox_lifecycle import disk_quotas, run  # noqa: F401 - a fixture

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

_MiB = 1 << 20
POLICY = """
[limits.max]
disk = "4GiB"

[files]
allowed_host_dirs = ["."]
max_read_bytes = "1MiB"
max_write_bytes = "16MiB"
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    (tmp_path / "records").mkdir()
    return tmp_path / "work"


@pytest.fixture
async def service(backend: NspawnBackend, workdir: Path) -> AsyncIterator[SandboxService]:
    policies = PolicySet({"default": load_policy_text(POLICY, "default.toml")})
    made = SandboxService(backend, policies, records_dir=workdir.parent / "records", cwd=str(workdir))
    try:
        yield made
    finally:
        with anyio.CancelScope(shield=True):
            for sandbox in made.list():
                await made.destroy(sandbox.sandbox_id)


@pytest.fixture
def files(service: SandboxService) -> SandboxFiles:
    return SandboxFiles(service)


async def sh(backend: NspawnBackend, sandbox: str, script: str, timeout: float = 60) -> bytes:
    outcome = await run(backend, sandbox, script, timeout)
    assert outcome.exit_code == 0, outcome.stderr
    return outcome.stdout


async def read_all(files: SandboxFiles, sandbox: str, path: str, encoding: str = "auto") -> tuple[bytes, int]:
    """Every piece of a file, following next_offset; (the bytes, the number of calls)."""
    pieces, offset, calls = [], 0, 0
    while True:
        piece = await files.read(sandbox, path, offset, encoding=encoding)  # type: ignore[arg-type]
        calls += 1
        if piece.encoding == "base64":
            pieces.append(base64.b64decode(piece.content))
        else:
            lines = piece.content.splitlines(keepends=True)
            pieces.append("".join(line.split("\t", 1)[1] for line in lines).encode())
        if piece.next_offset is None:
            assert not piece.truncated
            assert piece.remaining_bytes == 0
            return b"".join(pieces), calls
        assert piece.truncated
        offset = piece.next_offset


async def test_text_and_binary_round_trip(
    service: SandboxService, files: SandboxFiles, backend: NspawnBackend
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    written = await files.write(sandbox, "/root/app/hello.py", "print('hi')\nprint('é')\n", make_parents=True)
    assert (written.created, written.bytes, written.mode) == (True, 24, "0644")
    assert await sh(backend, sandbox, "python3 /root/app/hello.py") == "hi\né\n".encode()
    read = await files.read(sandbox, "/root/app/hello.py")
    assert read.encoding == "text"
    assert read.content == "     1\tprint('hi')\n     2\tprint('é')\n"
    assert (read.next_offset, read.truncated, read.size_bytes) == (None, False, 24)

    blob = bytes(range(256)) * 1000
    await files.write(sandbox, "/root/blob", base64.b64encode(blob).decode(), encoding="base64", mode="600")
    inside = await sh(backend, sandbox, "sha256sum /root/blob; stat -c %a:%u /root/blob")
    assert inside.split()[0].decode() == hashlib.sha256(blob).hexdigest()
    assert inside.split()[-1] == b"600:0"
    piece = await files.read(sandbox, "/root/blob")
    assert piece.encoding == "base64"
    assert base64.b64decode(piece.content) == blob

    edited = await files.edit(sandbox, "/root/app/hello.py", "print('hi')", "print('hello')")
    assert edited.replaced == 1
    assert await sh(backend, sandbox, "python3 /root/app/hello.py") == "hello\né\n".encode()
    listing = await files.list(sandbox, "/root", depth=2)
    assert {(e.path, e.type) for e in listing.entries} >= {
        ("app", "directory"),
        ("app/hello.py", "file"),
        ("blob", "file"),
    }


async def test_large_files_are_read_in_pieces_and_edits_refuse_ambiguity(
    service: SandboxService, files: SandboxFiles, backend: NspawnBackend
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await sh(backend, sandbox, "seq 1 600000 > /root/numbers; head -c 3500000 /dev/urandom > /root/random")
    digests = (await sh(backend, sandbox, "cd /root && sha256sum numbers random")).split()
    text, calls = await read_all(files, sandbox, "/root/numbers")
    assert hashlib.sha256(text).hexdigest() == digests[0].decode()
    assert calls == 4  # 3.9 MB in pieces of at most 1 MiB of whole lines
    data, calls = await read_all(files, sandbox, "/root/random")
    assert hashlib.sha256(data).hexdigest() == digests[2].decode()
    assert calls == 4
    window = await files.read(sandbox, "/root/numbers", offset=99, limit=2)
    assert window.content == "   100\t100\n   101\t101\n"
    assert window.next_offset == 101

    with pytest.raises(CopyRefused, match=r"occurs 60000 times in /root/numbers, not 1.*count=60000"):
        await files.edit(sandbox, "/root/numbers", "7\n", "seven\n")
    with pytest.raises(CopyRefused, match="not found in /root/numbers"):
        await files.edit(sandbox, "/root/numbers", "abc", "x")
    assert (await sh(backend, sandbox, "sha256sum /root/numbers")).split()[0] == digests[0]  # unchanged


async def test_errors_name_the_path_and_the_limit(service: SandboxService, files: SandboxFiles) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await files.write(sandbox, "/root/big", "x" * (3 * _MiB + _MiB // 5))
    with pytest.raises(PolicyRefused) as refused:
        await files.read_whole(sandbox, "/root/big")
    assert str(refused.value) == (
        "sandbox file /root/big is 3.2 MiB, more than this policy's files.max_read_bytes of 1 MiB; "
        "read it in pieces with the read_file tool (offset/limit) (policy rule: files.max_read_bytes)"
    )
    with pytest.raises(
        PolicyRefused, match=r"/root/huge is 17 MiB, more than .*files.max_write_bytes of 16 MiB"
    ):
        await files.write(sandbox, "/root/huge", "x" * (17 * _MiB))
    with pytest.raises(CopyRefused, match="/root/nothing does not exist in the sandbox"):
        await files.read(sandbox, "/root/nothing")
    with pytest.raises(CopyRefused, match="/dev/null is not a regular file"):
        await files.read(sandbox, "/dev/null")


async def test_symlinks_inside_lead_only_to_the_sandboxs_own_files(
    service: SandboxService, files: SandboxFiles, backend: NspawnBackend, host: HostView
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    other = (await service.create(CreateRequest())).sandbox_id
    await sh(backend, other, "echo other-secret > /root/secret")
    other_root = host.machines_dir / other
    assert (other_root / "root/secret").read_bytes() == b"other-secret\n"  # the control: it is there
    await sh(
        backend,
        sandbox,
        "echo mine > /root/mine; cd /root; "
        "ln -s /proc/1/root/etc/hostname via-pid1; "
        "ln -s /proc/self/root/root/mine via-self; "
        "ln -s ../../../../../../../root/mine via-dots; "
        f"ln -s {other_root}/root/secret via-other; "
        f"ln -s /proc/self/root{other_root}/root/secret via-self-other; "
        "ln -s / root-link",
    )
    # the control: a plain file reads
    assert (await files.read(sandbox, "/root/mine")).content == "     1\tmine\n"
    # leading back into the sandbox reads the sandbox's own file
    for link in ("via-self", "via-dots"):
        assert (await files.read(sandbox, f"/root/{link}")).content == "     1\tmine\n"
    # nspawn's init is not root inside's to enter, and the host's paths do not exist in here
    with pytest.raises(CopyRefused, match="cannot open /root/via-pid1: Permission denied"):
        await files.read(sandbox, "/root/via-pid1")
    for link in ("via-other", "via-self-other"):
        with pytest.raises(CopyRefused, match="does not exist in the sandbox"):
            await files.read(sandbox, f"/root/{link}")
    # writing through the same links changes nothing outside this sandbox
    await files.write(sandbox, "/root/via-self", "changed\n")
    assert await sh(backend, sandbox, "cat /root/mine") == b"changed\n"
    with pytest.raises(CopyRefused):
        await files.write(sandbox, "/root/via-other", "pwned\n")
    await files.write(sandbox, "/root/root-link/root/through-root", "inside\n")
    assert (host.machines_dir / sandbox / "root/through-root").read_bytes() == b"inside\n"
    assert (other_root / "root/secret").read_bytes() == b"other-secret\n"
    assert not Path("/root/through-root").exists()
    # a listing shows links with their targets and never walks through them
    listing = await files.list(sandbox, "/root", depth=5)
    links = {e.path: e.target for e in listing.entries if e.type == "symlink"}
    assert links["root-link"] == "/"
    assert links["via-pid1"] == "/proc/1/root/etc/hostname"
    assert not any(e.path.startswith("root-link/") for e in listing.entries)


async def test_a_reader_never_sees_half_a_file_while_big_writes_happen(
    service: SandboxService, files: SandboxFiles, backend: NspawnBackend
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    size = 8 * _MiB
    await files.write(sandbox, "/root/data", "a" * size)
    reader = (
        "import os\n"
        "seen, bad = 0, 0\n"
        "while not os.path.exists('/root/stop'):\n"
        "    data = open('/root/data', 'rb').read()\n"
        "    seen += 1\n"
        f"    if len(data) != {size} or data.count(data[:1]) != {size}: bad += 1\n"
        "print(seen, bad)\n"
    )
    await files.write(sandbox, "/root/reader.py", reader)
    result: list[bytes] = []

    async def read_loop() -> None:
        result.append(await sh(backend, sandbox, "python3 /root/reader.py", timeout=120))

    with anyio.fail_after(120):
        async with anyio.create_task_group() as group:
            group.start_soon(read_loop)
            for letter in "bcdefghij":
                await files.write(sandbox, "/root/data", letter * size)
            await files.write(sandbox, "/root/stop", "")
    seen, bad = map(int, result[0].split())
    assert seen > 5
    assert bad == 0
    assert (
        await sh(backend, sandbox, "ls -A /root | grep -c nspawn-mcp || true") == b"0\n"
    )  # no temporary left


async def test_a_failed_write_keeps_the_old_file(
    service: SandboxService,
    files: SandboxFiles,
    backend: NspawnBackend,
    disk_quotas: None,  # noqa: F811 - the fixture
) -> None:
    sandbox = (await service.create(CreateRequest(disk_mb=512))).sandbox_id
    await files.write(sandbox, "/root/keep", "old content\n")
    await run(backend, sandbox, "fallocate -l 508M /root/fill; sync")
    with pytest.raises(CopyRefused, match=r"cannot write /root/keep: (Disk quota exceeded|No space left)"):
        await files.write(sandbox, "/root/keep", "n" * (12 * _MiB))
    assert await sh(backend, sandbox, "cat /root/keep; ls -A /root | grep -c nspawn-mcp || true") == (
        b"old content\n0\n"
    )


async def test_a_hostile_tree_copied_out_stays_in_its_host_destination(
    service: SandboxService, backend: NspawnBackend, workdir: Path
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await sh(
        backend,
        sandbox,
        "mkdir -p /root/tree/sub/deep && cd /root/tree && echo top > top.txt && echo deep > sub/deep/f "
        "&& echo dots > ..foo && mkdir ... && echo x > .../y && head -c 100000 /dev/urandom > sub/bin "
        "&& chmod 4755 top.txt && ln -s /etc etc-link && ln -s ../../.. up && ln -s / sub/root "
        "&& mkfifo fifo && ln /root/tree/top.txt hard",
    )
    copied = await service.copy_from_sandbox(sandbox, "/root/tree", "out")
    assert (copied.files, copied.directories, copied.skipped) == (6, 4, 4)
    assert sorted(copied.skipped_examples) == [
        "etc-link (symlink)",
        "fifo (fifo)",
        "sub/root (symlink)",
        "up (symlink)",
    ]
    out = workdir / "out"
    made = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert made == ["...", ".../y", "..foo", "hard", "sub", "sub/bin", "sub/deep", "sub/deep/f", "top.txt"]
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert (out / "sub/deep/f").read_bytes() == b"deep\n"
    assert (out / "top.txt").stat().st_mode & 0o7777 == 0o755  # setuid dropped on the host
    assert sorted(os.listdir(workdir)) == ["out"]  # nothing beside it, no staging left
    with pytest.raises(CopyRefused, match="already exists"):
        await service.copy_from_sandbox(sandbox, "/root/tree", "out")

    # and back in: a host symlink planted in the tree is left out, not followed
    (out / "host-etc").symlink_to("/etc")
    back = await service.copy_to_sandbox(sandbox, "out", "/root/back")
    assert (back.files, back.skipped, back.skipped_examples) == (6, 1, ["host-etc (symlink)"])
    inside = await sh(
        backend, sandbox, "cd /root/back && find . | sort && ls /var/tmp | grep -c copy || true"
    )
    assert inside == (
        b".\n./...\n./.../y\n./..foo\n./hard\n./sub\n./sub/bin\n./sub/deep\n./sub/deep/f\n./top.txt\n0\n"
    )
    assert await sh(backend, sandbox, "cmp /root/back/sub/bin /root/tree/sub/bin && echo same") == b"same\n"


async def test_the_resource_reads_whole_files(service: SandboxService, files: SandboxFiles) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await files.write(sandbox, "/root/t.txt", "text\n")
    await files.write(sandbox, "/root/b.bin", base64.b64encode(b"\x00\xff").decode(), encoding="base64")
    assert await files.read_whole(sandbox, "/root/t.txt") == "text\n"
    assert await files.read_whole(sandbox, "/root/b.bin") == b"\x00\xff"
