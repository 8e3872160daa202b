"""Snapshots, forks and restores on an in-memory backend: limits, ownership, what goes with a sandbox."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nspawn_mcp.backend.api import SnapshotRef
from nspawn_mcp.backend.freezer import Freezer
from nspawn_mcp.commands import CommandRequest
from nspawn_mcp.errors import InvalidRequest, NotFound, PolicyRefused, QuotaExceeded
from nspawn_mcp.identity import Client, current_client
from nspawn_mcp.images import Catalog
from nspawn_mcp.naming import (
    SANDBOX_ID,
    fork_image,
    kept_image,
    parse_snapshot_name,
    snapshot_image,
    snapshot_of_image,
    snapshot_of_kept_image,
    template_of_image,
)
from nspawn_mcp.policy import CreateRequest, PolicySet
from nspawn_mcp.policy.loader import load_policy_text
from nspawn_mcp.service import SandboxService
from tests.unit.fake_backend import FakeBackend

pytestmark = pytest.mark.anyio

KEEPING = "[snapshots]\nkeep_as_images = true\nmax_kept = 1\nmax_per_sandbox = 2\nmax_forks = 3\n"


@pytest.fixture
def backend(tmp_path: Path) -> FakeBackend:
    (tmp_path / "staging").mkdir()
    return FakeBackend(staging_dir=tmp_path / "staging")


def make_service(backend: FakeBackend, tmp_path: Path, **policy_text: str) -> SandboxService:
    policies = {"default": load_policy_text("", "default.toml")}
    policies |= {name: load_policy_text(text, f"{name}.toml") for name, text in policy_text.items()}
    return SandboxService(
        backend,
        PolicySet(policies),
        records_dir=tmp_path / "state",
        cwd=str(tmp_path),
        catalog=Catalog(tmp_path / "images"),
    )


@pytest.fixture
def service(backend: FakeBackend, tmp_path: Path) -> SandboxService:
    return make_service(backend, tmp_path, keeping=KEEPING, small="[sandboxes]\nmax_live = 3\n")


async def new(service: SandboxService, policy: str = "keeping") -> str:
    return (await service.create(CreateRequest(policy=policy))).sandbox_id


# -- names -----------------------------------------------------------------------------

names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,17}[a-z0-9])?", fullmatch=True)
ids = st.from_regex(SANDBOX_ID, fullmatch=True)


@given(ids, names)
def test_snapshot_names_round_trip_and_are_never_templates_or_sandboxes(sandbox: str, name: str) -> None:
    assert snapshot_of_image(snapshot_image(sandbox, name)) == (sandbox, name, False)
    assert snapshot_of_image(fork_image(sandbox, name)) == (sandbox, name, True)
    assert snapshot_of_kept_image(kept_image(sandbox, name)) == (sandbox, name)
    assert template_of_image(snapshot_image(sandbox, name)) is None
    assert len(kept_image(sandbox, name)) <= 32  # an image name (create_sandbox(image=...))


@pytest.mark.parametrize("bad", ["", "-a", "a-", "A", "a/b", "x" * 20, "a b", ".."])
def test_bad_snapshot_names_are_refused_with_what_names_look_like(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="1-19 lower-case letters"):
        parse_snapshot_name(bad)


# -- snapshots ------------------------------------------------------------------------------


async def test_a_snapshot_is_named_listed_and_capped_per_sandbox(
    service: SandboxService, backend: FakeBackend
) -> None:
    sandbox = await new(service)
    first = await service.snapshots.take(sandbox)
    second = await service.snapshots.take(sandbox, "mine")
    assert (first.name, second.name) == ("snap-1", "mine")
    assert [s.name for s in service.snapshots.listing(sandbox).snapshots] == ["mine", "snap-1"]
    with pytest.raises(PolicyRefused, match="allows 2 snapshots per sandbox") as refused:
        await service.snapshots.take(sandbox)
    assert refused.value.rule == "snapshots.max_per_sandbox"
    await service.snapshots.delete(sandbox, "snap-1")
    assert SnapshotRef(sandbox, "snap-1") not in backend.snapshot_images
    with pytest.raises(InvalidRequest, match="already has a snapshot 'mine'"):
        await service.snapshots.take(sandbox, "mine")


async def test_a_failed_snapshot_frees_its_name(service: SandboxService, backend: FakeBackend) -> None:
    sandbox = await new(service)
    backend.snapshot_error = QuotaExceeded("the pool is full")
    with pytest.raises(QuotaExceeded):
        await service.snapshots.take(sandbox, "x")
    backend.snapshot_error = None
    assert (await service.snapshots.take(sandbox, "x")).name == "x"


async def test_another_clients_sandbox_has_no_snapshots_for_it(service: SandboxService) -> None:
    sandbox = await new(service)
    await service.snapshots.take(sandbox, "x")
    token = current_client.set(Client(identity="uid:1000", session="other"))
    try:
        for attempt in (
            service.snapshots.take(sandbox),
            service.snapshots.fork(sandbox),
            service.snapshots.restore(sandbox, "x"),
            service.snapshots.delete(sandbox, "x"),
        ):
            with pytest.raises(NotFound, match="no sandbox"):
                await attempt
    finally:
        current_client.reset(token)


# -- restore ------------------------------------------------------------------------------------


async def test_a_restore_brings_back_the_files_and_reports_the_processes_gone(
    service: SandboxService, backend: FakeBackend
) -> None:
    sandbox = await new(service)
    backend.files[(sandbox, "/root/a")] = b"before"
    await service.snapshots.take(sandbox, "s")
    backend.files[(sandbox, "/root/a")] = b"after"
    backend.files[(sandbox, "/root/b")] = b"after"
    process = await service.start_background(sandbox, CommandRequest(command="sleep 100"))
    restored = await service.snapshots.restore(sandbox, "s")
    assert restored.gone_processes == [process.process_id]
    assert backend.files == {(sandbox, "/root/a"): b"before"}
    assert [s.sandbox_id for s in service.list()] == [sandbox]
    with pytest.raises(NotFound, match="has no snapshot 'gone'; its snapshots: s"):
        await service.snapshots.restore(sandbox, "gone")


# -- forks --------------------------------------------------------------------------------------


async def test_forks_are_the_callers_sandboxes_of_the_parents_plan_from_one_instant(
    service: SandboxService, backend: FakeBackend
) -> None:
    parent = await new(service)
    backend.files[(parent, "/root/a")] = b"x"
    forks = (await service.snapshots.fork(parent, count=3)).sandboxes
    assert len({f.sandbox_id for f in forks}) == 3
    for fork in forks:
        assert fork.limits == (await service.status(parent)).limits
        assert backend.files[(fork.sandbox_id, "/root/a")] == b"x"
        assert backend.sources[fork.sandbox_id] == backend.sources[forks[0].sandbox_id]  # one snapshot
    assert not [ref for ref in backend.snapshot_images if ref.kind == "fork"]  # removed after
    (single,) = (await service.snapshots.fork(parent)).sandboxes
    assert backend.sources[single.sandbox_id] == parent  # the running filesystem itself, frozen


async def test_forks_count_against_the_quotas_all_or_none(
    service: SandboxService, backend: FakeBackend
) -> None:
    parent = await new(service, "small")
    with pytest.raises(QuotaExceeded, match=r"sandboxes\.max_live"):
        await service.snapshots.fork(parent, count=3)
    assert [s.sandbox_id for s in service.list()] == [parent]
    with pytest.raises(PolicyRefused, match="at most 10 forks per call") as refused:
        await service.snapshots.fork(parent, count=11)
    assert refused.value.rule == "snapshots.max_forks"


async def test_a_fork_from_a_snapshot_has_its_files(service: SandboxService, backend: FakeBackend) -> None:
    parent = await new(service)
    backend.files[(parent, "/root/a")] = b"old"
    await service.snapshots.take(parent, "s")
    backend.files[(parent, "/root/a")] = b"new"
    (fork,) = (await service.snapshots.fork(parent, snapshot="s")).sandboxes
    assert backend.files[(fork.sandbox_id, "/root/a")] == b"old"


# -- what goes with a sandbox ----------------------------------------------------------------------


async def test_snapshots_go_with_their_sandbox_but_kept_ones_become_images_of_its_policy(
    service: SandboxService, backend: FakeBackend
) -> None:
    sandbox = await new(service)
    await service.snapshots.take(sandbox, "plain")
    kept = await service.snapshots.take(sandbox, "gold", keep=True)
    assert kept.kept_as_image == kept_image(sandbox, "gold")
    await service.destroy(sandbox)
    assert list(backend.snapshot_images) == [SnapshotRef(sandbox, "gold", "kept")]
    images = {image.name: image for image in (await service.list_images()).images}
    assert images[kept_image(sandbox, "gold")].policies == ["keeping"]
    started = await service.create(CreateRequest(image=kept_image(sandbox, "gold"), policy="keeping"))
    assert started.image == kept_image(sandbox, "gold")
    with pytest.raises(PolicyRefused, match="is not allowed by policy 'default'"):
        await service.create(CreateRequest(image=kept_image(sandbox, "gold")))


async def test_a_kept_snapshot_is_only_for_the_client_that_kept_it(service: SandboxService) -> None:
    sandbox = await new(service)
    await service.snapshots.take(sandbox, "gold", keep=True)
    image = kept_image(sandbox, "gold")
    token = current_client.set(Client(identity="uid:1000", session="other"))
    try:
        assert image not in {i.name for i in (await service.list_images()).images}
        with pytest.raises(PolicyRefused, match="is not allowed by policy 'keeping'"):
            await service.create(CreateRequest(image=image, policy="keeping"))
        other = await service.create(CreateRequest(policy="keeping"))  # the control: the policy works
        assert other.image == "default"
    finally:
        current_client.reset(token)
    assert image in {i.name for i in (await service.list_images()).images}


async def test_keeping_is_the_policys_decision_and_capped(service: SandboxService) -> None:
    plain = await new(service, "default")
    with pytest.raises(PolicyRefused) as refused:
        await service.snapshots.take(plain, keep=True)
    assert refused.value.rule == "snapshots.keep_as_images"
    sandbox = await new(service)
    await service.snapshots.take(sandbox, "a", keep=True)
    with pytest.raises(PolicyRefused) as refused:
        await service.snapshots.take(sandbox, "b", keep=True)
    assert refused.value.rule == "snapshots.max_kept"


async def test_a_restarted_daemon_counts_the_snapshots_of_adopted_sandboxes_and_removes_the_rest(
    service: SandboxService, backend: FakeBackend, tmp_path: Path
) -> None:
    alive = await new(service)
    await service.snapshots.take(alive, "s")
    backend.snapshot_images[SnapshotRef("sbx-0000dead", "s")] = {}
    backend.snapshot_images[SnapshotRef("sbx-0000dead", "k", "kept")] = {}
    backend.snapshot_images[SnapshotRef(alive, "ab12", "fork")] = {}  # a fork's, left by a kill
    restarted = make_service(backend, tmp_path, keeping=KEEPING)
    await restarted.reconcile()
    assert [s.name for s in restarted.snapshots.listing(alive).snapshots] == ["s"]
    assert set(backend.snapshot_images) == {
        SnapshotRef(alive, "s"),
        SnapshotRef("sbx-0000dead", "k", "kept"),
    }


# -- the freezer ------------------------------------------------------------------------------------


class CountingMechanism:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def freeze(self, sandbox_id: str) -> None:
        self.calls.append(f"freeze {sandbox_id}")

    async def thaw(self, sandbox_id: str) -> None:
        self.calls.append(f"thaw {sandbox_id}")

    async def remove(self, sandbox_id: str) -> None: ...

    def leftovers(self) -> set[str]:
        return set()


async def test_nested_freezes_freeze_once_and_thaw_when_the_last_is_done() -> None:
    mechanism = CountingMechanism()
    freezer = Freezer(mechanism)
    inside = anyio.Event()
    release = anyio.Event()

    async def hold() -> None:
        async with freezer.frozen("sbx-00000001"):
            inside.set()
            await release.wait()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(hold)
        await inside.wait()
        async with freezer.frozen("sbx-00000001"):
            assert mechanism.calls == ["freeze sbx-00000001"]
        assert mechanism.calls == ["freeze sbx-00000001"]
        release.set()
    assert mechanism.calls == ["freeze sbx-00000001", "thaw sbx-00000001"]
