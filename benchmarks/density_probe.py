"""How many idle sandboxes fit, and what each costs the host, on the real daemons.

Run as root under the shared test lock (it holds N sandboxes for a while, then destroys them)::

    flock /tmp/nspawn-mcp-tests.lock sh -c '.venv/bin/python benchmarks/density.py -n 1000; \
        .venv/bin/nspawn-mcp box stop'

Host memory per idle sandbox is ``(MemAvailable before - MemAvailable after) / N`` once they settled;
the RSS and PSS of nspawn, its stub init and the supervisor are shown for a sample of them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.naming import machine_name
from nspawn_mcp.policy import CreateRequest, PolicySet
from nspawn_mcp.policy.loader import shipped_policy_dir
from nspawn_mcp.runtime import ServerConfig, find_daemons, open_service


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    return {
        line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
    }


_SHOWN = ("AnonPages", "Shmem", "Slab", "SUnreclaim", "KernelStack", "PageTables", "Percpu", "Cached")


def rollup(proc: Path, pid: int) -> tuple[int, int, int]:
    """RSS, PSS and anonymous memory of ``pid`` in KiB."""
    fields = {}
    for line in (proc / str(pid) / "smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return fields["Rss"], fields["Pss"], fields["Anonymous"]


def children(proc: Path, pid: int) -> list[int]:
    found = []
    for task in (proc / str(pid) / "task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


async def processes(backend: NspawnBackend, proc: Path, sandbox_id: str) -> dict[str, int]:
    """nspawn, its stub init (the machine's leader) and the supervisor (the init's child)."""
    leader = await backend.machined.machine_leader(machine_name(sandbox_id))
    status = (proc / str(leader) / "status").read_text()
    parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    (supervisor,) = children(proc, leader)
    return {"nspawn": parent, "stub init": leader, "supervisor": supervisor}


async def density(count: int, parallel: int, settle: float) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as workdir:
        policy_dir = Path(workdir)
        (policy_dir / "bench.toml").write_text(f"[sandboxes]\nmax_live = {count}\n")
        config = ServerConfig(policy_dirs=(policy_dir,), max_sandboxes=count)
        policies = PolicySet.load([policy_dir, shipped_policy_dir()])
        proc = find_daemons(config.layout).proc_root
        async with open_service(config, policies) as service:
            backend = service._backend
            assert isinstance(backend, NspawnBackend)
            await anyio.sleep(settle)
            before = meminfo()
            made: list[str] = []
            failures: list[str] = []
            started = time.perf_counter()
            limiter = anyio.CapacityLimiter(parallel)

            async def one() -> None:
                async with limiter:
                    try:
                        made.append((await service.create(CreateRequest(policy="bench"))).sandbox_id)
                    except Exception as exc:
                        failures.append(str(exc))

            async def destroy(sandbox_id: str) -> None:
                async with limiter:
                    await service.destroy(sandbox_id)

            try:
                async with anyio.create_task_group() as tasks:
                    for _ in range(count):
                        tasks.start_soon(one)
                elapsed = time.perf_counter() - started
                print(f"created {len(made)} of {count} in {elapsed:.1f} s; failures: {len(failures)}")
                for failure in sorted(set(failures))[:5]:
                    print("  failure:", failure)
                await anyio.sleep(settle)
                after = meminfo()
                alive = len(await backend.running())
                print(f"alive now: {alive}")
                each = max(1, len(made)) * 1024
                print(
                    f"MemAvailable {before['MemAvailable']} KiB -> {after['MemAvailable']} KiB: "
                    f"{(before['MemAvailable'] - after['MemAvailable']) / each:.2f} MiB per idle sandbox"
                )
                print(
                    "  of which, per sandbox (MiB): "
                    + ", ".join(f"{name} {(after[name] - before[name]) / each:.2f}" for name in _SHOWN)
                )
                sample: dict[str, list[tuple[int, int, int]]] = {}
                for sandbox_id in made[:: max(1, len(made) // 20)]:
                    for name, pid in (await processes(backend, proc, sandbox_id)).items():
                        sample.setdefault(name, []).append(rollup(proc, pid))
                for name, values in sample.items():
                    rss = statistics.median(value[0] for value in values)
                    pss = statistics.median(value[1] for value in values)
                    anonymous = statistics.median(value[2] for value in values)
                    print(
                        f"  {name:12} RSS {rss / 1024:6.2f}  PSS {pss / 1024:6.2f}  "
                        f"anonymous {anonymous / 1024:6.2f} MiB (median of {len(values)})"
                    )
            finally:
                started = time.perf_counter()
                with anyio.CancelScope(shield=True):
                    async with anyio.create_task_group() as tasks:
                        for sandbox_id in made:
                            tasks.start_soon(destroy, sandbox_id)
                    await service.settled()
                print(f"destroyed {len(made)} in {time.perf_counter() - started:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--count", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--settle", type=float, default=10.0)
    arguments = parser.parse_args()
    anyio.run(density, arguments.count, arguments.parallel, arguments.settle)


if __name__ == "__main__":
    main()
