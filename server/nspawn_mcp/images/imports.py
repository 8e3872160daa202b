"""Images users bring: a root filesystem tarball, a disk image or a directory, made a template.

``nspawn-mcp image import FILE NAME``, step by step, each step undone on failure:

1. systemd-importd imports FILE as a staging image (:func:`~nspawn_mcp.naming.import_staging_image`,
   never a template name): ``ImportTar`` for a tarball, ``ImportFileSystem`` for a
   directory. A disk image goes through ``ImportRaw`` (which also unpacks qcow2 and
   compression), is attached read-only (``systemd-dissect --mount``), and its tree is
   imported with ``ImportFileSystem``.
2. The staged tree is checked (:func:`check_tree`): a shell, python3 (the in-sandbox
   supervisor is a Python program) and an os-release. The tree is the user's: every
   path in it is resolved inside it (``openat2(RESOLVE_IN_ROOT)``), so a link in the
   image never makes set-up read a file of the host.
3. :func:`~nspawn_mcp.images.templates.install_template` makes it the read-only template,
   replacing an older one atomically.
4. The catalog records it (``source = "import"``, its os-release).

A refusal or a failure leaves no image, staging image or catalog entry behind; the
log (``Catalog.log_path(NAME)``) says what happened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import anyio
import anyio.to_thread

from .. import kernel
from ..backend.import1 import Importd, ImportKind, TransferFailed
from ..backend.machine1 import Machined
from ..errors import BackendError, NoSuchObject
from ..layout import Layout
from ..naming import import_staging_image, template_image
from .catalog import Catalog, ImageEntry, parse_image_name
from .templates import Pool, install_template, parse_os_release

__all__ = [
    "ImportRefused",
    "ImportRequest",
    "check_tree",
    "import_image",
    "import_into_pool",
    "import_kind",
]

log = logging.getLogger(__name__)

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst", ".tzst")
_RAW_SUFFIXES = (".raw", ".img", ".qcow2", ".raw.gz", ".raw.xz", ".raw.bz2", ".img.gz", ".img.xz")
_OS_RELEASE = ("etc/os-release", "usr/lib/os-release")
_OS_RELEASE_MAX = 64 << 10
_SHELL = "bin/sh"
_PYTHON = "usr/bin/python3"
"""Where the sandbox's unit runs the supervisor from (:func:`nspawn_mcp.backend.units.supervisor_command`)."""
TRANSFER_TIMEOUT = 3600.0


class ImportRefused(Exception):
    """The file cannot become a sandbox image; the message says why and what would do."""


@dataclass(frozen=True)
class ImportRequest:
    source: Path
    name: str
    description: str = ""


def import_kind(file_name: str, head: bytes, is_directory: bool) -> ImportKind:
    """What importd is to make of a source: by its name, else by its first bytes (at least 1 KiB)."""
    if is_directory:
        return "directory"
    lower = file_name.lower()
    if lower.endswith(_TAR_SUFFIXES):
        return "tar"
    if lower.endswith(_RAW_SUFFIXES):
        return "raw"
    if head[257:262] == b"ustar":
        return "tar"
    if head[:4] == b"QFI\xfb" or head[512:520] == b"EFI PART" or head[510:512] == b"\x55\xaa":
        return "raw"
    raise ImportRefused(
        f"{file_name} is neither a tarball nor a disk image nor a directory: give a root filesystem "
        f"as a tar file ({', '.join(_TAR_SUFFIXES)}; `podman export` and `docker export` write one), "
        f"a disk image ({', '.join(_RAW_SUFFIXES)}) or a directory"
    )


def _open_in(root: int, path: str) -> int:
    """An O_PATH fd of ``path`` resolved inside the tree ``root`` (links cannot leave it)."""
    return kernel.openat2(root, path, os.O_PATH, kernel.RESOLVE_IN_ROOT | kernel.RESOLVE_NO_MAGICLINKS)


def _is_executable_file(root: int, path: str) -> bool:
    try:
        fd = _open_in(root, path)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    return stat.S_ISREG(info.st_mode) and bool(info.st_mode & 0o111)


def _read_regular(root: int, path: str, limit: int) -> str | None:
    try:
        fd = _open_in(root, path)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        # reopen the very file found (never a path again), for reading
        with open(f"/proc/self/fd/{fd}", "rb") as file:
            return file.read(limit).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def check_tree(tree: Path) -> dict[str, str]:
    """Check that the root filesystem at ``tree`` can be a sandbox image; return its os-release.

    Raises :class:`ImportRefused` naming everything it lacks.
    """
    root = os.open(tree, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        lacks: list[str] = []
        if not _is_executable_file(root, _SHELL):
            lacks.append("it has no shell /bin/sh, which runs every command given as a string")
        if not _is_executable_file(root, _PYTHON):
            lacks.append(
                "this image has no python3 (/usr/bin/python3), which nspawn-mcp runs inside each sandbox "
                "(install python3 in the image before exporting it)"
            )
        texts = (_read_regular(root, path, _OS_RELEASE_MAX) for path in _OS_RELEASE)
        os_release = next((text for text in texts if text is not None), None)
        if os_release is None:
            lacks.append(
                "it has no /etc/os-release or /usr/lib/os-release, so it is not a distribution's root "
                "filesystem (`podman export` of a container gives one)"
            )
    finally:
        os.close(root)
    if lacks:
        raise ImportRefused("; ".join(lacks))
    return parse_os_release(os_release or "")


Report = Callable[[str], None]


class _Log:
    """Progress for the operator and the import's log file, line by line."""

    def __init__(self, file: TextIO, report: Report) -> None:
        self._file = file
        self._report = report
        self._started = time.monotonic()

    def step(self, line: str) -> None:
        self._report(line)
        self.detail(line)

    def detail(self, line: str) -> None:
        self._file.write(f"[{time.monotonic() - self._started:7.1f}s] {line}\n")
        self._file.flush()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started


@contextlib.contextmanager
def _opened(source: Path, kind: ImportKind) -> Iterator[int]:
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if kind == "directory" else 0)
    fd = os.open(source, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def _sniff(source: Path) -> ImportKind:
    if source.is_dir():
        return import_kind(source.name, b"", True)
    if not source.is_file():
        raise ImportRefused(f"{source} is not a regular file or a directory")
    with source.open("rb") as file:
        head = file.read(1024)
    return import_kind(source.name, head, False)


async def _remove_quietly(machined: Machined, image: str) -> None:
    """Remove a staging image if it is there (cleanup: shielded, and never raises over the first error)."""
    with anyio.CancelScope(shield=True):
        try:
            await machined.mark_image_read_only(image, False)
            await machined.remove_image(image)
        except NoSuchObject:
            pass
        except BackendError as exc:
            log.warning("could not remove the staging image %s: %s", image, exc)


def _refusal(exc: BaseException) -> ImportRefused | None:
    """What to tell the operator about a failed step that is the source's fault; None for other failures."""
    if isinstance(exc, ImportRefused):
        return exc
    if isinstance(exc, subprocess.CalledProcessError):
        stderr = exc.stderr.decode(errors="replace").strip() if isinstance(exc.stderr, bytes) else ""
        return ImportRefused(f"the disk image cannot be attached (systemd-dissect: {stderr[-300:]})")
    return None


class _Importer:
    def __init__(self, importd: Importd, log: _Log, timeout: float) -> None:
        self._importd = importd
        self._log = log
        self._timeout = timeout

    async def run(self, kind: ImportKind, fd: int, local_name: str) -> None:
        transfer = await self._importd.start(kind, fd, local_name, force=True)
        shown = -1

        async def progress(value: float | None) -> None:
            nonlocal shown
            if value is not None and int(value * 10) > shown:
                shown = int(value * 10)
                self._log.step(f"  {value:.0%} ({self._log.elapsed:.0f} s)")

        try:
            lines = await self._importd.wait(transfer, self._timeout, progress)
        except TransferFailed as exc:
            for line in exc.log:
                self._log.detail(f"importd: {line}")
            reasons = [line for line in exc.log if line.rstrip(".") not in ("Exiting", "Operation failed")]
            last = reasons[-1] if reasons else "importd gave no reason"
            raise ImportRefused(f"importd could not import it: {last}") from None
        for line in lines:
            self._log.detail(f"importd: {line}")


@contextlib.contextmanager
def _mounted_read_only(raw: Path) -> Iterator[Path]:
    """A disk image's file systems, attached read-only (set-up may use CLI tools: systemd-dissect)."""
    with tempfile.TemporaryDirectory(prefix="nspawn-mcp-import-") as mount_point:
        subprocess.run(
            ["systemd-dissect", "--read-only", "--mount", str(raw), mount_point],
            check=True,
            capture_output=True,
            timeout=300,
        )
        try:
            yield Path(mount_point)
        finally:
            subprocess.run(["umount", "--recursive", mount_point], check=False, capture_output=True)


async def import_image(
    importd: Importd,
    machined: Machined,
    catalog: Catalog,
    pool: Pool,
    request: ImportRequest,
    report: Report,
    timeout: float = TRANSFER_TIMEOUT,
) -> ImageEntry:
    """Import ``request.source`` as the template of ``request.name`` (see the module's steps).

    ``pool``: machined's image directory (:meth:`Pool.of`). Raises
    :class:`ImportRefused` when the source cannot be an image, with nothing left behind.
    """
    name = parse_image_name(request.name)
    source = request.source.absolute()
    kind = await anyio.to_thread.run_sync(_sniff, source)
    catalog.directory.mkdir(parents=True, exist_ok=True)
    tree = import_staging_image(name, "tree")
    raw = import_staging_image(name, "raw")
    built_at = datetime.now(UTC)
    with catalog.log_path(name).open("w") as log_file:
        steps = _Log(log_file, report)
        importer = _Importer(importd, steps, timeout)
        try:
            steps.step(f"importing {source} ({kind}) as image {name!r}")
            if kind == "raw":
                with _opened(source, kind) as fd:
                    await importer.run("raw", fd, raw)
                steps.step("copying the disk image's root filesystem into a tree")
                disk = pool.view / f"{raw}.raw"
                with _mounted_read_only(disk) as mounted, _opened(mounted, "directory") as fd:
                    await importer.run("directory", fd, tree)
                await _remove_quietly(machined, raw)
            else:
                with _opened(source, kind) as fd:
                    await importer.run(kind, fd, tree)
            steps.step("checking it has a shell, python3 and an os-release")
            os_release = await anyio.to_thread.run_sync(check_tree, pool.view / tree)
            replaced = pool.exists(template_image(name))
            await anyio.to_thread.run_sync(install_template, pool, tree, name)
            await machined.mark_image_read_only(template_image(name))
        except BaseException as exc:
            await _remove_quietly(machined, raw)
            await _remove_quietly(machined, tree)
            refusal = _refusal(exc)
            steps.detail(f"refused: {refusal}" if refusal else f"failed: {exc!r}")
            if refusal is not None and refusal is not exc:
                raise refusal from None
            raise
        entry = ImageEntry(
            name=name,
            description=request.description,
            source="import",
            origin=str(source),
            version=built_at.strftime("%Y%m%dT%H%M%S.%fZ"),
            built_at=built_at,
            build_seconds=round(steps.elapsed, 1),
            os_release=os_release,
        )
        catalog.put(entry)
        what = "replaced the older one" if replaced else "new"
        pretty = os_release.get("PRETTY_NAME") or os_release.get("ID") or "no name in its os-release"
        steps.step(f"image {name!r} is installed ({pretty}; {what}) in {steps.elapsed:.1f} s")
    return entry


async def import_into_pool(layout: Layout, request: ImportRequest) -> ImageEntry:
    """``nspawn-mcp image import``: connect to the daemons (the box where PID 1 is not systemd), import.

    A box started for this is stopped again, as ``nspawn-mcp setup`` does.
    """
    from ..backend.bus import Bus
    from ..box import find_box, host_runs_systemd, stop_box
    from ..runtime import find_daemons

    in_box = not host_runs_systemd()
    box_was_running = in_box and find_box(layout) is not None
    daemons = await anyio.to_thread.run_sync(find_daemons, layout)
    try:
        bus = await Bus.connect(daemons.bus_address)
        try:
            importd = await Importd.attach(bus)
            pool = Pool.of(layout, daemons.box_pid)
            return await import_image(
                importd, Machined(bus), Catalog(layout.images_dir), pool, request, print
            )
        finally:
            bus.disconnect()
    finally:
        if in_box and not box_was_running:
            stop_box(layout)
