"""Images built from recipes on the real pool and machined: atomic replacement, failed builds, `default`."""

from __future__ import annotations

import io
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.images.build import BuildFailed, Progress, build_image
from nspawn_mcp.images.catalog import Catalog
from nspawn_mcp.images.recipe import RecipeSource, find_recipe
from nspawn_mcp.images.templates import Pool, delete_subvolume
from nspawn_mcp.layout import Layout
from nspawn_mcp.naming import template_image, template_staging
from nspawn_mcp.policy import Policy
from nspawn_mcp.runtime import Daemons
from tests.integration.conftest import Factory
from tests.integration.test_sandbox_lifecycle import run

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture
def pool(daemons: Daemons, layout: Layout) -> Pool:
    return Pool.of(layout, daemons.box_pid)


@pytest.fixture
async def image_name(backend: NspawnBackend, pool: Pool) -> AsyncIterator[str]:
    """A fresh image name; its template (and any staging subvolume) is removed afterwards."""
    name = f"itest-{secrets.token_hex(3)}"
    yield name
    with anyio.CancelScope(shield=True):
        if pool.exists(template_image(name)):
            await backend.machined.mark_image_read_only(template_image(name), False)
            await backend.machined.remove_image(template_image(name))
        delete_subvolume(pool, template_staging(name))


def layered(directory: Path, name: str, layer: str, *commands: str) -> RecipeSource:
    """A recipe from `default` that needs no network: a file, a command, the environment."""
    listed = ", ".join(f'"{c}"' for c in (f"echo {layer} > /etc/layer-by-command", *commands))
    (directory / f"{name}.toml").write_text(
        f'description = "layer {layer}"\nfrom = "default"\nenv = {{ LAYER = "{layer}" }}\n'
        f"commands = [{listed}]\n"
        f'[[files]]\npath = "/opt/layer/name"\ncontent = "{layer}\\n"\nmode = 0o640\n'
    )
    return find_recipe(name, (directory,))


async def test_a_rebuild_replaces_the_template_atomically_and_a_failed_one_changes_nothing(
    backend: NspawnBackend, make_sandbox: Factory, pool: Pool, image_name: str, tmp_path: Path
) -> None:
    catalog = Catalog(tmp_path / "catalog")
    allowed = Policy.model_validate({"sandboxes": {"images": [image_name]}})
    quiet = Progress(io.StringIO())

    with anyio.fail_after(60):
        first = await build_image(layered(tmp_path, image_name, "v1"), pool, backend.machined, catalog, quiet)
    old = await make_sandbox(policy=allowed, image=image_name)
    assert (await run(backend, old, "cat /opt/layer/name /etc/layer-by-command")).stdout == b"v1\nv1\n"
    assert first.env == {"LAYER": "v1"}
    assert first.os_release["ID"] == "debian"
    assert first.source == "recipe"

    # While v2 replaces the template, clones of it keep succeeding: each gets v1 or v2, never nothing.
    clones: list[str] = []

    async def clone_until_built(done: anyio.Event) -> None:
        while not done.is_set():
            clone = f"itest-race-{len(clones)}"
            clones.append(clone)
            await backend.machined.clone_image(template_image(image_name), clone)
            await backend.machined.remove_image(clone)

    built = anyio.Event()
    with anyio.fail_after(60):
        async with anyio.create_task_group() as racing:
            racing.start_soon(clone_until_built, built)
            second = await build_image(
                layered(tmp_path, image_name, "v2"), pool, backend.machined, catalog, quiet
            )
            built.set()
    assert clones, "no clone raced the build"

    assert second.version != first.version
    assert catalog.get(image_name) == second
    new = await make_sandbox(policy=allowed, image=image_name)
    assert (await run(backend, new, "cat /opt/layer/name; stat -c %a /opt/layer/name")).stdout == b"v2\n640\n"
    assert (await run(backend, old, "cat /opt/layer/name")).stdout == b"v1\n"
    assert old in await backend.running()

    failing = layered(tmp_path, image_name, "v3", "echo about to fail", "exit 3")
    with anyio.fail_after(60), pytest.raises(BuildFailed) as failed:
        await build_image(failing, pool, backend.machined, catalog, quiet)

    assert "failed at step 5/7 (run: exit 3); the old image is unchanged" in str(failed.value)
    assert str(failed.value).endswith(f"the log is {catalog.log_path(image_name)}")
    assert "about to fail\n[exit status 0]" in catalog.log_path(image_name).read_text()
    assert not pool.exists(template_staging(image_name))
    assert catalog.get(image_name) == second
    after = await make_sandbox(policy=allowed, image=image_name)
    assert (await run(backend, after, "cat /opt/layer/name /etc/layer-by-command")).stdout == b"v2\nv2\n"


async def test_a_recipe_from_an_image_that_is_not_installed_is_refused_before_anything_is_made(
    backend: NspawnBackend, pool: Pool, image_name: str, tmp_path: Path
) -> None:
    (tmp_path / f"{image_name}.toml").write_text('from = "not-installed"\n')
    source = find_recipe(image_name, (tmp_path,))

    with pytest.raises(BuildFailed, match="starts from image 'not-installed', which is not installed"):
        await build_image(source, pool, backend.machined, Catalog(tmp_path), Progress(io.StringIO()))

    assert not pool.exists(template_staging(image_name))
    assert not pool.exists(template_image(image_name))


async def test_the_default_image_has_the_tools_an_agent_needs_and_apt_over_https(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    sandbox = await make_sandbox()

    tools = await run(backend, sandbox, "pip --version && git --version && curl --version && ps -p 1 -o pid=")
    assert tools.exit_code == 0, tools.stderr
    assert tools.stdout.startswith(b"pip ")
    assert b"\ngit version " in tools.stdout
    assert b"\ncurl " in tools.stdout
    venv = await run(backend, sandbox, "python3 -m venv /tmp/v && /tmp/v/bin/python -c 'print(1)'")
    assert venv.stdout == b"1\n", venv.stderr

    sources = await run(backend, sandbox, "cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null")
    entries = [line for line in sources.stdout.decode().splitlines() if line.startswith("deb")]
    assert entries
    assert all(line.split()[1].startswith("https://") for line in entries), entries
    certificates = await run(backend, sandbox, "test -s /etc/ssl/certs/ca-certificates.crt")
    assert certificates.exit_code == 0
