"""The one exception hierarchy of nspawn-mcp.

Every message is written for the agent that made the request: it says what was
wrong and what is allowed, and never carries host secrets, tracebacks or raw D-Bus
text. The MCP layer turns each of these into a tool result with ``isError``.

::

    SandboxError                      base; anything the agent may read
    ├── InvalidRequest                the request itself is malformed (bad id, bad path syntax)
    ├── PolicyRefused                 the operator's policy forbids what was asked; names the rule
    ├── QuotaExceeded                 too many sandboxes, or a cap would be exceeded
    ├── NotFound                      no such sandbox (or it is not ours); never a daemon's missing object
    ├── SandboxGone                   the sandbox died underneath a request
    ├── CopyRefused                   a file operation was refused (type, size, path, no match)
    │   └── TooLarge                  a file is over a size cap (the caller names the policy rule)
    ├── ExecFailed                    the command could not be run at all (not the same as exit != 0)
    └── BackendError                  systemd/machined failed; ``retryable`` says if trying again may help
        ├── BackendUnavailable        the bus or a daemon is not reachable (retryable)
        └── NoSuchObject              a daemon has no machine, image, unit or file of that name; the
                                      backend decides what that means (a unit already stopped, an
                                      image not installed) and says it in its own words
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "CopyRefused",
    "ExecFailed",
    "InvalidRequest",
    "NoSuchObject",
    "NotFound",
    "PolicyRefused",
    "QuotaExceeded",
    "SandboxError",
    "SandboxGone",
    "TooLarge",
]


class SandboxError(Exception):
    """Base class: a failure whose message is safe to show to the agent."""


class InvalidRequest(SandboxError):
    """The request is malformed."""


class PolicyRefused(SandboxError):
    """The operator's policy refuses the request.

    ``rule`` names the policy field that refused, so operators can find it.
    """

    def __init__(self, message: str, *, rule: str) -> None:
        super().__init__(f"{message} (policy rule: {rule})")
        self.rule = rule


class QuotaExceeded(SandboxError):
    """Creating more would exceed a quota."""


class NotFound(SandboxError):
    """No sandbox with that id is managed by this server.

    Not for a daemon's missing machine, image or unit: that is :class:`NoSuchObject`,
    which the backend translates, so an agent never reads "no such sandbox" for it.
    """


class SandboxGone(SandboxError):
    """The sandbox stopped while a request was using it."""


class CopyRefused(SandboxError):
    """A file operation (copy_file or a file tool) was refused."""


class TooLarge(CopyRefused):
    """A file is larger than a cap the request carried; the service names the policy rule."""


class ExecFailed(SandboxError):
    """The command could not be started (not found, not executable, bad cwd)."""


class BackendError(SandboxError):
    """systemd or machined refused or failed an operation."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class BackendUnavailable(BackendError):
    """The system bus or one of the daemons cannot be reached."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


class NoSuchObject(BackendError):
    """machined or systemd knows no machine, image, unit (or file) of the name given.

    Raised by the D-Bus layer only. It is the backend's to interpret: a unit that is
    already gone may be fine, an image that is missing means ``nspawn-mcp setup`` was
    not run. Should one escape uninterpreted, its message names the operation, not a
    sandbox.
    """
