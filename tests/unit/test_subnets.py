"""Egress subnets: one /30 per egress sandbox, reserved by the network that owns them.

The pool is the bookkeeping the real backend's network keeps (and the in-memory backend
reuses); the service reserves through the backend, between its quota check and
registering the sandbox, and the subnet is released when the sandbox is destroyed.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from nspawn_mcp.backend.egress import SANDBOX_NETWORK, SubnetPool
from nspawn_mcp.errors import BackendError, QuotaExceeded
from nspawn_mcp.policy import CreateRequest, PolicySet
from nspawn_mcp.policy.loader import load_policy_text
from nspawn_mcp.service import SandboxService
from tests.unit.fake_backend import FakeBackend

EVERY = [str(subnet) for subnet in SANDBOX_NETWORK.subnets(new_prefix=30)]
A, B, C = "sbx-0000000a", "sbx-0000000b", "sbx-0000000c"


def others(subnets: list[str]) -> list[tuple[str, str]]:
    """Sandboxes (none of A, B, C) holding ``subnets``."""
    return [(f"sbx-{0xF0000000 + index:08x}", subnet) for index, subnet in enumerate(subnets)]


def test_each_sandbox_gets_the_first_free_slash_30_and_keeps_it() -> None:
    pool = SubnetPool()
    assert pool.reserve(A) == "10.213.0.0/30"
    assert pool.reserve(B) == "10.213.0.4/30"
    assert pool.reserve(A) == "10.213.0.0/30"  # asking again gives the one it holds
    assert (pool.held(A), pool.held(C)) == ("10.213.0.0/30", None)


def test_a_released_subnet_is_given_again() -> None:
    pool = SubnetPool()
    pool.reserve(A)
    pool.reserve(B)
    pool.release(A)
    pool.release(A)  # idempotent
    assert pool.reserve(C) == "10.213.0.0/30"


def test_running_out_of_subnets_is_a_quota_the_agent_can_read() -> None:
    pool = SubnetPool()
    for holder, subnet in others(EVERY[1:]):
        pool.claim(holder, subnet)
    assert pool.reserve(A) == EVERY[0]  # control: one left, it is found
    with pytest.raises(
        QuotaExceeded, match=r"no network left for another egress sandbox \(all 16384"
    ) as caught:
        pool.reserve(B)
    assert "destroy an egress sandbox first, or use a policy without network.mode = 'egress'" in str(
        caught.value
    )
    assert pool.held(B) is None


def test_adopted_sandboxes_hold_the_subnets_they_have() -> None:
    pool = SubnetPool()
    pool.claim(A, "10.213.0.0/30")
    pool.claim(A, "10.213.0.0/30")  # again: nothing changes
    assert pool.reserve(B) == "10.213.0.4/30"
    with pytest.raises(ValueError, match=r"sbx-0000000a holds 10.213.0.0/30"):
        pool.claim(C, "10.213.0.0/30")
    with pytest.raises(ValueError, match=r"sbx-0000000a holds 10.213.0.0/30"):
        pool.claim(A, "10.213.0.8/30")
    assert (pool.held(A), pool.held(C)) == ("10.213.0.0/30", None)  # refusals change nothing


# -- through the service ---------------------------------------------------------------

pytestmark = pytest.mark.anyio

EGRESS = """
[network]
mode = "egress"
domains = ["pypi.org"]
[sandboxes]
max_live = 10
"""


def service_on(backend: FakeBackend, tmp_path: Path, max_sandboxes: int = 10) -> SandboxService:
    policies = {
        "default": load_policy_text("", "default.toml"),
        "egress": load_policy_text(EGRESS, "egress.toml"),
    }
    (tmp_path / "state").mkdir(exist_ok=True)
    return SandboxService(
        backend,
        PolicySet(policies),
        records_dir=tmp_path / "state",
        cwd=str(tmp_path),
        max_sandboxes=max_sandboxes,
    )


@pytest.fixture
def backend(tmp_path: Path) -> FakeBackend:
    return FakeBackend(staging_dir=tmp_path)


def subnet_of(backend: FakeBackend, sandbox_id: str) -> str | None:
    egress = backend.sandboxes[sandbox_id].egress
    return egress.subnet if egress is not None else None


async def test_egress_sandboxes_are_created_with_the_subnet_reserved_for_them(
    backend: FakeBackend, tmp_path: Path
) -> None:
    service = service_on(backend, tmp_path)
    first = (await service.create(CreateRequest(policy="egress"))).sandbox_id
    second = (await service.create(CreateRequest(policy="egress"))).sandbox_id
    plain = (await service.create(CreateRequest())).sandbox_id
    assert subnet_of(backend, first) == backend.subnets.held(first) == "10.213.0.0/30"
    assert subnet_of(backend, second) == backend.subnets.held(second) == "10.213.0.4/30"
    assert backend.subnets.held(plain) is None  # no egress, no subnet


async def test_concurrent_creates_never_share_a_subnet(backend: FakeBackend, tmp_path: Path) -> None:
    service = service_on(backend, tmp_path)
    backend.create_gate = anyio.Event()  # every create waits in the backend, after reserving
    async with anyio.create_task_group() as tasks:
        for _ in range(5):
            tasks.start_soon(service.create, CreateRequest(policy="egress"))
        await anyio.wait_all_tasks_blocked()
        assert len(backend.sandboxes) == 5
        backend.create_gate.set()
    subnets = {subnet_of(backend, sandbox_id) for sandbox_id in backend.sandboxes}
    assert len(subnets) == 5


async def test_a_destroyed_sandbox_gives_its_subnet_back(backend: FakeBackend, tmp_path: Path) -> None:
    service = service_on(backend, tmp_path)
    first = (await service.create(CreateRequest(policy="egress"))).sandbox_id
    await service.destroy(first)
    assert backend.subnets.held(first) is None
    second = (await service.create(CreateRequest(policy="egress"))).sandbox_id
    assert subnet_of(backend, second) == "10.213.0.0/30"


async def test_a_failed_create_gives_its_subnet_back(backend: FakeBackend, tmp_path: Path) -> None:
    service = service_on(backend, tmp_path)
    backend.create_error = BackendError("starting the unit failed")
    with pytest.raises(BackendError):
        await service.create(CreateRequest(policy="egress"))
    (failed,) = backend.destroyed
    assert backend.subnets.held(failed) is None


async def test_when_no_subnet_is_left_the_create_is_refused_and_nothing_is_made(
    backend: FakeBackend, tmp_path: Path
) -> None:
    service = service_on(backend, tmp_path)
    for holder, subnet in others(EVERY):
        backend.subnets.claim(holder, subnet)
    with pytest.raises(QuotaExceeded, match=r"no network left for another egress sandbox"):
        await service.create(CreateRequest(policy="egress"))
    assert backend.sandboxes == {}
    assert service.list() == []
    assert (await service.create(CreateRequest())).sandbox_id  # control: no egress, no subnet needed


async def test_sandboxes_adopted_after_a_restart_keep_their_subnets(
    backend: FakeBackend, tmp_path: Path
) -> None:
    first = (await service_on(backend, tmp_path).create(CreateRequest(policy="egress"))).sandbox_id
    backend.subnets = SubnetPool()  # a new server: the network remembers nothing
    await service_on(backend, tmp_path).reconcile()
    assert backend.adopted == [first]
    assert backend.subnets.held(first) == "10.213.0.0/30"
    assert backend.subnets.reserve("sbx-0000000f") == "10.213.0.4/30"
