"""The operator's view: the table ``nspawn-mcp list`` prints, the journalctl and nsenter command
lines of ``logs`` and ``box shell``, the operator protocol's codec and bounds, who the daemon
admits to it, the service's answers, and the command line."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nspawn_mcp.backend.api import MeasuredUsage
from nspawn_mcp.cli import _one_line, build_parser
from nspawn_mcp.commands import CommandRequest
from nspawn_mcp.daemon.handshake import Hello, HelloError, decode_hello, encode
from nspawn_mcp.daemon.operator import (
    MAX_REQUEST,
    DestroyRequest,
    ListRequest,
    OperatorError,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from nspawn_mcp.daemon.sessions import admit
from nspawn_mcp.errors import NotFound, PolicyRefused, QuotaExceeded, SandboxGone
from nspawn_mcp.identity import OPERATOR, Client, current_client
from nspawn_mcp.operator import (
    box_shell_command,
    format_bytes,
    format_cpu,
    format_duration,
    format_json,
    format_table,
    journal_command,
)
from nspawn_mcp.policy import CreateRequest, PolicySet
from nspawn_mcp.policy.loader import PolicyError, shipped_policy_dir
from nspawn_mcp.records import LiveSandbox
from nspawn_mcp.service import SandboxService
from tests.unit.fake_backend import Clock, FakeBackend
from tests.unit.test_service import make_service

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SESSION = "0" * 32


def live(sandbox_id: str = "sbx-1a2b3c4d", **changes: object) -> LiveSandbox:
    fields: dict[str, object] = {
        "sandbox_id": sandbox_id,
        "owner": "uid:1000",
        "policy": "default",
        "image": "default",
        "created_at": NOW - timedelta(minutes=3, seconds=7),
        "expires_at": NOW + timedelta(minutes=56, seconds=53),
        "memory_bytes": 3_355_443,
        "cpu_nsec": 420_000_000,
        "tasks": 2,
        "connected": True,
    }
    return LiveSandbox(**(fields | changes))  # type: ignore[arg-type]


# -- the table -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (45.9, "45s"), (187, "3m07s"), (7500, "2h05m"), (273600, "3d04h"), (-1, "expired")],
)
def test_durations_show_their_two_largest_units(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


@pytest.mark.parametrize(
    ("count", "shown"),
    [(None, "-"), (512, "512B"), (3_355_443, "3.2MiB"), (1536 << 20, "1.5GiB"), (5 << 40, "5120.0GiB")],
)
def test_sizes_are_in_iec_units(count: int | None, shown: str) -> None:
    assert format_bytes(count) == shown


def test_cpu_time_is_seconds_then_minutes() -> None:
    assert (format_cpu(None), format_cpu(420_000_000), format_cpu(65 * 10**9)) == ("-", "0.42s", "1m05s")


def test_the_table_has_a_header_and_one_aligned_row_per_sandbox() -> None:
    table = format_table(
        [live(), live("sbx-00000002", owner="token:ci", connected=False, memory_bytes=None, tasks=None)], NOW
    )
    assert table.splitlines() == [
        "ID            OWNER                POLICY   IMAGE    AGE    EXPIRES IN  MEMORY  CPU    TASKS",
        "sbx-1a2b3c4d  uid:1000             default  default  3m07s  56m53s      3.2MiB  0.42s  2",
        "sbx-00000002  token:ci (detached)  default  default  3m07s  56m53s      -       0.42s  -",
    ]


def test_the_warm_pools_sandboxes_are_nobodys() -> None:
    table = format_table([live(owner="", connected=False, pooled=True)], NOW)
    assert table.splitlines()[1].split()[:2] == ["sbx-1a2b3c4d", "(warm"]


def test_no_sandboxes_is_a_sentence() -> None:
    assert format_table([], NOW) == "no live sandboxes"


def test_json_output_has_every_field_and_iso_times() -> None:
    [row] = json.loads(format_json([live()]))
    assert row["sandbox_id"] == "sbx-1a2b3c4d"
    assert row["created_at"] == "2026-01-01T11:56:53+00:00"
    assert set(row) == {
        "sandbox_id", "owner", "policy", "image", "created_at", "expires_at",
        "memory_bytes", "cpu_nsec", "tasks", "connected", "pooled",
    }  # fmt: skip


# -- logs and box shell -------------------------------------------------------------------


def test_logs_match_the_daemons_entries_the_service_and_systemds_messages_about_the_units() -> None:
    assert journal_command("sbx-1a2b3c4d", None) == [
        "journalctl",
        "--no-pager",
        "--output=short-iso",
        "NSPAWN_MCP_SANDBOX=sbx-1a2b3c4d",
        "+",
        "_SYSTEMD_UNIT=nspawn-mcp-sbx-1a2b3c4d.service",
        "+",
        "UNIT=nspawn-mcp-sbx-1a2b3c4d.service",
        "+",
        "UNIT=nspawnmcp-1a2b3c4d.slice",
    ]


def test_logs_in_the_box_read_its_journal_directory_and_may_follow() -> None:
    command = journal_command("sbx-1a2b3c4d", Path("/proc/42/root/run/log/journal"), follow=True, lines=20)
    assert command[3:6] == ["--directory=/proc/42/root/run/log/journal", "--follow", "--lines=20"]


def test_box_shell_enters_the_boxs_mount_and_pid_namespaces() -> None:
    assert box_shell_command(42, ["machinectl", "list"]) == [
        "nsenter", "--target=42", "--mount", "--pid", "--", "machinectl", "list",
    ]  # fmt: skip


# -- the protocol ------------------------------------------------------------------------------


def test_requests_round_trip() -> None:
    for request in (ListRequest(), DestroyRequest("sbx-1a2b3c4d")):
        assert decode_request(encode_request(request)) == request


def test_a_listing_round_trips() -> None:
    rows = [live(), live("sbx-00000002", memory_bytes=None, cpu_nsec=None, tasks=None, connected=False)]
    assert decode_reply(encode_reply(rows)) == rows
    assert decode_reply(encode_reply(None)) is None


def test_a_refusal_is_raised_with_the_daemons_reason() -> None:
    with pytest.raises(OperatorError, match="no live sandbox"):
        decode_reply(encode_reply("no live sandbox sbx-1a2b3c4d"))


@pytest.mark.parametrize(
    "line",
    [
        b'{"op": "destroy", "sandbox_id": "../../etc"}',
        b'{"op": "destroy", "sandbox_id": "sbx-1a2b3c4d", "force": true}',
        b'{"op": "destroy"}',
        b'{"op": "list", "owner": "uid:0"}',
        b'{"op": "shell"}',
        b"[]",
        b"not json",
        b'{"op": "list", "pad": "' + b"x" * MAX_REQUEST + b'"}',
    ],
)
def test_requests_outside_the_protocol_are_refused(line: bytes) -> None:
    with pytest.raises(OperatorError):
        decode_request(line)


@pytest.mark.parametrize(
    "row",
    [
        {"sandbox_id": "sbx-1a2b3c4d"},
        {"memory_bytes": -1},
        {"tasks": True},
        {"created_at": "yesterday"},
        {"connected": "yes"},
    ],
)
def test_a_reply_outside_the_protocol_is_refused(row: dict[str, object]) -> None:
    good = json.loads(encode_reply([live()]))["sandboxes"][0]
    body = {"ok": True, "sandboxes": [row if list(row) == ["sandbox_id"] else good | row]}
    with pytest.raises(OperatorError):
        decode_reply(json.dumps(body).encode())


# -- who the daemon admits -----------------------------------------------------------------


def test_the_operator_flag_round_trips_and_must_be_a_boolean() -> None:
    assert decode_hello(encode(Hello(session=SESSION, operator=True))).operator is True
    assert decode_hello(encode(Hello(session=SESSION))).operator is False
    with pytest.raises(HelloError, match="operator"):
        decode_hello(json.dumps({"nspawn_mcp": 1, "session": SESSION, "operator": "yes"}).encode())


def test_root_asking_for_the_operators_requests_is_the_operator() -> None:
    assert admit(0, Hello(session=SESSION, operator=True), ()) is OPERATOR


def test_a_non_root_peer_asking_for_the_operators_requests_is_refused() -> None:
    refusal = admit(1000, Hello(session=SESSION, operator=True), ())
    assert isinstance(refusal, str)
    assert "root" in refusal
    assert "uid 1000" in refusal


def test_the_same_peer_without_the_flag_is_an_ordinary_client_of_its_own_uid() -> None:
    client = admit(1000, Hello(session=SESSION, workdir="/home/me"), ())
    assert not isinstance(client, str)
    assert (client.identity, client.session, client.workdir) == ("uid:1000", SESSION, None)


# -- the command line -----------------------------------------------------------------------


def test_the_operator_commands_parse() -> None:
    parser = build_parser()
    assert parser.parse_args(["list", "--json"]).json is True
    assert parser.parse_args(["destroy", "sbx-1a2b3c4d"]).sandbox_id == "sbx-1a2b3c4d"
    logs = parser.parse_args(["logs", "sbx-1a2b3c4d", "-f", "-n", "5"])
    assert (logs.sandbox_id, logs.follow, logs.lines) == ("sbx-1a2b3c4d", True, 5)
    shell = parser.parse_args(["box", "shell", "machinectl", "list", "--all"])
    assert (shell.action, shell.shell_command) == ("shell", ["machinectl", "list", "--all"])


def test_help_texts_carry_no_rest_markup(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    texts = [parser.format_help()]
    for name in (
        "serve",
        "daemon",
        "setup",
        "image",
        "doctor",
        "box",
        "policy",
        "token",
        "list",
        "destroy",
        "logs",
    ):
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        texts.append(capsys.readouterr().out)
    for text in texts:
        for markup in ("``", ":func:", ":mod:", ":class:", ":data:", ":meth:"):
            assert markup not in text


def test_a_multi_line_error_is_said_in_one_line() -> None:
    message = "/etc/p/bad.toml: invalid policy\n  limits.bogus: Extra inputs are not permitted\n"
    assert (
        _one_line(message) == "/etc/p/bad.toml: invalid policy; limits.bogus: Extra inputs are not permitted"
    )


def test_a_policy_directory_that_is_not_there_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        PolicySet.load([tmp_path / "typo", shipped_policy_dir()])


# -- the service's answers -----------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> tuple[SandboxService, FakeBackend, Clock]:
    for name in ("work", "staging", "state"):
        (tmp_path / name).mkdir()
    backend = FakeBackend(staging_dir=tmp_path / "staging")
    clock = Clock()
    return make_service(backend, tmp_path, clock, small="[sandboxes]\nmax_live = 1\n"), backend, clock


@pytest.mark.anyio
async def test_the_operator_sees_every_clients_sandboxes_with_their_usage(
    service: tuple[SandboxService, FakeBackend, Clock],
) -> None:
    sandboxes, backend, _ = service
    alice, bob = Client("uid:1000", session="a" * 32), Client("uid:1001", session="b" * 32)
    made = []
    for client in (alice, bob):
        token = current_client.set(client)
        sandboxes.session_started(client)
        made.append((await sandboxes.create(CreateRequest())).sandbox_id)
        current_client.reset(token)
    backend.measured[made[0]] = MeasuredUsage(memory_bytes=4096, cpu_nsec=10, tasks=2)
    rows = await sandboxes.live_sandboxes()
    assert [(r.sandbox_id, r.owner, r.connected) for r in rows] == [
        (made[0], "uid:1000", True),
        (made[1], "uid:1001", True),
    ]
    assert (rows[0].memory_bytes, rows[0].cpu_nsec, rows[0].tasks) == (4096, 10, 2)
    assert (rows[1].memory_bytes, rows[1].tasks) == (None, None)


@pytest.mark.anyio
async def test_the_operator_destroys_any_clients_sandbox_and_its_owner_is_told(
    service: tuple[SandboxService, FakeBackend, Clock],
) -> None:
    sandboxes, backend, _ = service
    alice = Client("uid:1000", session="a" * 32)
    token = current_client.set(alice)
    sandbox_id = (await sandboxes.create(CreateRequest())).sandbox_id
    current_client.reset(token)

    operator = current_client.set(OPERATOR)
    await sandboxes.operator_destroy(sandbox_id)
    with pytest.raises(NotFound, match="nspawn-mcp list"):
        await sandboxes.operator_destroy(sandbox_id)
    current_client.reset(operator)

    assert backend.destroyed == [sandbox_id]
    token = current_client.set(alice)
    with pytest.raises(SandboxGone, match="operator destroyed it"):
        await sandboxes.exec(sandbox_id, CommandRequest(command=["true"]))
    current_client.reset(token)


@pytest.mark.anyio
async def test_create_destroy_and_refusals_are_logged_with_their_event(
    service: tuple[SandboxService, FakeBackend, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    sandboxes, _, clock = service
    caplog.set_level(logging.INFO, logger="nspawn_mcp.service")
    first = (await sandboxes.create(CreateRequest(policy="small"))).sandbox_id
    with pytest.raises(QuotaExceeded):
        await sandboxes.create(CreateRequest(policy="small"))
    with pytest.raises(PolicyRefused):
        await sandboxes.create(CreateRequest(policy="nonexistent"))
    await sandboxes.destroy(first)
    second = (await sandboxes.create(CreateRequest())).sandbox_id
    clock.now += timedelta(hours=2)
    await sandboxes.reap_once()
    events = [
        (getattr(r, "event", None), getattr(r, "sandbox", None), getattr(r, "rule", None))
        for r in caplog.records
        if getattr(r, "event", None)
    ]
    assert events == [
        ("created", first, None),
        ("refused", None, "quota"),
        ("refused", None, "policy name"),
        ("destroyed", first, None),
        ("created", second, None),
        ("expired", second, None),
    ]
