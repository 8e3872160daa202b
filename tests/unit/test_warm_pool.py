"""The warm pool: what it keeps started, what it can serve, and how a create takes from it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.errors import BackendError, QuotaExceeded
from nspawn_mcp.policy import CreateRequest, MountRequest, PolicySet, resolve_create
from nspawn_mcp.policy.loader import PolicyError, load_policy_text
from nspawn_mcp.pool import MAX_AGE, fits, pool_specs
from nspawn_mcp.service import SandboxService
from tests.unit.fake_backend import Clock, FakeBackend
from tests.waiting import wait_until

pytestmark = pytest.mark.anyio

POOLED = """
[sandboxes]
max_live = 2
images = ["default", "python"]

[pool]
size = 2

[limits.max]
memory = "2GiB"
cpus = 2.0
processes = 1024
ttl_seconds = 86400
disk = "1GiB"

[mounts]
allowed = [{ host = "/srv" }]
"""


def policies(**texts: str) -> PolicySet:
    found = {"default": load_policy_text("", "default.toml")}
    return PolicySet(found | {name: load_policy_text(text, f"{name}.toml") for name, text in texts.items()})


# -- what is pooled, and what a pooled sandbox can serve -------------------------------------------


def test_a_policy_pools_its_first_image_unless_it_names_others() -> None:
    both = POOLED.replace("size = 2", 'size = 2\nimages = ["default", "python"]')
    specs = pool_specs(policies(pooled=POOLED, both=both))
    assert [(s.plan.policy, s.plan.image, s.size) for s in specs] == [
        ("both", "default", 2),
        ("both", "python", 2),
        ("pooled", "default", 2),
    ]


def test_policies_without_a_pool_section_pool_nothing() -> None:
    assert pool_specs(policies(other="[sandboxes]\nmax_live = 3\n")) == []


def test_a_pooled_image_the_policy_does_not_allow_is_refused() -> None:
    with pytest.raises(PolicyError, match=r"pool.images: 'node' is not one of sandboxes.images"):
        load_policy_text('[pool]\nsize = 1\nimages = ["node"]\n', "bad.toml")


def test_pooled_sandboxes_outlive_their_wait_in_the_unit_cap() -> None:
    (spec,) = pool_specs(policies(pooled=POOLED))
    default = resolve_create(
        "pooled", policies(pooled=POOLED).get("pooled"), CreateRequest(policy="pooled"), cwd="/"
    )
    assert spec.plan.limits.lifetime_cap_seconds == default.limits.lifetime_cap_seconds + MAX_AGE


def wanted(**asked: object) -> object:
    policy = policies(pooled=POOLED).get("pooled")
    return resolve_create("pooled", policy, CreateRequest(policy="pooled", **asked), cwd="/work")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("asked", "served"),
    [
        ({}, True),
        ({"memory_mb": 1024, "cpus": 2.0, "max_processes": 512, "ttl_seconds": 60, "disk_mb": 600}, True),
        ({"memory_mb": 256}, False),  # its /dev/shm is a quarter of the 512 MiB it started with
        ({"image": "python"}, False),
        ({"mounts": (MountRequest(host="/srv", sandbox="/srv"),)}, False),
    ],
)
def test_a_pooled_sandbox_serves_creates_whose_fixed_parts_match(
    asked: dict[str, object], served: bool
) -> None:
    (spec,) = pool_specs(policies(pooled=POOLED))
    assert fits(spec.plan, wanted(**asked)) is served  # type: ignore[arg-type]


def test_a_pooled_sandbox_serves_only_its_own_policy() -> None:
    (spec,) = pool_specs(policies(pooled=POOLED))
    assert not fits(replace(spec.plan, policy="default"), wanted())  # type: ignore[arg-type]


# -- the service with a pool ---------------------------------------------------------------------


def pooled_ids(service: SandboxService) -> set[str]:
    return {pooled.sandbox_id for pooled in service.pool.sandboxes()}


@pytest.fixture
def backend(tmp_path: Path) -> FakeBackend:
    (tmp_path / "staging").mkdir()
    return FakeBackend(staging_dir=tmp_path / "staging", installed={"default", "python"})


@pytest.fixture
async def service(backend: FakeBackend, tmp_path: Path) -> AsyncIterator[SandboxService]:
    found = policies(pooled=POOLED)
    service = SandboxService(
        backend,
        found,
        records_dir=tmp_path / "state",
        cwd=str(tmp_path),
        max_sandboxes=10,
        clock=Clock(),
        pool=pool_specs(found),
    )
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(service.pool.run)
        await wait_until(lambda: service.pool.ready() == 2, what="the pool to fill")
        yield service
        await service.pool.stop()


async def test_a_create_takes_a_pooled_sandbox_and_applies_its_caps(
    service: SandboxService, backend: FakeBackend
) -> None:
    pooled = set(backend.sandboxes)
    info = await service.create(CreateRequest(policy="pooled", memory_mb=1024, ttl_seconds=60))
    assert info.sandbox_id in pooled
    assert backend.adapted == [info.sandbox_id]
    assert backend.sandboxes[info.sandbox_id].limits.memory_bytes == 1024 << 20
    assert info.expires_at == "2026-01-01T00:01:00.000+00:00"  # its life starts at the hand-out


async def test_the_pool_refills_after_a_hand_out(service: SandboxService, backend: FakeBackend) -> None:
    await service.create(CreateRequest(policy="pooled"))
    await wait_until(lambda: service.pool.ready() == 2, what="the pool to refill")
    assert len(backend.sandboxes) == 3


async def test_pooled_sandboxes_count_against_no_quota_and_are_nobodys(service: SandboxService) -> None:
    assert service.list() == []
    await service.create(CreateRequest(policy="pooled"))
    await service.create(CreateRequest(policy="pooled"))
    await wait_until(lambda: service.pool.ready() == 2, what="the refills")
    with pytest.raises(QuotaExceeded, match="max_live"):
        await service.create(CreateRequest(policy="pooled"))


async def test_what_the_pool_cannot_serve_is_started_cold(
    service: SandboxService, backend: FakeBackend
) -> None:
    pooled = set(backend.sandboxes)
    info = await service.create(CreateRequest(policy="pooled", image="python"))
    assert info.sandbox_id not in pooled
    assert backend.adapted == []
    assert service.pool.ready() == 2


async def test_a_pooled_sandbox_that_cannot_be_handed_out_is_removed_and_one_started(
    service: SandboxService, backend: FakeBackend
) -> None:
    pooled = set(backend.sandboxes)
    backend.adapt_error = BackendError("it stopped meanwhile")
    info = await service.create(CreateRequest(policy="pooled"))
    assert info.sandbox_id not in pooled
    assert len(set(backend.destroyed) & pooled) == 1
    assert [s.sandbox_id for s in service.list()] == [info.sandbox_id]


async def test_a_pooled_sandbox_that_stops_on_its_own_is_replaced(
    service: SandboxService, backend: FakeBackend
) -> None:
    gone = sorted(backend.sandboxes)[0]
    service.machine_removed(gone)
    await wait_until(
        lambda: service.pool.ready() == 2 and gone not in pooled_ids(service), what="a replacement"
    )
    await wait_until(lambda: gone in backend.destroyed, what="its remains removed")
    assert service.list() == []


async def test_refills_wait_while_a_client_waits_for_a_cold_create(
    service: SandboxService, backend: FakeBackend
) -> None:
    await service.create(CreateRequest(policy="pooled"))  # the pool starts one to refill
    await wait_until(lambda: service.pool.ready() == 2, what="the refill")
    backend.create_gate = anyio.Event()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(service.create, CreateRequest(policy="pooled", image="python"))
        await wait_until(lambda: len(backend.sandboxes) == 4, what="the cold create to begin")
        known = set(backend.sandboxes)
        service.machine_removed(next(iter(s for s in backend.sandboxes if s in pooled_ids(service))))
        await anyio.sleep(0.05)
        assert set(backend.sandboxes) < known  # the stopped one removed, no refill started meanwhile
        backend.create_gate.set()
    backend.create_gate = None
    await wait_until(lambda: service.pool.ready() == 2, what="the refill after it")


async def test_stopping_removes_every_pooled_sandbox(service: SandboxService, backend: FakeBackend) -> None:
    pooled = set(backend.sandboxes)
    info = await service.create(CreateRequest(policy="pooled"))
    await wait_until(lambda: service.pool.ready() == 2, what="the refill")
    await service.pool.stop()
    assert set(backend.sandboxes) == {info.sandbox_id}
    assert pooled - {info.sandbox_id} <= set(backend.destroyed)


async def test_old_pooled_sandboxes_are_replaced(backend: FakeBackend, tmp_path: Path) -> None:
    found = policies(pooled=POOLED)
    clock = Clock()
    service = SandboxService(
        backend, found, records_dir=tmp_path / "state", max_sandboxes=10, clock=clock, pool=pool_specs(found)
    )
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(service.pool.run)
        await wait_until(lambda: service.pool.ready() == 2, what="the pool to fill")
        first = set(backend.sandboxes)
        clock.now += timedelta(seconds=MAX_AGE + 1)
        await wait_until(lambda: first <= set(backend.destroyed), what="the old ones removed")
        await wait_until(lambda: service.pool.ready() == 2, what="new ones")
        await service.pool.stop()
    assert not set(backend.sandboxes)


async def test_the_pool_fills_only_the_room_the_servers_maximum_leaves(
    backend: FakeBackend, tmp_path: Path
) -> None:
    found = policies(pooled=POOLED.replace("size = 2", "size = 5"))
    service = SandboxService(
        backend, found, records_dir=tmp_path / "state", max_sandboxes=3, clock=Clock(), pool=pool_specs(found)
    )
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(service.pool.run)
        await wait_until(lambda: service.pool.ready() == 3, what="the pool to fill the room")
        await service.create(CreateRequest(policy="pooled"))  # a client is never refused for the pool
        await anyio.sleep(0.05)
        assert (service.pool.ready(), len(backend.sandboxes)) == (2, 3)
        await service.pool.stop()


async def test_the_operator_sees_the_pool_as_nobodys_sandboxes(
    service: SandboxService, backend: FakeBackend
) -> None:
    info = await service.create(CreateRequest(policy="pooled"))
    await wait_until(lambda: service.pool.ready() == 2, what="the refill")
    rows = {row.sandbox_id: row for row in await service.live_sandboxes()}
    assert set(rows) == set(backend.sandboxes)
    assert [row.sandbox_id for row in rows.values() if not row.pooled] == [info.sandbox_id]
    assert all(row.owner == "" for row in rows.values() if row.pooled)
