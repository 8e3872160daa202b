"""A destroy answers once nothing of the sandbox runs; its remains go behind it, and none are left."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from nspawn_mcp import service as service_module
from nspawn_mcp.commands import CommandRequest
from nspawn_mcp.errors import SandboxGone
from nspawn_mcp.policy import CreateRequest, PolicySet
from nspawn_mcp.policy.loader import load_policy_text
from nspawn_mcp.service import SandboxService
from tests.unit.fake_backend import Clock, FakeBackend

pytestmark = pytest.mark.anyio


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    for name in ("work", "staging", "state"):
        (tmp_path / name).mkdir()
    return tmp_path


@pytest.fixture
def backend(workdir: Path) -> FakeBackend:
    return FakeBackend(staging_dir=workdir / "staging")


def make_service(backend: FakeBackend, workdir: Path) -> SandboxService:
    return SandboxService(
        backend,
        PolicySet({"default": load_policy_text("", "default.toml")}),
        records_dir=workdir / "state",
        cwd=str(workdir / "work"),
        clock=Clock(),
    )


@pytest.fixture
async def service(backend: FakeBackend, workdir: Path) -> AsyncIterator[SandboxService]:
    """A service whose clean-up runs in the background, as the daemon's does."""
    served = make_service(backend, workdir)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(served.run_cleanup)
        await anyio.wait_all_tasks_blocked()
        yield served
        tasks.cancel_scope.cancel()


def records(workdir: Path) -> list[str]:
    return sorted(path.name for path in (workdir / "state").iterdir())


async def test_destroy_answers_once_the_sandbox_is_killed_and_its_remains_go_behind_it(
    service: SandboxService, backend: FakeBackend, workdir: Path
) -> None:
    doomed = (await service.create(CreateRequest())).sandbox_id
    backend.destroy_gate = gate = anyio.Event()  # the removal of its remains waits
    with anyio.fail_after(5):
        await service.destroy(doomed)
    assert backend.killed == [doomed]
    assert doomed not in await backend.running()
    assert backend.destroyed == []  # the remains are still there...
    assert records(workdir) == [f"{doomed}.json"]  # ...and so is the record that says to remove them
    with pytest.raises(SandboxGone, match="its owner destroyed it"):  # its id is gone at once
        await service.exec(doomed, CommandRequest("true"))
    gate.set()
    with anyio.fail_after(5):
        await service.settled()
    assert backend.destroyed == [doomed]
    assert await backend.leftovers() == set()
    assert records(workdir) == []


async def test_a_daemon_that_dies_before_the_remains_went_leaves_them_to_the_next_start(
    backend: FakeBackend, workdir: Path
) -> None:
    first = make_service(backend, workdir)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(first.run_cleanup)
        await anyio.wait_all_tasks_blocked()
        doomed, kept = [(await first.create(CreateRequest())).sandbox_id for _ in range(2)]
        backend.destroy_gate = anyio.Event()  # never set: the daemon dies with the removal pending
        await first.destroy(doomed)
        tasks.cancel_scope.cancel()
    assert await backend.leftovers() == {doomed}

    second = make_service(backend, workdir)
    with anyio.fail_after(5):
        await second.reconcile()
    assert backend.destroyed == [doomed]
    assert await backend.leftovers() == set()
    assert records(workdir) == [f"{kept}.json"]
    assert [sandbox.sandbox_id for sandbox in second.list()] == [kept]
    with pytest.raises(SandboxGone, match="being destroyed when the nspawn-mcp daemon restarted"):
        await second.exec(doomed, CommandRequest("true"))


async def test_without_a_background_clean_up_destroy_removes_everything_itself(
    backend: FakeBackend, workdir: Path
) -> None:
    alone = make_service(backend, workdir)
    doomed = (await alone.create(CreateRequest())).sandbox_id
    await alone.destroy(doomed)
    assert (backend.killed, backend.destroyed) == ([doomed], [doomed])
    assert records(workdir) == []


async def test_an_id_is_not_given_out_again_while_anything_remembers_it(
    service: SandboxService, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = (await service.create(CreateRequest())).sandbox_id
    await service.destroy(first)
    drawn = iter([first, first, "sbx-0000beef"])
    monkeypatch.setattr(service_module, "new_sandbox_id", lambda: next(drawn))
    assert (await service.create(CreateRequest())).sandbox_id == "sbx-0000beef"
