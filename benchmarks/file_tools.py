"""Throughput of the file tools and of directory copies, on the real daemons, through the service.

Run as root, under the test lock, from the repository:

    flock /tmp/nspawn-mcp-tests.lock sh -c \
        '.venv/bin/python benchmarks/file_tools.py; .venv/bin/nspawn-mcp box stop'

Measures: write_file of 100 MiB in pieces of files.max_write_bytes (8 MiB, separate files),
read_file of a 100 MiB file in pieces of files.max_read_bytes (1 MiB, base64 paging),
and copy_file of a 100 MiB directory (100 files of 1 MiB) out of the sandbox and back in.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
import time
from pathlib import Path

import anyio

from nspawn_mcp.backend.api import CommandSpec
from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.files import SandboxFiles
from nspawn_mcp.layout import Layout
from nspawn_mcp.policy import CreateRequest, PolicySet
from nspawn_mcp.policy.loader import load_policy_text
from nspawn_mcp.runtime import find_daemons
from nspawn_mcp.service import SandboxService

_MiB = 1 << 20
TOTAL = 100 * _MiB
POLICY = (
    '[limits.default]\nmemory = "1GiB"\n[limits.max]\nmemory = "2GiB"\n[files]\nallowed_host_dirs = ["."]\n'
)


def command(*argv: str) -> CommandSpec:
    return CommandSpec(argv=argv, cwd=None, env={}, stdin=b"", timeout_seconds=120, max_output_bytes=1 << 20)


def rate(label: str, size: int, seconds: float) -> None:
    print(f"{label:55s} {size / _MiB:6.0f} MiB in {seconds:6.2f} s = {size / _MiB / seconds:7.1f} MiB/s")


async def main() -> None:
    layout = Layout.from_env()
    daemons = find_daemons(layout)
    backend = await NspawnBackend.connect(daemons.bus_address, layout, proc_root=daemons.proc_root)
    work = Path(tempfile.mkdtemp(prefix="files-bench-"))
    (work / "records").mkdir()
    (work / "cwd").mkdir()
    service = SandboxService(
        backend,
        PolicySet({"default": load_policy_text(POLICY, "default.toml")}),
        records_dir=work / "records",
        cwd=str(work / "cwd"),
    )
    files = SandboxFiles(service)
    sandbox = (await service.create(CreateRequest())).sandbox_id
    try:
        piece = os.urandom(8 * _MiB)
        encoded = base64.b64encode(piece).decode()
        started = time.perf_counter()
        written = 0
        for index in range(TOTAL // len(piece) + 1):
            size = min(len(piece), TOTAL - written)
            if size <= 0:
                break
            text = encoded if size == len(piece) else base64.b64encode(piece[:size]).decode()
            await files.write(sandbox, f"/root/w{index}", text, encoding="base64")
            written += size
        rate("write_file, 8 MiB pieces (base64)", written, time.perf_counter() - started)

        await files.write(sandbox, "/root/big", "")
        jail = backend.jail(sandbox)
        await jail.run(command("/bin/sh", "-c", "head -c 104857600 /dev/urandom > /root/big"))
        started = time.perf_counter()
        offset, read, calls = 0, 0, 0
        while True:
            got = await files.read(sandbox, "/root/big", offset)
            read += len(base64.b64decode(got.content))
            calls += 1
            if got.next_offset is None:
                break
            offset = got.next_offset
        rate(f"read_file, 1 MiB pieces (base64, {calls} calls)", read, time.perf_counter() - started)

        await jail.run(
            command(
                "/bin/sh",
                "-c",
                "mkdir -p /root/tree && "
                "for i in $(seq 1 100); do head -c 1048576 /dev/urandom > /root/tree/f$i; done",
            )
        )
        started = time.perf_counter()
        out = await service.copy_from_sandbox(sandbox, "/root/tree", "tree")
        rate(
            f"copy_file from_sandbox, directory ({out.files} files)", out.bytes, time.perf_counter() - started
        )
        started = time.perf_counter()
        back = await service.copy_to_sandbox(sandbox, "tree", "/root/back")
        rate(
            f"copy_file to_sandbox, directory ({back.files} files)", back.bytes, time.perf_counter() - started
        )
        single = work / "cwd" / "one"
        single.write_bytes(os.urandom(TOTAL))
        started = time.perf_counter()
        await service.copy_to_sandbox(sandbox, "one", "/root/one")
        rate("copy_file to_sandbox, one file (baseline)", TOTAL, time.perf_counter() - started)
        started = time.perf_counter()
        await service.copy_from_sandbox(sandbox, "/root/one", "one-back")
        rate("copy_file from_sandbox, one file (baseline)", TOTAL, time.perf_counter() - started)
    finally:
        with anyio.CancelScope(shield=True):
            await service.destroy(sandbox)
        backend.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    anyio.run(main)
