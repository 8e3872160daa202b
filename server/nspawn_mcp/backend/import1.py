"""Client for ``org.freedesktop.import1`` (systemd-importd): importing images into the pool.

importd (systemd 252, ``org.freedesktop.import1(5)``) takes the source as a file
descriptor, so it never opens a path of ours: ``ImportTar`` a tar file (plain, gzip,
bzip2 or xz), ``ImportRaw`` a raw or qcow2 disk image (it becomes ``NAME.raw``),
``ImportFileSystem`` a directory. Each returns at once with a transfer; the transfer
ends with the ``TransferRemoved`` signal, whose result is ``done``, ``canceled`` or
``failed``. While it runs, the transfer object has a ``Progress`` property (0..1,
known only for regular files) and sends ``LogMessage`` signals (what the importer
printed), which are the only explanation of a failure there is.

Signals are matched before a method is called and remembered until collected, so a
transfer that ends before its caller resumes is not missed.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio
from dbus_fast import Message

from ..errors import BackendError, NoSuchObject
from .bus import Bus

__all__ = ["ImportKind", "Importd", "Transfer", "TransferFailed"]

_DEST = "org.freedesktop.import1"
_PATH = "/org/freedesktop/import1"
_MANAGER = "org.freedesktop.import1.Manager"
_TRANSFER = "org.freedesktop.import1.Transfer"

_REMEMBERED = 256
_LOG_LINES = 200
_PROGRESS_INTERVAL = 0.5

ImportKind = Literal["tar", "raw", "directory"]
_METHOD: dict[ImportKind, str] = {"tar": "ImportTar", "raw": "ImportRaw", "directory": "ImportFileSystem"}


class TransferFailed(BackendError):
    """importd ended the transfer without success; ``log`` is what the importer printed."""

    def __init__(self, message: str, *, result: str, log: tuple[str, ...]) -> None:
        super().__init__(message)
        self.result = result
        self.log = log


@dataclass(frozen=True)
class Transfer:
    transfer_id: int
    path: str
    local_name: str


@dataclass
class _Record:
    """What the signals told about one transfer so far."""

    log: deque[str] = field(default_factory=lambda: deque(maxlen=_LOG_LINES))
    result: str | None = None
    ended: anyio.Event = field(default_factory=anyio.Event)


class Importd:
    """Starts imports and waits for them; one instance per bus connection."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._records: OrderedDict[str, _Record] = OrderedDict()

    @classmethod
    async def attach(cls, bus: Bus) -> Importd:
        importd = cls(bus)
        bus.add_signal_handler(importd._on_signal)
        await bus.add_match(f"type='signal',sender='{_DEST}',interface='{_MANAGER}',member='TransferRemoved'")
        await bus.add_match(f"type='signal',sender='{_DEST}',interface='{_TRANSFER}',member='LogMessage'")
        return importd

    def _record(self, path: str) -> _Record:
        record = self._records.get(path)
        if record is None:
            record = self._records[path] = _Record()
            while len(self._records) > _REMEMBERED:
                self._records.popitem(last=False)
        return record

    def _on_signal(self, message: Message) -> None:
        if message.interface == _MANAGER and message.member == "TransferRemoved":
            _transfer_id, path, result = message.body
            record = self._record(str(path))
            record.result = str(result)
            record.ended.set()
        elif message.interface == _TRANSFER and message.member == "LogMessage" and message.path:
            _priority, line = message.body
            self._record(message.path).log.append(str(line))

    async def start(self, kind: ImportKind, fd: int, local_name: str, *, force: bool = False) -> Transfer:
        """Start importing what ``fd`` refers to as the (writable) image ``local_name``.

        The fd is the caller's: importd gets its own copy with the call, so it may be
        closed as soon as this returns.
        """
        transfer_id, path = await self._bus.call(
            destination=_DEST,
            path=_PATH,
            interface=_MANAGER,
            member=_METHOD[kind],
            signature="hsbb",
            body=[0, local_name, force, False],
            unix_fds=[fd],
            operation=f"importing image {local_name}",
        )
        return Transfer(transfer_id=int(transfer_id), path=str(path), local_name=local_name)

    async def progress(self, transfer: Transfer) -> float | None:
        """How far the transfer is (0..1); None once it is gone or when importd cannot tell."""
        try:
            value = await self._bus.get_property(
                destination=_DEST,
                path=transfer.path,
                interface=_TRANSFER,
                name="Progress",
                operation=f"reading the progress of importing {transfer.local_name}",
            )
        except BackendError:
            return None
        return float(value) if isinstance(value, float) and 0.0 <= value <= 1.0 else None

    async def wait(
        self,
        transfer: Transfer,
        timeout: float,
        on_progress: Callable[[float | None], Awaitable[None]] | None = None,
    ) -> tuple[str, ...]:
        """Wait until ``transfer`` ends; return its log, or raise :class:`TransferFailed` with it.

        ``on_progress`` hears the progress about twice a second. On timeout (and on
        cancellation) the transfer is cancelled, so importd removes what it made.
        """
        record = self._record(transfer.path)
        try:
            with anyio.fail_after(timeout):
                while not record.ended.is_set():
                    with anyio.move_on_after(_PROGRESS_INTERVAL):
                        await record.ended.wait()
                    if on_progress is not None and not record.ended.is_set():
                        await on_progress(await self.progress(transfer))
        except TimeoutError:
            with anyio.CancelScope(shield=True):
                await self.cancel(transfer)
            raise TransferFailed(
                f"importing {transfer.local_name} did not finish in {timeout:g} s; it was cancelled",
                result="timeout",
                log=tuple(record.log),
            ) from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.cancel(transfer)
            raise
        finally:
            self._records.pop(transfer.path, None)
        log = tuple(record.log)
        if record.result != "done":
            raise TransferFailed(
                f"importing {transfer.local_name} {record.result or 'failed'}",
                result=str(record.result),
                log=log,
            )
        return log

    async def cancel(self, transfer: Transfer) -> None:
        """Cancel the transfer; one that already ended is fine."""
        with contextlib.suppress(NoSuchObject):
            await self._bus.call(
                destination=_DEST,
                path=_PATH,
                interface=_MANAGER,
                member="CancelTransfer",
                signature="u",
                body=[transfer.transfer_id],
                operation=f"cancelling the import of {transfer.local_name}",
            )
