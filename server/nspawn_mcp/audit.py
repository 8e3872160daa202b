"""The audit log: one JSON line per decision (who, what, allowed or refused, which rule).

Who: the client's identity (and, as a label, what it calls itself), set per
connection by the daemon through a context variable (:mod:`nspawn_mcp.identity`) so
the service does not have to pass it around.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import anyio

from .errors import PolicyRefused, SandboxError
from .identity import current_client

__all__ = ["AuditLog"]

log = logging.getLogger(__name__)


class AuditLog:
    """Appends decisions to a JSON-lines file (or nowhere, with ``path=None``)."""

    def __init__(self, path: Path | None) -> None:
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed by close()

    def record(
        self,
        action: str,
        *,
        sandbox_id: str | None = None,
        error: BaseException | None = None,
        detail: Mapping[str, object] | None = None,
    ) -> None:
        client = current_client.get()
        entry: dict[str, object] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "client": client.identity,
            "action": action,
            "allowed": error is None,
        }
        if client.label:
            entry["client_label"] = client.label
        if sandbox_id is not None:
            entry["sandbox_id"] = sandbox_id
        if isinstance(error, PolicyRefused):
            entry["rule"] = error.rule
        if isinstance(error, SandboxError):
            entry["reason"] = str(error)
        elif isinstance(error, anyio.get_cancelled_exc_class()):
            entry["reason"] = "cancelled"
        elif error is not None:
            entry["reason"] = f"internal error ({type(error).__name__})"
        entry.update(detail or {})
        if self._file is None:
            return
        line = json.dumps(entry, default=str)
        with self._lock:
            try:
                self._file.write(line + "\n")
            except OSError as exc:
                log.warning("cannot write the audit log: %s", exc)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
