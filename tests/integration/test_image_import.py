"""Images users bring, imported through the real systemd-importd into the real pool.

The tarball is what ``podman export`` / ``docker export`` would give: a tar of a root
filesystem's tree, here the installed ``default`` template's, read through the
daemons' view of the pool.
"""

from __future__ import annotations

import re
import secrets
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from nspawn_mcp.backend.bus import Bus
from nspawn_mcp.backend.import1 import Importd
from nspawn_mcp.backend.machine1 import Machined
from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.images.catalog import Catalog
from nspawn_mcp.images.imports import ImportRefused, ImportRequest, import_image
from nspawn_mcp.images.templates import Pool
from nspawn_mcp.layout import Layout
from nspawn_mcp.naming import image_of_import_staging, template_image
from nspawn_mcp.policy import Policy
from nspawn_mcp.runtime import Daemons
from tests.integration.conftest import Factory, HostView
from tests.integration.test_sandbox_lifecycle import run

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

_IMPORT_TIMEOUT = 120.0


class Importing:
    """What a test needs to import: importd and machined on one connection, the image pool."""

    def __init__(self, bus: Bus, importd: Importd, pool: Pool, catalog: Catalog) -> None:
        self.bus = bus
        self.importd = importd
        self.machined = Machined(bus)
        self.pool = pool
        self.catalog = catalog
        self.lines: list[str] = []

    async def import_(self, source: Path, name: str, description: str = "") -> None:
        with anyio.fail_after(_IMPORT_TIMEOUT):
            await import_image(
                self.importd,
                self.machined,
                self.catalog,
                self.pool,
                ImportRequest(source, name, description),
                self.lines.append,
            )

    async def images_of(self, name: str) -> set[str]:
        """Every image in the pool that is the template of ``name`` or one of its staging images."""
        found = set()
        for image in await self.machined.list_images():
            staged = image_of_import_staging(image.name)
            if image.name == template_image(name) or (staged is not None and staged[0] == name):
                found.add(image.name)
        return found


@pytest.fixture
def image_name() -> str:
    return f"itest-{secrets.token_hex(3)}"


@pytest.fixture
async def pool(daemons: Daemons, layout: Layout, tmp_path: Path, image_name: str) -> AsyncIterator[Importing]:
    bus = await Bus.connect(daemons.bus_address)
    try:
        images = Pool.of(layout, daemons.box_pid)
        the_pool = Importing(bus, await Importd.attach(bus), images, Catalog(tmp_path / "catalog"))
        yield the_pool
        with anyio.CancelScope(shield=True):
            for image in await the_pool.images_of(image_name):
                await the_pool.machined.mark_image_read_only(image, False)
                await the_pool.machined.remove_image(image)
    finally:
        bus.disconnect()


def _tar(tree: Path, target: Path) -> Path:
    subprocess.run(["tar", "--numeric-owner", "-C", str(tree), "-cf", str(target), "."], check=True)
    return target


@pytest.fixture
async def exported_default(host: HostView, tmp_path: Path) -> AsyncIterator[Path]:
    """The default template, exported as a container engine's ``export`` would."""
    tarball = tmp_path / "rootfs.tar"
    await anyio.to_thread.run_sync(_tar, host.machines_dir / template_image("default"), tarball)
    yield tarball
    tarball.unlink(missing_ok=True)


async def test_an_exported_root_filesystem_imports_as_a_template_a_sandbox_boots_from(
    pool: Importing, backend: NspawnBackend, make_sandbox: Factory, exported_default: Path, image_name: str
) -> None:
    await pool.import_(exported_default, image_name, "an exported default")

    images = {image.name: image for image in await pool.machined.list_images()}
    template = images[template_image(image_name)]
    assert template.read_only is True
    assert template.image_type == "subvolume"
    assert await pool.images_of(image_name) == {template_image(image_name)}  # no staging left
    assert image_name in await backend.available_images()
    entry = pool.catalog.get(image_name)
    assert entry is not None
    assert (entry.source, entry.description) == ("import", "an exported default")
    assert entry.os_release["ID"] == "debian"
    assert (pool.catalog.log_path(image_name)).read_text().count("importd:") > 0

    policy = Policy.model_validate({"sandboxes": {"images": [image_name]}})
    sandbox = await make_sandbox(policy=policy, image=image_name)
    outcome = await run(backend, sandbox, ". /etc/os-release; echo $ID; python3 -c 'print(6 * 7)'")
    assert (outcome.exit_code, outcome.stdout) == (0, b"debian\n42\n")


async def test_importing_again_replaces_the_template_while_sandboxes_of_the_old_one_keep_running(
    pool: Importing, backend: NspawnBackend, make_sandbox: Factory, exported_default: Path, image_name: str
) -> None:
    await pool.import_(exported_default, image_name)
    first = pool.catalog.get(image_name)
    policy = Policy.model_validate({"sandboxes": {"images": [image_name]}})
    old = await make_sandbox(policy=policy, image=image_name)
    await run(backend, old, "echo old > /etc/which-one")

    await pool.import_(exported_default, image_name)

    second = pool.catalog.get(image_name)
    assert first is not None
    assert second is not None
    assert second.version != first.version
    assert "replaced the older one" in pool.lines[-1]
    assert await pool.images_of(image_name) == {template_image(image_name)}
    assert (await run(backend, old, "cat /etc/which-one")).stdout == b"old\n"
    new = await make_sandbox(policy=policy, image=image_name)
    assert (await run(backend, new, "cat /etc/which-one 2>&1 || echo absent")).stdout.endswith(b"absent\n")


def _tree(root: Path, files: dict[str, str], links: dict[str, str] | None = None) -> Path:
    """A tree of ``files`` (executable where they start with ``#!``) and symbolic ``links``."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755 if text.startswith("#!") else 0o644)
    for relative, target in (links or {}).items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).symlink_to(target)
    return root


_SH = {"bin/sh": "#!x\n"}
_PYTHON = {"usr/bin/python3": "#!x\n"}
_OS_RELEASE = {"etc/os-release": "ID=tiny\n"}


@pytest.mark.parametrize(
    ("files", "links", "refusal"),
    [
        pytest.param(
            _OS_RELEASE | _SH,
            {},
            "this image has no python3 (/usr/bin/python3), which nspawn-mcp runs inside each sandbox",
            id="no python3",
        ),
        pytest.param(
            _OS_RELEASE | _SH | {"usr/bin/python3": "not executable"},
            {},
            "this image has no python3",
            id="python3 not executable",
        ),
        pytest.param(_OS_RELEASE | _PYTHON, {}, "it has no shell /bin/sh", id="no shell"),
        pytest.param(
            _SH | _PYTHON, {}, "it has no /etc/os-release or /usr/lib/os-release", id="no os-release"
        ),
        pytest.param(
            # links in the image resolve inside it: set-up never reads the host's os-release
            _SH | _PYTHON,
            {
                "etc/os-release": "/usr/lib/os-release",
                "usr/lib/os-release": "../../../../../../etc/hostname",
            },
            "it has no /etc/os-release or /usr/lib/os-release",
            id="os-release links out to the host's",
        ),
    ],
)
async def test_an_archive_that_cannot_run_a_sandbox_is_refused_and_leaves_nothing(
    pool: Importing,
    tmp_path: Path,
    image_name: str,
    files: dict[str, str],
    links: dict[str, str],
    refusal: str,
) -> None:
    tree = _tree(tmp_path / "tree", files, links)
    archive = await anyio.to_thread.run_sync(_tar, tree, tmp_path / "tiny.tar")

    with pytest.raises(ImportRefused, match=re.escape(refusal)):
        await pool.import_(archive, image_name)

    assert await pool.images_of(image_name) == set()
    assert pool.catalog.get(image_name) is None


async def test_an_allowed_control_the_same_tiny_tree_with_all_three_imports(
    pool: Importing, tmp_path: Path, image_name: str
) -> None:
    """The refusals above are about what the tree lacks, not about tiny trees."""
    tree = _tree(tmp_path / "tree", {"etc/os-release": "PRETTY_NAME='Tiny 1'\nID=tiny\n"} | _SH | _PYTHON)
    await pool.import_(await anyio.to_thread.run_sync(_tar, tree, tmp_path / "tiny.tar"), image_name)
    entry = pool.catalog.get(image_name)
    assert entry is not None
    assert entry.os_release == {"PRETTY_NAME": "Tiny 1", "ID": "tiny"}
    assert await pool.images_of(image_name) == {template_image(image_name)}


async def test_a_directory_imports_through_import_file_system(
    pool: Importing, tmp_path: Path, image_name: str
) -> None:
    tree = _tree(tmp_path / "tree", {"usr/lib/os-release": "ID=dir\n"} | _SH | _PYTHON)
    await pool.import_(tree, image_name)
    entry = pool.catalog.get(image_name)
    assert entry is not None
    assert entry.os_release == {"ID": "dir"}
    assert "(directory)" in pool.lines[0]


def _disk_image(tree: Path, target: Path) -> Path:
    """A raw disk image of ``tree``: one ext4 file system, as a VM tool might export it."""
    subprocess.run(["truncate", "-s", "64M", str(target)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(target)], check=True)
    return target


async def test_a_disk_image_imports_through_import_raw_and_becomes_a_tree(
    pool: Importing, tmp_path: Path, image_name: str
) -> None:
    tree = _tree(tmp_path / "tree", {"etc/os-release": "ID=disk\n"} | _SH | _PYTHON)
    disk = await anyio.to_thread.run_sync(_disk_image, tree, tmp_path / "disk.raw")
    await pool.import_(disk, image_name)

    entry = pool.catalog.get(image_name)
    assert entry is not None
    assert entry.os_release == {"ID": "disk"}
    images = {image.name: image for image in await pool.machined.list_images()}
    assert images[template_image(image_name)].image_type == "subvolume"  # a tree, not the disk image
    assert await pool.images_of(image_name) == {template_image(image_name)}
    assert "nspawn-mcp-import-" not in Path("/proc/self/mountinfo").read_text()  # detached again
