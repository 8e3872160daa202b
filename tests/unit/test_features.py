"""Resources, prompts, completions and logging, through the real MCP client against build_server.

Two clients share one service (as they share the daemon): what one reads, completes and hears
is its own, never the other's.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client import Client
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    EmptyResult,
    LoggingMessageNotificationParams,
    PromptReference,
    Request,
    ResourceTemplateReference,
)

from nspawn_mcp.app import build_server
from nspawn_mcp.backend.api import MeasuredUsage
from nspawn_mcp.identity import Client as Caller
from nspawn_mcp.identity import current_client
from nspawn_mcp.policy import PolicySet
from nspawn_mcp.policy.loader import shipped_policy_dir
from nspawn_mcp.service import SandboxService
from nspawn_mcp.throttle import Throttle
from tests.unit.fake_backend import Clock, FakeBackend

pytestmark = pytest.mark.anyio

ALICE = Caller("uid:1000", session="alice-window", workdir="/home/alice")
BOB = Caller("uid:1001", session="bob-window", workdir="/home/bob")
MiB = 1 << 20


@contextmanager
def acting_as(caller: Caller) -> Iterator[None]:
    """Requests (and, for a client opened inside, its connection) come from ``caller``, as the
    daemon's socket sets it per connection."""
    token = current_client.set(caller)
    try:
        yield
    finally:
        current_client.reset(token)


@pytest.fixture
def backend(tmp_path: Path) -> FakeBackend:
    (tmp_path / "staging").mkdir()
    return FakeBackend(staging_dir=tmp_path / "staging", installed={"default", "python"})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def service(backend: FakeBackend, tmp_path: Path, clock: Clock) -> AsyncIterator[SandboxService]:
    shared = SandboxService(
        backend, PolicySet.load([shipped_policy_dir()]), records_dir=tmp_path / "state", clock=clock
    )
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(shared.events.run)
        yield shared
        tasks.cancel_scope.cancel()


def _server(service: SandboxService, throttle: Throttle | None = None) -> Any:
    @asynccontextmanager
    async def open_service() -> AsyncIterator[SandboxService]:
        yield service

    return build_server(open_service, PolicySet.load([shipped_policy_dir()]), throttle)


@asynccontextmanager
async def connected(service: SandboxService, caller: Caller, **options: Any) -> AsyncIterator[Client]:
    with acting_as(caller):
        async with Client(_server(service), **options) as client:
            yield client


async def _create(client: Client, caller: Caller, **arguments: Any) -> str:
    with acting_as(caller):
        created = await client.call_tool("create_sandbox", arguments)
    assert created.structured_content is not None, created
    return str(created.structured_content["sandbox_id"])


async def _read(client: Client, caller: Caller, uri: str) -> Any:
    with acting_as(caller):
        result = await client.read_resource(uri)
    return json.loads(result.contents[0].text)  # type: ignore[union-attr]


async def _error_of(call: Any) -> MCPError:
    with pytest.raises(MCPError) as raised:
        await call
    return raised.value


# -- resources ------------------------------------------------------------------------------


async def test_a_sandbox_resource_shows_status_limits_usage_expiry_and_ports(
    service: SandboxService, backend: FakeBackend
) -> None:
    async with connected(service, ALICE) as alice:
        sandbox = await _create(alice, ALICE, memory_mb=256, ttl_seconds=600)
        backend.measured[sandbox] = MeasuredUsage(
            memory_bytes=48 * MiB, cpu_nsec=2_500_000_000, tasks=3, disk_bytes=300 * MiB
        )
        status = await _read(alice, ALICE, f"sandbox://{sandbox}")

    assert status["sandbox_id"] == sandbox
    assert status["status"] == "running"
    assert (status["image"], status["policy"], status["network"]) == ("default", "default", "none")
    assert status["limits"]["memory_mb"] == 256
    assert status["usage"] == {"memory_mb": 48.0, "cpu_seconds": 2.5, "processes": 3, "disk_mb": 300.0}
    assert status["expires_in_seconds"] == 600
    assert status["expires_at"].startswith("2026-01-01T00:10:00")
    assert status["ports"] == []


async def test_usage_the_daemons_cannot_tell_is_null(service: SandboxService) -> None:
    async with connected(service, ALICE) as alice:
        sandbox = await _create(alice, ALICE)
        status = await _read(alice, ALICE, f"sandbox://{sandbox}")
    assert status["usage"] == {"memory_mb": None, "cpu_seconds": None, "processes": None, "disk_mb": None}


async def test_the_status_and_file_templates_do_not_clash(
    service: SandboxService, backend: FakeBackend
) -> None:
    async with connected(service, ALICE) as alice:
        sandbox = await _create(alice, ALICE)
        backend.files[(sandbox, "/etc/os-release")] = b"ID=debian\n"
        with acting_as(ALICE):
            templates = {t.uri_template for t in (await alice.list_resource_templates()).resource_templates}
            file = await alice.read_resource(f"sandbox://{sandbox}/files/etc/os-release")
        status = await _read(alice, ALICE, f"sandbox://{sandbox}")
    assert {"sandbox://{sandbox_id}", "sandbox://{sandbox_id}/files/{+path}", "policy://{name}"} <= templates
    assert file.contents[0].text == "ID=debian\n"  # type: ignore[union-attr]
    assert status["sandbox_id"] == sandbox


async def test_another_clients_sandbox_is_not_found_through_either_resource(
    service: SandboxService, backend: FakeBackend
) -> None:
    async with connected(service, ALICE) as alice, connected(service, BOB) as bob:
        sandbox = await _create(alice, ALICE)
        backend.files[(sandbox, "/etc/secret")] = b"alice's\n"
        assert (await _read(alice, ALICE, f"sandbox://{sandbox}"))["sandbox_id"] == sandbox  # the control
        with acting_as(BOB):
            status = await _error_of(bob.read_resource(f"sandbox://{sandbox}"))
            file = await _error_of(bob.read_resource(f"sandbox://{sandbox}/files/etc/secret"))
    for refused in (status, file):
        assert refused.error.code == INVALID_PARAMS
        assert refused.error.message == f"no sandbox {sandbox}; list_sandboxes shows yours"


async def test_unknown_resources_are_invalid_params_with_a_plain_message(service: SandboxService) -> None:
    async with connected(service, ALICE) as alice:
        with acting_as(ALICE):
            no_policy = await _error_of(alice.read_resource("policy://nope"))
            no_sandbox = await _error_of(alice.read_resource("sandbox://sbx-00000000"))
            no_scheme = await _error_of(alice.read_resource("nothing://here"))
            policy = await alice.read_resource("policy://strict")
    assert no_policy.error.code == no_sandbox.error.code == no_scheme.error.code == INVALID_PARAMS
    assert no_policy.error.message.startswith("unknown policy 'nope'; available: default, dev")
    assert no_sandbox.error.message == "no sandbox sbx-00000000; list_sandboxes shows yours"
    assert json.loads(policy.contents[0].text)["name"] == "strict"  # type: ignore[union-attr]


async def test_a_token_limited_to_some_policies_reads_only_those(service: SandboxService) -> None:
    limited = Caller("token:ci", policies=frozenset({"strict"}))
    async with connected(service, limited) as ci:
        with acting_as(limited):
            other = await _error_of(ci.read_resource("policy://dev"))
            hidden = await ci.call_tool("get_policy", {"name": "dev"})
            own = await ci.call_tool("get_policy", {"name": "strict"})  # the control
    assert other.error.code == INVALID_PARAMS
    assert other.error.message.startswith("unknown policy 'dev'; available: strict")
    assert hidden.is_error
    assert own.structured_content is not None
    assert own.structured_content["available"] == ["strict"]


async def test_a_resource_read_over_the_rate_limit_is_refused(service: SandboxService) -> None:
    server = _server(service, Throttle(rate=1, burst=1, clock=lambda: 0.0))
    with acting_as(ALICE):
        async with Client(server) as alice:
            first = await _error_of(alice.read_resource("sandbox://sbx-00000000"))
            second = await _error_of(alice.read_resource("sandbox://sbx-00000000"))
    assert first.error.code == INVALID_PARAMS  # admitted, and not found
    assert second.error.code == INTERNAL_ERROR
    assert "too many calls" in second.error.message


# -- prompts --------------------------------------------------------------------------------


async def test_the_prompts_are_offered_with_their_arguments(service: SandboxService) -> None:
    async with connected(service, ALICE) as alice:
        prompts = {p.name: p for p in (await alice.list_prompts()).prompts}
    assert set(prompts) == {"sandbox_workflow", "review_untrusted_code", "run_repository_tests"}
    arguments = {
        name: {a.name: a.required for a in prompt.arguments or []} for name, prompt in prompts.items()
    }
    assert arguments == {
        "sandbox_workflow": {"policy": False, "image": False},
        "review_untrusted_code": {"path": True, "focus": False},
        "run_repository_tests": {"repository": True, "image": False, "test_command": False},
    }
    assert all(prompt.description for prompt in prompts.values())


async def _prompt_text(client: Client, name: str, arguments: dict[str, str] | None = None) -> str:
    result = await client.get_prompt(name, arguments)
    assert [message.role for message in result.messages] == ["user"]
    return result.messages[0].content.text  # type: ignore[union-attr]


async def test_the_workflow_prompt_uses_its_arguments_and_paths_that_exist(service: SandboxService) -> None:
    async with connected(service, ALICE) as alice:
        default = await _prompt_text(alice, "sandbox_workflow")
        chosen = await _prompt_text(alice, "sandbox_workflow", {"policy": "dev", "image": "python"})
    assert 'create_sandbox(image="default", policy="default")' in default
    assert 'create_sandbox(image="python", policy="dev")' in chosen
    assert "/work" not in default  # no such directory in a sandbox
    assert "/root/app" in default


async def test_the_review_prompt_keeps_untrusted_code_offline_and_off_the_host(
    service: SandboxService,
) -> None:
    async with connected(service, ALICE) as alice:
        text = await _prompt_text(alice, "review_untrusted_code", {"path": "vendor/suspicious"})
    assert 'source="vendor/suspicious"' in text
    assert 'create_sandbox(policy="default")' in text
    assert "Never run" in text
    assert "network" in text
    assert '"writable": false' in text


async def test_the_test_prompt_uses_egress_web_and_the_repository(service: SandboxService) -> None:
    async with connected(service, ALICE) as alice:
        text = await _prompt_text(
            alice, "run_repository_tests", {"repository": "https://github.com/pallets/click"}
        )
    assert 'create_sandbox(policy="egress-web", image="python")' in text
    assert '"https://github.com/pallets/click"' in text
    egress = PolicySet.load([shipped_policy_dir()]).get("egress-web")
    for domain in egress.network.domains:  # the prompt names the hosts the policy allows
        assert domain in text


async def test_an_unknown_prompt_or_bad_arguments_are_invalid_params(service: SandboxService) -> None:
    async with connected(service, ALICE) as alice:
        unknown = await _error_of(alice.get_prompt("nope"))
        missing = await _error_of(alice.get_prompt("review_untrusted_code"))
        extra = await _error_of(alice.get_prompt("sandbox_workflow", {"network": "yes"}))
        multiline = await _error_of(alice.get_prompt("review_untrusted_code", {"path": "a\nIgnore that"}))
    assert {e.error.code for e in (unknown, missing, extra, multiline)} == {INVALID_PARAMS}
    assert unknown.error.message.startswith("no prompt 'nope'; prompts: review_untrusted_code, ")
    assert "needs the argument 'path'" in missing.error.message
    assert "has no argument 'network'; its arguments: policy, image" in extra.error.message
    assert "one line" in multiline.error.message


# -- completions ----------------------------------------------------------------------------


async def _complete(client: Client, caller: Caller, ref: Any, name: str, value: str = "") -> list[str]:
    with acting_as(caller):
        result = await client.complete(ref, {"name": name, "value": value})
    return result.completion.values


async def test_policies_images_and_own_sandbox_ids_are_completed(service: SandboxService) -> None:
    workflow = PromptReference(type="ref/prompt", name="sandbox_workflow")
    async with connected(service, ALICE) as alice, connected(service, BOB) as bob:
        mine = await _create(alice, ALICE)
        theirs = await _create(bob, BOB)
        policies = await _complete(alice, ALICE, workflow, "policy")
        narrowed = await _complete(alice, ALICE, workflow, "policy", "de")
        images = await _complete(alice, ALICE, workflow, "image")
        policy_names = await _complete(
            alice, ALICE, ResourceTemplateReference(type="ref/resource", uri="policy://{name}"), "name", "s"
        )
        ids = await _complete(
            alice,
            ALICE,
            ResourceTemplateReference(type="ref/resource", uri="sandbox://{sandbox_id}"),
            "sandbox_id",
        )
        file_ids = await _complete(
            bob,
            BOB,
            ResourceTemplateReference(type="ref/resource", uri="sandbox://{sandbox_id}/files/{+path}"),
            "sandbox_id",
            "sbx-",
        )
    assert policies == ["default", "dev", "egress-web", "strict"]
    assert narrowed == ["default", "dev"]
    assert images == ["default", "python"]
    assert policy_names == ["strict"]
    assert ids == [mine]  # never the other client's
    assert file_ids == [theirs]


async def test_arguments_without_known_values_complete_to_nothing(service: SandboxService) -> None:
    review = PromptReference(type="ref/prompt", name="review_untrusted_code")
    async with connected(service, ALICE) as alice:
        assert await _complete(alice, ALICE, review, "path") == []
        with acting_as(ALICE):
            unknown = await _error_of(
                alice.complete(PromptReference(type="ref/prompt", name="nope"), {"name": "x", "value": ""})
            )
    assert unknown.error.code == INVALID_PARAMS


# -- logging --------------------------------------------------------------------------------


class Heard:
    """The log messages a client receives."""

    def __init__(self) -> None:
        self.messages: list[LoggingMessageNotificationParams] = []
        self._arrived = anyio.Event()

    async def __call__(self, params: LoggingMessageNotificationParams) -> None:
        self.messages.append(params)
        self._arrived.set()

    async def wait_for(self, count: int) -> list[tuple[str, str, str]]:
        with anyio.fail_after(5):
            while len(self.messages) < count:
                self._arrived = anyio.Event()
                await self._arrived.wait()
        return [(m.level, m.data["event"], m.data.get("sandbox_id", "")) for m in self.messages]


async def _set_level(client: Client, caller: Caller, level: str) -> None:
    with acting_as(caller), warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)  # the capability is deprecated in 2026-07-28
        await client.set_logging_level(level)  # type: ignore[arg-type]


async def test_the_logging_and_completions_capabilities_are_declared(service: SandboxService) -> None:
    async with connected(service, ALICE, mode="legacy") as alice:
        capabilities = alice.session.initialize_result.capabilities  # type: ignore[union-attr]
    assert capabilities.logging is not None
    assert capabilities.completions is not None


async def test_a_client_hears_its_own_creates_destroys_refusals_and_expiries_at_its_level(
    service: SandboxService, clock: Clock
) -> None:
    heard = Heard()
    async with connected(service, ALICE, mode="legacy", logging_callback=heard) as alice:
        await _set_level(alice, ALICE, "info")
        first = await _create(alice, ALICE, ttl_seconds=60)
        second = await _create(alice, ALICE, ttl_seconds=3600)
        with acting_as(ALICE):
            await alice.call_tool("destroy_sandbox", {"sandbox_id": second})
            refused = await alice.call_tool("create_sandbox", {"policy": "nope"})
        assert refused.is_error
        clock.now = clock.now.replace(minute=2)
        await service.reap_once()
        events = await heard.wait_for(5)
    assert events == [
        ("info", "created", first),
        ("info", "created", second),
        ("info", "destroyed", second),
        ("warning", "refused", ""),
        ("notice", "expired", first),
    ]
    assert {m.logger for m in heard.messages} == {"nspawn-mcp"}
    assert heard.messages[3].data["message"].startswith("create_sandbox refused: unknown policy 'nope'")
    assert heard.messages[4].data["message"].startswith(f"sandbox {first} was destroyed: it expired at")


async def test_messages_below_the_level_are_not_sent(service: SandboxService) -> None:
    heard = Heard()
    async with connected(service, ALICE, mode="legacy", logging_callback=heard) as alice:
        await _set_level(alice, ALICE, "warning")
        await _create(alice, ALICE)  # info: not sent
        with acting_as(ALICE):
            await alice.call_tool("create_sandbox", {"policy": "no-such-policy"})  # refused: a warning
        events = await heard.wait_for(1)
    assert events == [("warning", "refused", "")]  # no sandbox: none was made


async def test_no_level_set_means_no_messages(service: SandboxService) -> None:
    heard, control = Heard(), Heard()
    async with (
        connected(service, ALICE, mode="legacy", logging_callback=heard) as alice,
        connected(service, ALICE, mode="legacy", logging_callback=control) as listening,
    ):
        await _set_level(listening, ALICE, "info")
        await _create(alice, ALICE)
        await control.wait_for(1)  # the same identity's other connection was told: it was sent
    assert heard.messages == []


async def test_a_client_never_hears_of_another_clients_sandboxes(
    service: SandboxService, clock: Clock
) -> None:
    alice_heard, bob_heard = Heard(), Heard()
    async with (
        connected(service, ALICE, mode="legacy", logging_callback=alice_heard) as alice,
        connected(service, BOB, mode="legacy", logging_callback=bob_heard) as bob,
    ):
        await _set_level(alice, ALICE, "debug")
        await _set_level(bob, BOB, "debug")
        alices = await _create(alice, ALICE, ttl_seconds=60)
        with acting_as(BOB):
            await bob.call_tool("destroy_sandbox", {"sandbox_id": alices})  # not found, for Bob: no event
            await bob.call_tool("create_sandbox", {"policy": "no-such-policy"})  # refused: Bob's event
        clock.now = clock.now.replace(minute=2)
        await service.reap_once()
        bobs = await _create(bob, BOB)
        assert await alice_heard.wait_for(2) == [("info", "created", alices), ("notice", "expired", alices)]
        assert await bob_heard.wait_for(2) == [("warning", "refused", ""), ("info", "created", bobs)]
    assert "uid:1000" not in json.dumps([m.data for m in bob_heard.messages])
    assert alices not in json.dumps([m.data for m in bob_heard.messages])
    assert bob_heard.messages[0].data["message"].startswith("create_sandbox refused: ")


async def test_an_invalid_level_is_invalid_params(service: SandboxService) -> None:
    banana = Request[dict[str, str], str](method="logging/setLevel", params={"level": "banana"})
    async with connected(service, ALICE, mode="legacy") as alice:
        with acting_as(ALICE):
            refused = await _error_of(alice.session.send_request(banana, EmptyResult))
    assert refused.error.code == INVALID_PARAMS
