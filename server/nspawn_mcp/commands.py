"""Pure checks of what an agent sends with a command: argv, environment, user, process ids,
cursors and signals. Each refusal says what was wrong and what is allowed."""

from __future__ import annotations

import re
import signal as signal_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from .backend.api import CommandOutcome
from .errors import InvalidRequest

__all__ = [
    "CommandRequest",
    "Keep",
    "SignalName",
    "argv",
    "environment",
    "fit_output",
    "killed_by_sigkill",
    "merged_environment",
    "parse_cursor",
    "process_id",
    "sandbox_environment",
    "signal_name",
    "signal_number",
    "summary",
    "user_name",
]

SIGKILL = 9
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_PROCESS_ID = re.compile(r"^p[0-9]{1,9}$")
_CURSOR = re.compile(r"^([0-9]{1,15}):([0-9]{1,15})$")
SignalName = Literal["TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT"]
"""The signals an agent may send by name (kill_process's schema offers exactly these)."""
_SIGNALS: tuple[str, ...] = get_args(SignalName)
Keep = Literal["head", "tail"]
"""Which end of an output over its cap is kept."""
_MAX_ARGV = 4096
_MAX_COMMAND_BYTES = 1 << 20
_MAX_ENV = 256
SANDBOX_ENV_COUNT = 64
SANDBOX_ENV_VALUE_BYTES = 32 << 10
SANDBOX_ENV_TOTAL_BYTES = 64 << 10


@dataclass(frozen=True)
class CommandRequest:
    """One command as an agent asked for it; checked against the policy when it is run."""

    command: str | Sequence[str]
    """A shell string (run by /bin/sh -c) or an argv list."""
    cwd: str | None = None
    env: Mapping[str, str] | None = None
    stdin: str | None = None
    timeout_seconds: float | None = None
    user: str = "root"


def user_name(value: str) -> str:
    if not _USER_NAME.match(value):
        raise InvalidRequest(f"invalid user {value[:40]!r}: 'root', or a user of the image such as 'sandbox'")
    return value


def summary(command: str | Sequence[str]) -> str:
    """The command as the audit log shows it: one string, at most 1,000 characters."""
    text = command if isinstance(command, str) else " ".join(command)
    return text[:1000]


def killed_by_sigkill(outcome: CommandOutcome) -> bool:
    """SIGKILL, directly or as a shell's 128+9: how the OOM killer's victims end."""
    return outcome.signal == SIGKILL or outcome.exit_code == 128 + SIGKILL


def process_id(value: str) -> str:

    if not _PROCESS_ID.match(value):
        raise InvalidRequest(f"invalid process_id {value[:40]!r}: ids look like 'p1' (from exec_in_sandbox)")
    return value


def parse_cursor(since: str | None) -> tuple[int, int]:
    if not since:
        return 0, 0
    match = _CURSOR.match(since)
    if match is None:
        raise InvalidRequest(f"invalid cursor {since[:40]!r}: pass the next_cursor of a previous read")
    return int(match.group(1)), int(match.group(2))


def signal_number(value: str | int) -> int:
    if isinstance(value, int):
        if 1 <= value <= 64:
            return value
    else:
        name = value.upper().removeprefix("SIG")
        number = getattr(signal_module.Signals, f"SIG{name}", None)
        if number is not None and name in _SIGNALS:
            return int(number)
    raise InvalidRequest(f"invalid signal {str(value)[:20]!r}: use one of {', '.join(_SIGNALS)} or 1-64")


def signal_name(number: int) -> str:
    """'TERM' for 15; the number itself for a signal without a name here."""
    try:
        return signal_module.Signals(number).name.removeprefix("SIG")
    except ValueError:
        return str(number)


def fit_output(stdout: bytes, stderr: bytes, budget: int, keep: Keep) -> tuple[bytes, bytes, bool]:
    """Both streams cut to ``budget`` bytes together (each keeps its ``keep`` end); True if cut.

    A stream smaller than its half keeps all of it and leaves the rest to the other.
    """
    if len(stdout) + len(stderr) <= budget:
        return stdout, stderr, False
    half = budget // 2
    out_room = max(half, budget - len(stderr))
    out_room = min(out_room, len(stdout))
    err_room = min(budget - out_room, len(stderr))

    def cut(data: bytes, room: int) -> bytes:
        if len(data) <= room:
            return data
        return data[len(data) - room :] if keep == "tail" else data[:room]

    return cut(stdout, out_room), cut(stderr, err_room), True


def argv(command: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(command, str):
        if not command.strip():
            raise InvalidRequest("command is empty; give a shell command string or an argv list")
        argv: tuple[str, ...] = ("/bin/sh", "-c", command)
    else:
        argv = tuple(command)
        if not argv or not argv[0]:
            raise InvalidRequest("command is empty; give a shell command string or a non-empty argv list")
        if len(argv) > _MAX_ARGV:
            raise InvalidRequest(f"command has {len(argv)} arguments; at most {_MAX_ARGV} are allowed")
    if any("\x00" in part for part in argv):
        raise InvalidRequest("command contains a NUL byte")
    if sum(len(part.encode("utf-8", errors="surrogatepass")) for part in argv) > _MAX_COMMAND_BYTES:
        raise InvalidRequest(f"command is longer than {_MAX_COMMAND_BYTES} bytes")
    return argv


def environment(env: Mapping[str, str]) -> dict[str, str]:
    if len(env) > _MAX_ENV:
        raise InvalidRequest(f"env has {len(env)} variables; at most {_MAX_ENV} are allowed")
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise InvalidRequest(
                f"invalid environment variable name {name[:64]!r}: use letters, digits and '_'"
            )
        if "\x00" in value:
            raise InvalidRequest(f"environment variable {name} contains a NUL byte")
    return dict(env)


def sandbox_environment(env: Mapping[str, str]) -> dict[str, str]:
    """Check create_sandbox's ``env``: POSIX-style names, no NUL, bounded in count and size."""
    if len(env) > SANDBOX_ENV_COUNT:
        raise InvalidRequest(f"env has {len(env)} variables; at most {SANDBOX_ENV_COUNT} are allowed")
    total = 0
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise InvalidRequest(
                f"invalid environment variable name {name[:64]!r}: use letters, digits and '_', "
                "not starting with a digit, at most 128 characters"
            )
        if "\x00" in value:
            raise InvalidRequest(f"environment variable {name} contains a NUL byte")
        size = len(value.encode("utf-8", errors="surrogatepass"))
        if size > SANDBOX_ENV_VALUE_BYTES:
            raise InvalidRequest(
                f"environment variable {name} is {size} bytes long; "
                f"at most {SANDBOX_ENV_VALUE_BYTES} are allowed"
            )
        total += len(name) + size
    if total > SANDBOX_ENV_TOTAL_BYTES:
        raise InvalidRequest(f"env is {total} bytes in all; at most {SANDBOX_ENV_TOTAL_BYTES} are allowed")
    return dict(env)


def merged_environment(
    image: Mapping[str, str], sandbox: Mapping[str, str], command: Mapping[str, str]
) -> dict[str, str]:
    """A command's environment: the image's, under the sandbox's (create_sandbox), under the command's own."""
    return {**image, **sandbox, **command}
