"""What a sandbox uses, as systemd (its slice's counters) and machined (its image) report it."""

from __future__ import annotations

import pytest

from nspawn_mcp.backend.api import CommandSpec
from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.naming import new_sandbox_id
from tests.integration.conftest import Factory

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

MiB = 1 << 20
HOLD_64_MIB = "import time; b = bytearray(64 << 20); b[::4096] = b'x' * (len(b) // 4096); time.sleep(600)"


def command(script: str) -> CommandSpec:
    return CommandSpec(
        argv=("/bin/sh", "-c", script),
        cwd=None,
        env={},
        stdin=b"",
        timeout_seconds=60,
        max_output_bytes=1 << 16,
    )


async def test_usage_counts_memory_cpu_processes_and_disk(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    sandbox = await make_sandbox(disk_mb=1024)
    idle = await backend.usage(sandbox)
    jail = backend.jail(sandbox)
    await jail.spawn(command(f'python3 -c "{HOLD_64_MIB}"'), None)
    busy = await jail.run(
        command("dd if=/dev/urandom of=/root/blob bs=1M count=32 status=none && sync && sleep 1 && echo done")
    )
    assert busy.stdout == b"done\n", busy
    used = await backend.usage(sandbox)
    print(f"idle: {idle}\nbusy: {used}")  # the numbers, for the report (-s)

    assert used.memory_bytes is not None
    assert used.memory_bytes >= 64 * MiB
    assert idle.memory_bytes is not None
    assert idle.memory_bytes < used.memory_bytes
    assert used.cpu_nsec is not None
    assert used.cpu_nsec > 0
    assert used.tasks is not None
    assert used.tasks >= 2  # the supervisor and the python process, at least
    assert used.disk_bytes is not None
    assert used.disk_bytes >= 32 * MiB


async def test_a_sandbox_that_does_not_exist_uses_nothing_known(backend: NspawnBackend) -> None:
    usage = await backend.usage(new_sandbox_id())
    assert (usage.memory_bytes, usage.cpu_nsec, usage.tasks, usage.disk_bytes) == (None, None, None, None)
