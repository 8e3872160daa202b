"""``python -m benchmarks [--quick] [--density N]``: the whole run, as root, after ``make setup``."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from mcp.client import Client

from nspawn_mcp import __version__
from nspawn_mcp.layout import Layout

from . import baselines
from .chart import write_chart
from .density import density
from .files import throughput
from .forks import snapshots_and_forks
from .lifecycle import burst, exec_true, sequential, sustained
from .report import markdown, splice_readme
from .results import Results
from .session import COLD, Bench, call, pooled_ready, prepare, prepare_bursts, stop_daemon

REPOSITORY = Path(__file__).resolve().parent.parent
RESULTS = REPOSITORY / "bench" / "results"
README = REPOSITORY / "README.md"


@dataclass(frozen=True)
class Plan:
    sequential: int = 100
    gap_s: float = 0.25
    execs: int = 200
    bursts: tuple[int, ...] = (50, 100)
    clients: int = 3
    sustained_s: float = 20
    density: int = 100
    copy_mib: int = 100
    baseline_rounds: int = 30
    pool_settle_s: float = 3

    @classmethod
    def quick(cls) -> Plan:
        return cls(10, 0.1, 30, (5, 10), 2, 5, 20, 10, 5, 1)


async def measure(bench: Bench, plan: Plan, results: Results) -> None:
    series = [("cold", COLD)]
    if bench.pool_policy is not None:
        series.append(("pool", bench.pool_policy))

    destroy: list[float] = []
    async with bench.client() as client:
        for _, policy in series:  # warm-up: bus activation, first clone, the pool filled
            sandbox = (await call(client, "create_sandbox", policy=policy))["sandbox_id"]
            await call(client, "destroy_sandbox", sandbox_id=sandbox)
        await anyio.sleep(plan.pool_settle_s)
        # first, while nothing else is being freed: memory is read before and after
        idle = await density(client, COLD, plan.density)
        for name, policy in series:
            if name == "pool":
                await anyio.sleep(plan.pool_settle_s)
            rounds = await sequential(client, policy, plan.sequential, plan.gap_s)
            note = {"sequential": True, "gap_s": plan.gap_s}
            results.latency(f"create.{name}", f"create, {name}", rounds.create_ms, **note)
            results.latency(
                f"first_exec.{name}", f"create to first exec, {name}", rounds.first_exec_ms, **note
            )
            if name == "cold":
                destroy = rounds.destroy_ms
        if bench.pool_policy is None:
            results.skip("create.pool", "create, pool", bench.pool_refusal)
            results.skip("first_exec.pool", "create to first exec, pool", bench.pool_refusal)
        results.latency("exec.true", "exec `true`", await exec_true(client, COLD, plan.execs))
        results.latency("destroy", "destroy", destroy)

        for size in plan.bursts:
            await record_burst(client, COLD, size, "cold", results)

        forks = await snapshots_and_forks(client)
        for key, label in (
            ("snapshot", "snapshot_sandbox"),
            ("fork", "fork_sandbox"),
            ("fork10_wall", "10 forks at once: wall time"),
        ):
            if isinstance(forks, str):
                results.skip(key, label, forks)
            else:
                results.latency(key, label, forks.get(f"{key}_ms", []))

        rates = await throughput(client, COLD, bench.workdir, plan.copy_mib)
        mib = {"n": 1, "mib": rates.mib}
        results.figure(
            "copy.in", f"copy_file of {rates.mib} MiB into a sandbox", rates.copy_in, "MiB/s", **mib
        )
        results.figure("copy.out", f"copy_file of {rates.mib} MiB out", rates.copy_out, "MiB/s", **mib)
        results.figure("write_file", "write_file, 8 MiB pieces (base64)", rates.write_file, "MiB/s", **mib)
        results.figure(
            "read_file",
            "read_file, 1 MiB pieces (base64)",
            rates.read_file,
            "MiB/s",
            calls=rates.read_calls,
            **mib,
        )
        results.figure(
            "density",
            f"idle sandboxes: host memory each (n={idle.n:,})",
            idle.mib_each,
            "MiB each",
            n=idle.n,
            mem_available_before=idle.before,
            mem_available_after=idle.after,
            create_s=round(idle.create_s, 2),
        )

    rate = await sustained(bench, COLD, plan.clients, plan.sustained_s)
    results.figure(
        "sustained",
        f"sustained create+destroy, {plan.clients} clients for {plan.sustained_s:g} s",
        rate.per_second,
        "creates/s",
        n=rate.creates,
        per_client=rate.per_client,
        failures=rate.failures,
        seconds=round(rate.seconds, 2),
    )


async def record_burst(client: Client, policy: str, size: int, name: str, results: Results) -> None:
    key, label = f"burst{size}.{name}", f"burst of {size}, {name}: create to first exec"
    got = await burst(client, policy, size)
    results.latency(key, label, got.first_exec_ms, failures=got.failures)
    results.figure(f"{key}.wall", f"burst of {size}, {name}: wall time", got.wall_ms, "ms", n=size)


async def measure_pooled_bursts(bench: Bench | None, plan: Plan, results: Results) -> None:
    """Bursts served by a pool as large as the largest burst, in a daemon of their own; each burst
    waits until the pool is full again."""
    size = max(plan.bursts)
    if bench is None or bench.pool_policy is None:
        for burst_size in plan.bursts:
            results.skip(f"burst{burst_size}.pool", f"burst of {burst_size}, pool", "pool not available")
        return
    stop_daemon()
    async with bench.client() as client:
        for burst_size in plan.bursts:
            await pooled_ready(bench.pool_policy, size)
            await record_burst(client, bench.pool_policy, burst_size, "pool", results)


def measure_baselines(plan: Plan, results: Results) -> None:
    host = baselines.locate(Layout.from_env())
    labels = {
        "floor.create": "raw nspawn: clone + unit ready",
        "floor.first_exec": "raw nspawn: create to first nsenter",
        "floor.exec": "raw nspawn: nsenter `true`",
        "floor.destroy": "raw nspawn: systemctl stop",
        "bwrap.run": "bubblewrap one-shot `true`",
        "podman.create": "podman run -d (create + start)",
        "podman.first_exec": "podman: create to first exec",
        "podman.exec": "podman exec `true`",
        "podman.destroy": "podman rm -f",
        "podman.run": "podman run --rm one-shot `true`",
    }
    for tool, measure in (
        ("floor", baselines.floor),
        ("bwrap", baselines.bwrap),
        ("podman", baselines.podman),
    ):
        got = measure(host, plan.baseline_rounds)
        for key, label in labels.items():
            if not key.startswith(f"{tool}."):
                continue
            if isinstance(got, str):
                results.skip(key, label, got)
            else:
                results.latency(key, label, got.get(key, []))


def _meta(plan: Plan, mode: str, bench: Bench) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "-C", str(REPOSITORY), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": mode,
        "version": __version__,
        "commit": commit,
        "host": {
            "cpus": os.cpu_count(),
            "memory_gib": round(memory / (1 << 30), 1),
            "kernel": platform.release(),
            "load_before": os.getloadavg(),
        },
        "plan": dataclasses.asdict(plan),
        "pool": bench.pool_policy or bench.pool_refusal,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small n: to try it (results named *-quick)")
    parser.add_argument(
        "--density", type=int, metavar="N", help="idle sandboxes for density (full run: 1000)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results directory (default {RESULTS})")
    args = parser.parse_args()
    plan = Plan.quick() if args.quick else Plan()
    if args.density:
        plan = dataclasses.replace(plan, density=args.density)
    mode = "quick" if args.quick else "full"

    started = time.monotonic()
    stop_daemon()  # the daemon runs with the options of the front end that starts it: ours
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="nspawn-mcp-bench-") as workdir:
        bench = prepare(Path(workdir))
        results = Results(_meta(plan, mode, bench))
        try:
            anyio.run(measure, bench, plan, results)
            anyio.run(measure_pooled_bursts, prepare_bursts(Path(workdir) / "bursts"), plan, results)
            measure_baselines(plan, results)
        finally:
            stop_daemon()
    results.meta["host"]["load_after"] = os.getloadavg()
    results.meta["duration_s"] = round(time.monotonic() - started)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d-%H%M") + ("-quick" if args.quick else "")
    table = markdown(results)
    (args.out / f"{stem}.json").write_text(json.dumps(results.to_json(), indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    write_chart(results, args.out / f"{stem}.png")
    if not args.quick:
        README.write_text(splice_readme(README.read_text(), table))
    print(table)
    print(f"written: {args.out}/{stem}.json, .md, .png" + ("" if args.quick else "; README.md updated"))


if __name__ == "__main__":
    main()
