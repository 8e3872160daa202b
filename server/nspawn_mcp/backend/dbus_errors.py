"""The one place where D-Bus error names become nspawn-mcp errors.

Raw D-Bus error text can carry host paths and daemon internals, so it goes to the
server log only; the agent gets a message naming the operation.
"""

from __future__ import annotations

import errno
import logging
import os

from ..errors import BackendError, BackendUnavailable, NoSuchObject, SandboxError

__all__ = ["map_dbus_error"]

log = logging.getLogger(__name__)

_NO_SUCH_OBJECT = frozenset(
    {
        "org.freedesktop.machine1.NoSuchMachine",
        "org.freedesktop.machine1.NoSuchImage",
        "org.freedesktop.import1.NoSuchTransfer",
        "org.freedesktop.systemd1.NoSuchUnit",
        "org.freedesktop.systemd1.LoadFailed",
        "org.freedesktop.DBus.Error.FileNotFound",
    }
)
_UNAVAILABLE = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.Timeout",
        "org.freedesktop.DBus.Error.TimedOut",
        "org.freedesktop.DBus.Error.Disconnected",
        "org.freedesktop.DBus.Error.NoServer",
        "org.freedesktop.DBus.Error.LimitsExceeded",
    }
)


def map_dbus_error(name: str | None, text: str, operation: str) -> SandboxError:
    """Translate an error reply of ``operation`` into our hierarchy."""
    log.debug("D-Bus %s failed: %s: %s", operation, name, text)
    if name in _NO_SUCH_OBJECT:
        return NoSuchObject(f"{operation} failed: the system service has no such object")
    if name in _UNAVAILABLE:
        return BackendUnavailable(f"{operation}: the system service did not answer; try again")
    if name and name.startswith("System.Error."):
        code = getattr(errno, name.removeprefix("System.Error."), None)
        if code == errno.ENOENT:
            return NoSuchObject(f"{operation} failed: no such file or directory")
        if code is not None:
            return BackendError(f"{operation} failed: {os.strerror(code)}")
    if name == "org.freedesktop.systemd1.UnitExists":
        return BackendError(f"{operation}: a unit with that name already exists")
    if name == "org.freedesktop.import1.TransferInProgress":
        return BackendError(f"{operation}: another transfer of that image is under way", retryable=True)
    if name == "org.freedesktop.DBus.Error.InvalidArgs":
        return BackendError(f"{operation}: the system service refused the arguments")
    if name == "org.freedesktop.DBus.Error.AccessDenied":
        return BackendError(f"{operation}: access denied by the system service")
    if name == "org.freedesktop.DBus.Error.NoMemory":
        return BackendError(f"{operation}: the system service is out of memory", retryable=True)
    return BackendError(f"{operation} failed")
