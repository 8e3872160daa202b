"""Where a cold create (and a destroy) spends its time, step by step, on the real daemons.

Run as root under the shared test lock, e.g.::

    flock /tmp/nspawn-mcp-tests.lock sh -c '.venv/bin/python benchmarks/profile_create.py -n 20; \
        .venv/bin/nspawn-mcp box stop'

It drives the service in-process (no MCP front end) and wraps the backend's steps with timers;
prints the p50 of each step in milliseconds. A step's time includes whatever it waits for (the
event loop is otherwise idle: one create at a time).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from nspawn_mcp.backend import jail, machine1, nspawn, systemd1
from nspawn_mcp.backend.api import CommandSpec
from nspawn_mcp.policy import CreateRequest, PolicySet
from nspawn_mcp.policy.loader import shipped_policy_dir
from nspawn_mcp.records import MetaStore
from nspawn_mcp.runtime import ServerConfig, open_service

SAMPLES: defaultdict[str, list[float]] = defaultdict(list)
_current: dict[str, float] = {}


def _record(step: str, started: float) -> None:
    _current[step] = _current.get(step, 0.0) + (time.perf_counter() - started) * 1000


def _timed_async(owner: Any, name: str, step: str) -> None:
    original: Callable[..., Awaitable[Any]] = getattr(owner, name)

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            _record(step, started)

    setattr(owner, name, wrapper)


def _timed_sync(owner: Any, name: str, step: str) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _record(step, started)

    setattr(owner, name, wrapper)


def instrument() -> None:
    _timed_async(machine1.Machined, "clone_image", "machined CloneImage")
    _timed_async(machine1.Machined, "set_image_limit", "machined SetImageLimit")
    _timed_async(machine1.Machined, "list_images", "machined ListImages")
    _timed_async(systemd1.Systemd, "_wait_job", "systemd job wait (JobRemoved)")
    _timed_async(jail.JailClient, "ping", "supervisor ping")
    _timed_sync(MetaStore, "save", "record save")
    _timed_sync(MetaStore, "remove", "record remove")
    _timed_async(nspawn.NspawnBackend, "create", "backend.create (total)")
    _timed_async(nspawn.NspawnBackend, "destroy", "backend.destroy (total)")
    original_manager = systemd1.Systemd._manager

    async def manager(self: systemd1.Systemd, member: str, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original_manager(self, member, *args, **kwargs)
        finally:
            _record(f"systemd {member} (call)", started)

    systemd1.Systemd._manager = manager  # type: ignore[method-assign]


TRUE = CommandSpec(argv=("true",), cwd=None, env={}, stdin=b"", timeout_seconds=10, max_output_bytes=4096)


async def profile(count: int, policy: str) -> None:
    instrument()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as workdir:
        policy_dir = Path(workdir)
        (policy_dir / "bench.toml").write_text("[sandboxes]\nmax_live = 1000\n")
        config = ServerConfig(policy_dirs=(policy_dir,), max_sandboxes=1000)
        policies = PolicySet.load([policy_dir, shipped_policy_dir()])
        async with open_service(config, policies) as service:
            backend = service._backend
            for index in range(count + 2):  # the first two warm caches up and are not counted
                _current.clear()
                started = time.perf_counter()
                info = await service.create(CreateRequest(policy=policy))
                _current["create (service, total)"] = (time.perf_counter() - started) * 1000
                run_started = time.perf_counter()
                await backend.jail(info.sandbox_id).run(TRUE)
                _current["first exec `true`"] = (time.perf_counter() - run_started) * 1000
                _current["create to first exec"] = (time.perf_counter() - started) * 1000
                run_started = time.perf_counter()
                await backend.jail(info.sandbox_id).run(TRUE)
                _current["second exec `true`"] = (time.perf_counter() - run_started) * 1000
                destroy_started = time.perf_counter()
                await service.destroy(info.sandbox_id)
                _current["destroy (service, total)"] = (time.perf_counter() - destroy_started) * 1000
                if index >= 2:
                    for step, value in _current.items():
                        SAMPLES[step].append(value)
                await service.settled()  # the background clean-up of the last one, off the clock
    print(f"{'step':44} {'p50 ms':>8} {'p90 ms':>8}  (n={count})")
    for step, values in SAMPLES.items():
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
        print(f"{step:44} {statistics.median(values):8.1f} {p90:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--count", type=int, default=20)
    parser.add_argument("--policy", default="default")
    arguments = parser.parse_args()
    anyio.run(profile, arguments.count, arguments.policy)


if __name__ == "__main__":
    main()
