"""Moving data: copy_file of one file each way, write_file and read_file of the same amount in pieces."""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mcp.client import Client

from .session import call

__all__ = ["Throughput", "throughput"]

_MiB = 1 << 20
WRITE_PIECE = 8 * _MiB
"""files.max_write_bytes of the bench policy (the shipped default): write_file replaces a whole file."""


@dataclass(frozen=True)
class Throughput:
    """MiB/s of each way, for ``mib`` MiB."""

    mib: int
    copy_in: float
    copy_out: float
    write_file: float
    read_file: float
    read_calls: int


def _rate(size: int, started: float) -> float:
    return size / _MiB / (time.perf_counter() - started)


async def throughput(client: Client, policy: str, workdir: Path, mib: int) -> Throughput:
    size = mib * _MiB
    payload = workdir / "payload.bin"
    payload.write_bytes(os.urandom(size))
    sandbox = (await call(client, "create_sandbox", policy=policy))["sandbox_id"]
    try:
        started = time.perf_counter()
        await call(
            client,
            "copy_file",
            sandbox_id=sandbox,
            source=payload.name,
            destination="/root/p",
            direction="to_sandbox",
        )
        copy_in = _rate(size, started)
        started = time.perf_counter()
        await call(
            client,
            "copy_file",
            sandbox_id=sandbox,
            source="/root/p",
            destination="back.bin",
            direction="from_sandbox",
        )
        copy_out = _rate(size, started)
        if (workdir / "back.bin").stat().st_size != size:
            raise RuntimeError("copy_file from_sandbox brought back a file of another size")

        piece = os.urandom(WRITE_PIECE)
        written, index = 0, 0
        started = time.perf_counter()
        while written < size:
            chunk = piece[: size - written]
            text = base64.b64encode(chunk).decode()
            await call(
                client,
                "write_file",
                sandbox_id=sandbox,
                path=f"/root/w{index}",
                content=text,
                encoding="base64",
            )
            written += len(chunk)
            index += 1
        write_rate = _rate(size, started)

        offset, read, calls = 0, 0, 0
        started = time.perf_counter()
        while True:
            got = await call(
                client, "read_file", sandbox_id=sandbox, path="/root/p", offset=offset, encoding="base64"
            )
            read += len(base64.b64decode(got["content"]))
            calls += 1
            if got.get("next_offset") is None:
                break
            offset = got["next_offset"]
        read_rate = _rate(read, started)
        if read != size:
            raise RuntimeError(f"read_file read {read} bytes of {size}")
    finally:
        await call(client, "destroy_sandbox", sandbox_id=sandbox)
        payload.unlink(missing_ok=True)
        (workdir / "back.bin").unlink(missing_ok=True)
    return Throughput(mib, copy_in, copy_out, write_rate, read_rate, calls)
