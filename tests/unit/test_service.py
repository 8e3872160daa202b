"""The service's use cases on an in-memory backend: order of steps, quotas, cleanup, reaping."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.audit import AuditLog
from nspawn_mcp.backend.api import CommandOutcome, CommandSpec
from nspawn_mcp.commands import CommandRequest
from nspawn_mcp.errors import (
    BackendError,
    CopyRefused,
    InvalidRequest,
    NotFound,
    PolicyRefused,
    QuotaExceeded,
    SandboxGone,
)
from nspawn_mcp.identity import Client, current_client
from nspawn_mcp.policy import CreateRequest, PolicySet
from nspawn_mcp.policy.loader import load_policy_text
from nspawn_mcp.service import SandboxService
from tests.unit.fake_backend import Clock, FakeBackend, ok
from tests.waiting import wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    (tmp_path / "staging").mkdir()
    (tmp_path / "state").mkdir()
    return tmp_path


@pytest.fixture
def backend(workdir: Path) -> FakeBackend:
    return FakeBackend(staging_dir=workdir / "staging")


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_service(backend: FakeBackend, workdir: Path, clock: Clock, **policy_text: str) -> SandboxService:
    policies = {"default": load_policy_text("", "default.toml")}
    policies |= {name: load_policy_text(text, f"{name}.toml") for name, text in policy_text.items()}
    return SandboxService(
        backend,
        PolicySet(policies),
        records_dir=workdir / "state",
        cwd=str(workdir / "work"),
        max_sandboxes=5,
        clock=clock,
    )


@pytest.fixture
def service(backend: FakeBackend, workdir: Path, clock: Clock) -> SandboxService:
    return make_service(backend, workdir, clock, small="[sandboxes]\nmax_live = 2\n")


async def test_create_reports_id_limits_and_times(service: SandboxService, backend: FakeBackend) -> None:
    info = await service.create(CreateRequest(memory_mb=256))
    assert info.sandbox_id in backend.sandboxes
    assert info.limits.memory_mb == 256
    assert info.limits.max_processes == 256
    assert info.created_at == "2026-01-01T00:00:00.000+00:00"
    assert info.expires_at == "2026-01-01T01:00:00.000+00:00"
    assert [s.sandbox_id for s in service.list()] == [info.sandbox_id]


async def test_each_policy_caps_its_live_sandboxes(service: SandboxService, backend: FakeBackend) -> None:
    await service.create(CreateRequest(policy="small"))
    await service.create(CreateRequest(policy="small"))
    with pytest.raises(QuotaExceeded, match=r"sandboxes.max_live"):
        await service.create(CreateRequest(policy="small"))
    assert len(backend.sandboxes) == 2
    await service.create(CreateRequest(policy="default"))  # other policies are unaffected


async def test_the_server_caps_all_live_sandboxes(service: SandboxService) -> None:
    for _ in range(5):
        await service.create(CreateRequest())
    with pytest.raises(QuotaExceeded, match=r"maximum"):
        await service.create(CreateRequest())


async def test_refusals_happen_before_the_backend_is_touched(
    service: SandboxService, backend: FakeBackend
) -> None:
    with pytest.raises(PolicyRefused):
        await service.create(CreateRequest(memory_mb=1 << 20))
    with pytest.raises(PolicyRefused, match=r"unknown policy"):
        await service.create(CreateRequest(policy="nope"))
    backend.installed.clear()
    with pytest.raises(
        NotFound,
        match=r"not installed on this host; the operator can build it \(`nspawn-mcp image build default`\)",
    ):
        await service.create(CreateRequest())
    assert backend.sandboxes == {}
    assert backend.destroyed == []


async def test_a_failed_create_is_cleaned_up(service: SandboxService, backend: FakeBackend) -> None:
    backend.create_error = BackendError("starting the unit failed")
    with pytest.raises(BackendError):
        await service.create(CreateRequest())
    assert len(backend.destroyed) == 1
    assert backend.sandboxes == {}
    assert service.list() == []


async def test_a_cancelled_create_is_cleaned_up(service: SandboxService, backend: FakeBackend) -> None:
    backend.create_gate = anyio.Event()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(service.create, CreateRequest())
        await anyio.wait_all_tasks_blocked()
        tasks.cancel_scope.cancel()
    assert len(backend.destroyed) == 1
    assert backend.sandboxes == {}


async def test_exec_runs_shell_strings_and_argv_lists(service: SandboxService, backend: FakeBackend) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await service.exec(sandbox, CommandRequest("echo hi | wc -c"))
    await service.exec(
        sandbox, CommandRequest(["python3", "-c", "print(1)"], cwd="/tmp", env={"A": "1"}, stdin="data")
    )
    (_, shell), (_, argv) = backend.commands
    assert shell.argv == ("/bin/sh", "-c", "echo hi | wc -c")
    assert shell.cwd is None  # the user's home
    assert shell.user == "root"
    assert shell.timeout_seconds == 60
    assert argv.argv == ("python3", "-c", "print(1)")
    assert (argv.cwd, dict(argv.env), argv.stdin) == ("/tmp", {"A": "1"}, b"data")


async def test_exec_output_is_text_with_invalid_bytes_replaced(
    service: SandboxService, backend: FakeBackend
) -> None:
    backend.on_exec = lambda spec: ok(stdout=b"caf\xc3\xa9 \xff", stderr=b"oops", exit_code=3)
    result = await service.exec((await service.create(CreateRequest())).sandbox_id, CommandRequest("x"))
    assert (result.exit_code, result.stdout, result.stderr) == (3, "café \ufffd", "oops")
    assert not result.truncated


async def test_truncation_of_either_stream_is_reported(service: SandboxService, backend: FakeBackend) -> None:
    def truncated(spec: CommandSpec) -> CommandOutcome:
        return CommandOutcome(None, 9, b"", b"x", False, True, True, 5.0)

    backend.on_exec = truncated
    result = await service.exec((await service.create(CreateRequest())).sandbox_id, CommandRequest("x"))
    assert (result.truncated, result.timed_out, result.exit_code, result.signal) == (True, True, None, 9)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"command": ""}, InvalidRequest, "command is empty"),
        ({"command": []}, InvalidRequest, "command is empty"),
        ({"command": ["a\x00b"]}, InvalidRequest, "NUL"),
        ({"command": ["x"] * 5000}, InvalidRequest, "at most 4096"),
        ({"command": "x" * (2 << 20)}, InvalidRequest, "longer than"),
        ({"command": "x", "env": {"BAD-NAME": "1"}}, InvalidRequest, "variable name"),
        ({"command": "x", "cwd": "relative"}, InvalidRequest, "must be absolute"),
        ({"command": "x", "timeout_seconds": 10_000}, PolicyRefused, "exec.max_timeout_seconds"),
        ({"command": "x", "timeout_seconds": -1}, InvalidRequest, "at least"),
    ],
)
async def test_bad_exec_requests_are_refused_before_running(
    service: SandboxService,
    backend: FakeBackend,
    kwargs: dict[str, object],
    error: type[Exception],
    message: str,
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    command = kwargs.pop("command")
    with pytest.raises(error, match=message):
        await service.exec(sandbox, CommandRequest(command, **kwargs))  # type: ignore[arg-type]
    assert backend.commands == []


async def test_unknown_and_malformed_ids(service: SandboxService) -> None:
    with pytest.raises(NotFound, match=r"no sandbox sbx-00000000"):
        await service.exec("sbx-00000000", CommandRequest("true"))
    for bad in (".host", "--bind=/:/x", "sbx-0000000g", "x" * 10_000):
        with pytest.raises(InvalidRequest, match=r"ids look like"):
            await service.destroy(bad)


async def test_destroy_removes_and_a_second_destroy_says_it_is_gone(
    service: SandboxService, backend: FakeBackend
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await service.destroy(sandbox)
    assert backend.destroyed == [sandbox]
    assert service.list() == []
    with pytest.raises(SandboxGone, match=r"is gone: its owner destroyed it at 2026-01-01T00:00:00"):
        await service.destroy(sandbox)


async def test_expired_sandboxes_are_reaped(
    service: SandboxService, backend: FakeBackend, clock: Clock
) -> None:
    short = (await service.create(CreateRequest(ttl_seconds=60))).sandbox_id
    long = (await service.create(CreateRequest(ttl_seconds=600))).sandbox_id
    clock.now += timedelta(seconds=61)
    await service.reap_once()
    assert backend.destroyed == [short]
    assert [s.sandbox_id for s in service.list()] == [long]


async def test_a_sandbox_that_dies_is_reported_then_cleaned_up(
    service: SandboxService, backend: FakeBackend
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    service.machine_removed(sandbox)
    with pytest.raises(SandboxGone, match=r"has stopped"):
        await service.exec(sandbox, CommandRequest("true"))
    await service.reap_once()
    assert backend.destroyed == [sandbox]


async def test_restart_adopts_recorded_sandboxes_and_removes_the_rest(
    backend: FakeBackend, workdir: Path, clock: Clock
) -> None:
    first = make_service(backend, workdir, clock)
    kept = (await first.create(CreateRequest(memory_mb=300))).sandbox_id
    backend.sandboxes["sbx-feedf00d"] = backend.sandboxes[kept]  # running, but no record: half-made
    backend.leftover_ids = {"sbx-0badcafe"}  # a snapshot without a running sandbox
    second = make_service(backend, workdir, clock)
    await second.reconcile()
    assert [(s.sandbox_id, s.limits.memory_mb) for s in second.list()] == [(kept, 300)]
    assert sorted(backend.destroyed) == ["sbx-0badcafe", "sbx-feedf00d"]


async def test_restart_removes_a_sandbox_the_dead_daemon_was_still_making(
    backend: FakeBackend, workdir: Path, clock: Clock
) -> None:
    first = make_service(backend, workdir, clock)
    made = (await first.create(CreateRequest())).sandbox_id
    backend.create_gate = anyio.Event()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(first.create, CreateRequest())
        # running, with a record, but its binds and network are not made yet: the daemon dies here
        await wait_until(lambda: len(backend.sandboxes) == 2, what="the second sandbox running")
        (half_made,) = set(backend.sandboxes) - {made}
        second = make_service(backend, workdir, clock)
        await second.reconcile()
        assert [s.sandbox_id for s in second.list()] == [made]
        assert (backend.adopted, backend.destroyed) == ([made], [half_made])
        assert sorted(p.name for p in (workdir / "state").iterdir()) == [f"{made}.json"]
        tasks.cancel_scope.cancel()


async def test_restart_finishes_destroying_a_sandbox_the_dead_daemon_was_destroying(
    backend: FakeBackend, workdir: Path, clock: Clock
) -> None:
    first = make_service(backend, workdir, clock)
    doomed, kept = [(await first.create(CreateRequest())).sandbox_id for _ in range(2)]
    backend.destroy_gate = gate = anyio.Event()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(first.destroy, doomed)
        try:
            # still running, part of it (its network, say) gone already: the daemon dies here
            await wait_until(lambda: backend.destroy_gate is None, what="the destroy under way")
            second = make_service(backend, workdir, clock)
            await second.reconcile()
            assert [s.sandbox_id for s in second.list()] == [kept]
            assert (backend.adopted, backend.destroyed) == ([kept], [doomed])
            assert sorted(p.name for p in (workdir / "state").iterdir()) == [f"{kept}.json"]
            with pytest.raises(SandboxGone, match=r"being destroyed when the nspawn-mcp daemon restarted"):
                await second.exec(doomed, CommandRequest("true"))
        finally:
            gate.set()  # the first daemon's destroy is shielded: it must be let finish


async def test_restart_removes_a_record_the_dead_daemon_was_still_writing(
    backend: FakeBackend, workdir: Path, clock: Clock
) -> None:
    first = make_service(backend, workdir, clock)
    made = (await first.create(CreateRequest())).sandbox_id
    (workdir / "state" / ".sbx-0badcafe.json.tmp").write_text('{"owner": "uid:0", "pl')
    second = make_service(backend, workdir, clock)
    await second.reconcile()
    assert sorted(p.name for p in (workdir / "state").iterdir()) == [f"{made}.json"]


async def test_a_sandbox_that_cannot_be_adopted_is_removed_and_the_others_are_served(
    backend: FakeBackend, workdir: Path, clock: Clock
) -> None:
    first = make_service(backend, workdir, clock)
    lost, kept = [(await first.create(CreateRequest())).sandbox_id for _ in range(2)]
    backend.adopt_errors[lost] = OSError(99, "Cannot assign requested address")
    second = make_service(backend, workdir, clock)
    await second.reconcile()  # does not raise: the daemon starts and serves the rest
    assert [s.sandbox_id for s in second.list()] == [kept]
    assert backend.destroyed == [lost]
    assert sorted(p.name for p in (workdir / "state").iterdir()) == [f"{kept}.json"]
    with pytest.raises(SandboxGone, match=r"could not take it over"):
        await second.exec(lost, CommandRequest("true"))


async def test_copies_go_through_staging_with_checksums(
    service: SandboxService, backend: FakeBackend, workdir: Path
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    payload = bytes(range(256)) * 1000
    (workdir / "work" / "in.bin").write_bytes(payload)
    result = await service.copy_to_sandbox(sandbox, "in.bin", "/root/in.bin")
    assert (result.bytes, result.sha256) == (len(payload), hashlib.sha256(payload).hexdigest())
    assert backend.files[(sandbox, "/root/in.bin")] == payload
    back = await service.copy_from_sandbox(sandbox, "/root/in.bin", "out.bin")
    assert back.sha256 == result.sha256
    assert (workdir / "work" / "out.bin").read_bytes() == payload
    assert list((workdir / "staging").iterdir()) == []


async def test_symlinks_coming_out_of_a_sandbox_are_refused(
    service: SandboxService, backend: FakeBackend, workdir: Path
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    backend.files[(sandbox, "/root/link")] = b"symlink:/etc/shadow"
    with pytest.raises(CopyRefused, match=r"symbolic link"):
        await service.copy_from_sandbox(sandbox, "/root/link", "out")
    assert not (workdir / "work" / "out").exists()
    assert list((workdir / "staging").iterdir()) == []


async def test_commands_can_run_as_another_user(service: SandboxService, backend: FakeBackend) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await service.exec(sandbox, CommandRequest("id", user="sandbox"))
    assert backend.commands[0][1].user == "sandbox"
    with pytest.raises(InvalidRequest, match=r"invalid user"):
        await service.exec(sandbox, CommandRequest("id", user="--root"))


async def test_exact_bytes_are_available_as_base64(service: SandboxService, backend: FakeBackend) -> None:
    backend.on_exec = lambda spec: ok(stdout=b"\xff\x00")
    sandbox = (await service.create(CreateRequest())).sandbox_id
    result = await service.exec(sandbox, CommandRequest("x"), include_base64=True)
    assert (result.stdout, result.stdout_base64, result.stderr_base64) == ("\ufffd\x00", "/wA=", "")


async def test_an_oom_kill_is_reported(service: SandboxService, backend: FakeBackend) -> None:
    sandbox = (await service.create(CreateRequest(memory_mb=64))).sandbox_id
    backend.on_exec = lambda spec: CommandOutcome(None, 9, b"", b"", False, False, False, 5.0)
    backend.oom_kill_counts[sandbox] = 1
    assert (await service.exec(sandbox, CommandRequest("hog"))).oom_killed is True
    assert (
        await service.exec(sandbox, CommandRequest("kill -9 $$"))
    ).oom_killed is False  # no new OOM kill since
    backend.sandboxes.pop(sandbox)
    backend.oom_kill_counts[sandbox] = 2
    with pytest.raises(SandboxGone, match=r"OOM-killed: it hit its memory cap of 64 MiB"):
        await service.exec(sandbox, CommandRequest("hog"))


async def test_background_processes_are_capped_and_addressed_by_id(
    backend: FakeBackend, workdir: Path, clock: Clock
) -> None:
    service = make_service(backend, workdir, clock, few="[exec]\nmax_background_processes = 2\n")
    sandbox = (await service.create(CreateRequest(policy="few"))).sandbox_id
    started = await service.start_background(sandbox, CommandRequest("sleep 100"))
    assert (started.process_id, started.exit_code) == ("p1", None)
    await service.start_background(sandbox, CommandRequest(["sleep", "100"], timeout_seconds=30))
    assert [timeout for _, timeout in backend.processes.values()] == [None, 30]
    with pytest.raises(QuotaExceeded, match=r"exec.max_background_processes"):
        await service.start_background(sandbox, CommandRequest("one more"))
    first = await service.read_process_output(sandbox, "p1")
    assert (first.stdout, first.next_cursor) == ("0123456789", "10:0")
    rest = await service.read_process_output(sandbox, "p1", since=first.next_cursor)
    assert rest.stdout == ""
    assert [p.process_id for p in (await service.list_processes(sandbox)).processes] == ["p1", "p2"]
    assert (await service.write_process_stdin(sandbox, "p1", "input", close=True)).written == 5
    assert (await service.kill_process(sandbox, "p2", "kill")).process_id == "p2"


async def test_bad_process_requests_are_refused(service: SandboxService) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await service.start_background(sandbox, CommandRequest("sleep 100"))
    with pytest.raises(InvalidRequest, match=r"invalid process_id"):
        await service.read_process_output(sandbox, "1; rm -rf /")
    with pytest.raises(InvalidRequest, match=r"invalid cursor"):
        await service.read_process_output(sandbox, "p1", since="garbage")
    for signal in ("SEGV", 0, 65):
        with pytest.raises(InvalidRequest, match=r"invalid signal"):
            await service.kill_process(sandbox, "p1", signal)


async def test_every_decision_is_audited_with_client_and_rule(
    backend: FakeBackend, workdir: Path, clock: Clock
) -> None:
    log_path = workdir / "audit.jsonl"
    audit = AuditLog(log_path)
    service = SandboxService(
        backend,
        PolicySet({"default": load_policy_text("", "default.toml")}),
        records_dir=workdir / "state",
        cwd=str(workdir / "work"),
        clock=clock,
        audit=audit,
    )
    token = current_client.set(Client("uid:0", label="claude-code", workdir=str(workdir / "work")))
    try:
        sandbox = (await service.create(CreateRequest())).sandbox_id
        with pytest.raises(PolicyRefused):
            await service.create(CreateRequest(memory_mb=1 << 20))
        await service.exec(sandbox, CommandRequest(["echo", "hi"]))
        with pytest.raises(PolicyRefused):
            await service.copy_to_sandbox(sandbox, "/etc/shadow", "/x")
        await service.destroy(sandbox)
        backend.create_gate = anyio.Event()
        async with anyio.create_task_group() as tasks:  # a create cancelled half-way is a decision too
            tasks.start_soon(service.create, CreateRequest())
            await anyio.wait_all_tasks_blocked()
            tasks.cancel_scope.cancel()
    finally:
        current_client.reset(token)
        audit.close()
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(e["action"], e["allowed"], e.get("rule")) for e in entries] == [
        ("create_sandbox", True, None),
        ("create_sandbox", False, "limits.max.memory"),
        ("exec", True, None),
        ("copy_to_sandbox", False, "files.allowed_host_dirs"),
        ("destroy_sandbox", True, None),
        ("create_sandbox", False, None),
    ]
    assert entries[-1]["reason"] == "cancelled"
    assert {(e["client"], e["client_label"]) for e in entries} == {("uid:0", "claude-code")}
    assert entries[0]["sandbox_id"] == sandbox
    assert entries[2]["command"] == "echo hi"
    assert entries[2]["exit_code"] == 0


async def test_a_policy_can_cap_live_sandboxes_per_client(
    backend: FakeBackend, workdir: Path, clock: Clock
) -> None:
    service = make_service(backend, workdir, clock, shared="[sandboxes]\nmax_live_per_client = 1\n")
    for client in ("alice", "bob"):
        token = current_client.set(Client(client))
        try:
            await service.create(CreateRequest(policy="shared"))
            with pytest.raises(QuotaExceeded, match=r"sandboxes.max_live_per_client"):
                await service.create(CreateRequest(policy="shared"))
        finally:
            current_client.reset(token)


async def test_concurrent_creates_cannot_share_the_last_slot(
    backend: FakeBackend, workdir: Path, clock: Clock
) -> None:
    service = make_service(backend, workdir, clock, one="[sandboxes]\nmax_live = 1\n")
    backend.create_gate = anyio.Event()
    outcomes: list[str] = []

    async def create() -> None:
        try:
            await service.create(CreateRequest(policy="one"))
            outcomes.append("created")
        except QuotaExceeded:
            outcomes.append("refused")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(create)
        tasks.start_soon(create)
        await anyio.wait_all_tasks_blocked()
        backend.create_gate.set()
    assert sorted(outcomes) == ["created", "refused"]
    assert len(backend.sandboxes) == 1
