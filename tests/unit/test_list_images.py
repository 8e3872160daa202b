"""list_images over MCP; what create_sandbox says of images a policy does not allow or the host lacks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mcp.client import Client

from nspawn_mcp.app import build_server
from nspawn_mcp.identity import Client as Caller
from nspawn_mcp.identity import current_client
from nspawn_mcp.images import Catalog, ImageEntry
from nspawn_mcp.policy import PolicySet
from nspawn_mcp.policy.loader import shipped_policy_dir
from nspawn_mcp.service import SandboxService
from tests.unit.fake_backend import FakeBackend

pytestmark = pytest.mark.anyio

_POLICIES = {
    "default": "",  # the shipped default's images: default
    "tools": '[sandboxes]\nimages = ["default", "python", "mytools"]\n',
    "locked": '[sandboxes]\nimages = ["python"]\n',
}


@pytest.fixture
def policies(tmp_path: Path) -> PolicySet:
    directory = tmp_path / "policies"
    directory.mkdir()
    for name, text in _POLICIES.items():
        if text:
            (directory / f"{name}.toml").write_text(text)
    return PolicySet.load([directory, shipped_policy_dir()])


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    catalog = Catalog(tmp_path / "images")
    catalog.put(
        ImageEntry(
            name="mytools",
            description="our team's tools",
            source="import",
            origin="/srv/rootfs.tar",
            version="1",
            built_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            build_seconds=2.0,
            os_release={"PRETTY_NAME": "Alpine Linux v3.20", "ID": "alpine", "VERSION_ID": "3.20.3"},
        )
    )
    catalog.put(
        ImageEntry(
            name="default",
            source="recipe",
            origin="default.toml",
            version="7",
            built_at=datetime(2026, 1, 1, tzinfo=UTC),
            build_seconds=60.0,
            packages=("python3", "git"),
            os_release={"PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)", "ID": "debian", "VERSION_ID": "12"},
        )
    )
    return catalog


@pytest.fixture
def backend(tmp_path: Path) -> FakeBackend:
    (tmp_path / "staging").mkdir()
    return FakeBackend(
        staging_dir=tmp_path / "staging",
        installed={"default", "mytools", "orphan"},
        image_sizes={"mytools": 150 << 20},
    )


@asynccontextmanager
async def connected(
    backend: FakeBackend, policies: PolicySet, catalog: Catalog, tmp_path: Path
) -> AsyncIterator[Client]:
    @asynccontextmanager
    async def open_service() -> AsyncIterator[SandboxService]:
        yield SandboxService(
            backend, policies, records_dir=tmp_path / "state", cwd=str(tmp_path), catalog=catalog
        )

    async with Client(build_server(open_service, policies)) as client:
        yield client


@pytest.fixture
def caller() -> Iterator[None]:
    """A client whose token allows only the 'tools' and 'locked' policies."""
    token = current_client.set(Caller("token:ci", policies=frozenset({"tools", "locked"})))
    yield
    current_client.reset(token)


async def _images(client: Client) -> dict[str, Any]:
    result = await client.call_tool("list_images", {})
    assert not result.is_error
    assert result.structured_content is not None
    return dict(result.structured_content)


async def test_every_installed_image_is_listed_with_what_set_up_recorded_and_who_may_use_it(
    backend: FakeBackend, policies: PolicySet, catalog: Catalog, tmp_path: Path
) -> None:
    async with connected(backend, policies, catalog, tmp_path) as client:
        listed = await _images(client)
    images = {image["name"]: image for image in listed["images"]}
    assert list(images) == ["default", "mytools", "orphan"]
    assert images["mytools"] == {
        "name": "mytools",
        "description": "our team's tools",
        "size_mb": 150.0,
        "created_at": "2026-01-02T03:04:05+00:00",
        "os_release": {"pretty_name": "Alpine Linux v3.20", "id": "alpine", "version": "3.20.3"},
        "packages": [],
        "source": "import",
        "policies": ["tools"],
        "default_policy_allows": False,
    }
    assert images["default"]["packages"] == ["python3", "git"]
    assert images["default"]["source"] == "recipe"
    assert "default" in images["default"]["policies"]
    assert "tools" in images["default"]["policies"]
    assert "locked" not in images["default"]["policies"]
    assert images["default"]["default_policy_allows"] is True
    # an image nobody recorded and no policy allows is still listed, with what machined knows
    assert "source" not in images["orphan"]  # unknown: left out, not null
    assert "os_release" not in images["orphan"]
    assert images["orphan"]["policies"] == []
    assert listed["not_installed"] == ["node", "python"]  # the shipped dev and egress-web allow both


@pytest.mark.usefixtures("caller")
async def test_a_client_limited_to_some_policies_sees_only_those(
    backend: FakeBackend, policies: PolicySet, catalog: Catalog, tmp_path: Path
) -> None:
    async with connected(backend, policies, catalog, tmp_path) as client:
        listed = await _images(client)
    images = {image["name"]: image for image in listed["images"]}
    assert images["default"]["policies"] == ["tools"]
    assert images["default"]["default_policy_allows"] is False  # it may not use 'default'
    assert listed["not_installed"] == ["python"]  # only what its own policies allow


async def test_an_image_the_policy_does_not_allow_is_refused_naming_the_ones_it_does(
    backend: FakeBackend, policies: PolicySet, catalog: Catalog, tmp_path: Path
) -> None:
    async with connected(backend, policies, catalog, tmp_path) as client:
        refused = await client.call_tool("create_sandbox", {"image": "mytools"})
        allowed = await client.call_tool("create_sandbox", {"image": "mytools", "policy": "tools"})
    assert refused.is_error
    assert refused.content[0].text == (  # type: ignore[union-attr]
        "image 'mytools' is not allowed by policy 'default'; it allows: default (list_images shows which "
        "are installed) (policy rule: sandboxes.images)"
    )
    assert not allowed.is_error  # the control: the same image under a policy that allows it
    assert backend.sandboxes


async def test_an_allowed_image_the_host_lacks_says_how_the_operator_makes_it(
    backend: FakeBackend, policies: PolicySet, catalog: Catalog, tmp_path: Path
) -> None:
    async with connected(backend, policies, catalog, tmp_path) as client:
        result = await client.call_tool("create_sandbox", {"image": "python", "policy": "tools"})
    assert result.is_error
    assert result.content[0].text == (  # type: ignore[union-attr]
        "image 'python' is allowed but not installed on this host; the operator can build it "
        "(`nspawn-mcp image build python`) or import one (`nspawn-mcp image import FILE python`)"
    )
    assert backend.sandboxes == {}
