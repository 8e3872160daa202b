"""Who may use a sandbox, and what happens to it when its client goes (service on an in-memory backend).

A sandbox belongs to the identity that made it and, while that client's stdio connection
lasts, to that connection. Everybody else is told there is no such sandbox.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from nspawn_mcp.commands import CommandRequest
from nspawn_mcp.errors import InvalidRequest, NotFound, PolicyRefused, QuotaExceeded, SandboxGone
from nspawn_mcp.files import SandboxFiles
from nspawn_mcp.identity import Client, current_client
from nspawn_mcp.policy import CreateRequest, PolicySet
from nspawn_mcp.policy.loader import load_policy_text
from nspawn_mcp.service import RECONNECT_GRACE, SandboxService
from tests.unit.fake_backend import Clock, FakeBackend

pytestmark = pytest.mark.anyio

POLICIES = {
    "default": "",
    "kept": '[sandboxes]\non_disconnect = "keep"\n',
    "team": "[sandboxes]\nshared = true\n",
    "idle": "[sandboxes]\nidle_timeout_seconds = 60\n",
    "two": "[sandboxes]\nmax_live_per_client = 2\n",
}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def backend(tmp_path: Path) -> FakeBackend:
    (tmp_path / "staging").mkdir()
    return FakeBackend(staging_dir=tmp_path / "staging")


def make_service(backend: FakeBackend, tmp_path: Path, clock: Clock) -> SandboxService:
    policies = PolicySet({name: load_policy_text(text, f"{name}.toml") for name, text in POLICIES.items()})
    return SandboxService(backend, policies, records_dir=tmp_path / "records", cwd=str(tmp_path), clock=clock)


@pytest.fixture
def service(backend: FakeBackend, tmp_path: Path, clock: Clock) -> SandboxService:
    return make_service(backend, tmp_path, clock)


ALICE = Client("uid:1000", session="alice-window-1", workdir="/home/alice")
ALICE_2 = Client("uid:1000", session="alice-window-2", workdir="/home/alice")
BOB = Client("uid:1001", session="bob-window", workdir="/home/bob")
CI = Client("token:ci", workdir="/")


@contextmanager
def acting_as(client: Client) -> Iterator[None]:
    token = current_client.set(client)
    try:
        yield
    finally:
        current_client.reset(token)


async def create(service: SandboxService, client: Client, policy: str = "default") -> str:
    with acting_as(client):
        service.session_started(client)
        return (await service.create(CreateRequest(policy=policy))).sandbox_id


async def test_another_client_cannot_see_use_or_destroy_my_sandbox(service: SandboxService) -> None:
    mine = await create(service, ALICE)
    files = SandboxFiles(service)
    for other in (BOB, CI, ALICE_2):
        with acting_as(other):
            assert service.list() == []
            for attempt in (
                files.read(mine, "/etc/hostname"),
                files.read_whole(mine, "/etc/hostname"),
                files.write(mine, "/root/x", "x"),
                files.edit(mine, "/root/x", "x", "y"),
                files.list(mine, "/"),
                service.exec(mine, CommandRequest("true")),
                service.list_processes(mine),
                service.copy_from_sandbox(mine, "/etc/hostname", "out"),
                service.extend(mine, 60),
                service.destroy(mine),
            ):
                with pytest.raises(NotFound, match=rf"no sandbox {mine}"):
                    await attempt
    with acting_as(ALICE):  # the control: the owner still has it, untouched
        assert [s.sandbox_id for s in service.list()] == [mine]
        assert (await service.exec(mine, CommandRequest("true"))).exit_code == 0
        await service.destroy(mine)


async def test_a_shared_policy_lets_every_client_use_its_sandboxes(service: SandboxService) -> None:
    shared = await create(service, ALICE, "team")
    private = await create(service, ALICE)
    with acting_as(BOB):
        assert [s.sandbox_id for s in service.list()] == [shared]
        assert (await service.exec(shared, CommandRequest("true"))).exit_code == 0
        with pytest.raises(NotFound):
            await service.exec(private, CommandRequest("true"))


async def test_a_disconnect_destroys_that_connections_sandboxes_only(
    service: SandboxService, backend: FakeBackend
) -> None:
    gone = await create(service, ALICE)
    other_window = await create(service, ALICE_2)
    bobs = await create(service, BOB)
    await service.session_ended(ALICE)
    assert backend.destroyed == [gone]
    with acting_as(ALICE_2):
        assert [s.sandbox_id for s in service.list()] == [other_window]
    disconnected = r"its client disconnected .*sandboxes.on_disconnect = destroy"
    with acting_as(ALICE), pytest.raises(SandboxGone, match=disconnected):  # told on reconnecting
        await service.exec(gone, CommandRequest("true"))
    with acting_as(BOB):
        with pytest.raises(NotFound):  # someone else's gone sandbox is nobody's business
            await service.exec(gone, CommandRequest("true"))
        assert [s.sandbox_id for s in service.list()] == [bobs]


async def test_a_keep_policy_keeps_sandboxes_for_the_same_identity_after_a_disconnect(
    service: SandboxService, backend: FakeBackend
) -> None:
    kept = await create(service, ALICE, "kept")
    await service.session_ended(ALICE)
    assert backend.destroyed == []
    with acting_as(ALICE_2):
        assert [s.sandbox_id for s in service.list()] == [kept]
        assert (await service.exec(kept, CommandRequest("true"))).exit_code == 0
    with acting_as(BOB):
        assert service.list() == []


async def test_a_restarted_daemon_waits_for_connections_to_come_back(
    backend: FakeBackend, tmp_path: Path, clock: Clock
) -> None:
    before = make_service(backend, tmp_path, clock)
    returning = await create(before, ALICE)
    abandoned = await create(before, BOB)

    after = make_service(backend, tmp_path, clock)  # the daemon was killed and started again
    await after.reconcile()
    after.session_started(ALICE)  # the front end reconnected with its session
    clock.now += RECONNECT_GRACE + timedelta(seconds=1)
    await after.reap_once()
    assert backend.destroyed == [abandoned]
    with acting_as(ALICE):
        assert [s.sandbox_id for s in after.list()] == [returning]


async def test_quotas_count_per_identity_not_per_name_a_client_gives_itself(service: SandboxService) -> None:
    await create(service, ALICE, "two")
    await create(service, ALICE_2, "two")
    renamed = Client("uid:1000", session="alice-window-3", label="definitely-not-alice")
    with pytest.raises(QuotaExceeded, match=r"per client and you have 2 \(you are uid:1000\)"):
        await create(service, renamed, "two")
    await create(service, BOB, "two")  # the control: another identity has its own quota


async def test_a_token_limits_the_policies_its_client_may_use(service: SandboxService) -> None:
    limited = Client("token:ci", policies=frozenset({"kept"}), workdir="/")
    with pytest.raises(
        PolicyRefused, match=r"policy 'default' is not one this client may use; it may use: kept"
    ):
        await create(service, limited)
    await create(service, limited, "kept")


async def test_clients_without_a_host_directory_cannot_name_host_paths(service: SandboxService) -> None:
    unprivileged = Client("uid:1000", session="s")
    sandbox = await create(service, unprivileged)
    with acting_as(unprivileged), pytest.raises(InvalidRequest, match=r"host paths are not available"):
        await service.copy_to_sandbox(sandbox, "notes.txt", "/tmp/notes.txt")


async def test_gone_sandboxes_say_why(service: SandboxService, clock: Clock) -> None:
    expiring = await create(service, ALICE)
    with acting_as(ALICE):
        await service.extend(expiring, 600)
    clock.now += timedelta(seconds=3600 + 601)
    await service.reap_once()
    with acting_as(ALICE), pytest.raises(SandboxGone, match=r"it expired at 2026-01-01T01:10:00\+00:00"):
        await service.exec(expiring, CommandRequest("true"))


async def test_extensions_stop_at_the_policys_longest_lifetime(service: SandboxService) -> None:
    sandbox = await create(service, ALICE)  # default policy: 1 h now, 24 h at most
    with acting_as(ALICE):
        info = await service.extend(sandbox, 3600)
        assert info.expires_at == "2026-01-01T02:00:00.000+00:00"
        with pytest.raises(PolicyRefused, match=r"can be extended by at most 79200 s more"):
            await service.extend(sandbox, 79201)


async def test_idle_sandboxes_are_destroyed_and_use_keeps_them_alive(
    service: SandboxService, backend: FakeBackend, clock: Clock
) -> None:
    used = await create(service, ALICE, "idle")
    idle = await create(service, ALICE, "idle")
    clock.now += timedelta(seconds=50)
    with acting_as(ALICE):
        await service.exec(used, CommandRequest("true"))
    clock.now += timedelta(seconds=20)
    await service.reap_once()
    assert backend.destroyed == [idle]
    with acting_as(ALICE), pytest.raises(SandboxGone, match=r"sandboxes.idle_timeout_seconds"):
        await service.exec(idle, CommandRequest("true"))


async def test_a_sandbox_killed_at_its_memory_cap_says_so_after_it_is_cleaned_up(
    service: SandboxService, backend: FakeBackend
) -> None:
    sandbox = await create(service, ALICE)
    backend.oom_kill_counts[sandbox] = 1
    service.machine_removed(sandbox)  # the whole sandbox went down
    await service.reap_once()
    assert backend.destroyed == [sandbox]
    with acting_as(ALICE), pytest.raises(SandboxGone, match=r"OOM-killed: it hit its memory cap of 512 MiB"):
        await service.exec(sandbox, CommandRequest("true"))
