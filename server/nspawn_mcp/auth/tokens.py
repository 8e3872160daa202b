"""Bearer tokens for the HTTP transport: a file of hashed tokens, managed by ``nspawn-mcp token``.

Threat: anyone who can reach the HTTP port, and anyone who can read the host's
files but is not root. A token is ``nsm_`` and 256 random bits; the file keeps only
its SHA-256, so a copy of the file grants nothing. The file is written atomically
(temporary file, fsync, rename) with mode 0600, and refused when group or others
may access it or when it is not owned by the user running nspawn-mcp (root).

Verification hashes the presented token once and compares the hash with every
entry with :func:`hmac.compare_digest`, never stopping early. The file is
re-read whenever it changes (inode, size, times, mode, owner), so ``token add``
and ``token remove`` take effect on the next request without a restart. A file
that turns missing, unsafe or malformed while the server runs admits nobody
(fail closed) and the log says why, once per change.

The file is TOML (rewritten by the command, so comments are not kept)::

    [tokens.ci-runner]
    sha256 = "9f86d081884c7d65..."   # of the whole token, its prefix included
    policies = ["default"]           # the policies it may use; empty or omitted: all
    created = 2025-05-01T12:00:00+00:00

Exceptions::

    TokenError                 a token command was refused: bad name, name taken, no such name
    └── TokenFileError         the token file is missing, unreadable, unsafe or malformed;
                               the message names the file and the line or field
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, StringConstraints, model_validator

from ..layout import Layout
from ..policy.loader import POLICY_NAME
from ..tomlfile import load_toml_model

__all__ = [
    "IDENTITY_NAME",
    "TOKEN_PREFIX",
    "TokenEntry",
    "TokenError",
    "TokenFile",
    "TokenFileError",
    "TokenIdentity",
    "TokenStore",
    "default_token_file",
    "parse_token_file",
    "render_token_file",
]

log = logging.getLogger(__name__)

IDENTITY_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
"""A token's name: the identity its bearer acts as (and a bare TOML key, so it is written unquoted)."""

TOKEN_PREFIX = "nsm_"  # noqa: S105 - a prefix, not a secret
"""Makes a leaked token recognisable (secret scanners, logs); part of what is hashed."""


def default_token_file(layout: Layout) -> Path:
    """Where the daemon and ``nspawn-mcp token`` find the tokens unless told otherwise."""
    return layout.state_dir / "tokens.toml"


_MAX_FILE_BYTES = 1 << 20
_MAX_TOKEN_CHARS = 512
"""Longer is not one of ours; not hashed at all."""

_HEADER = """\
# nspawn-mcp bearer tokens: SHA-256 hashes only, never the tokens themselves.
# Managed by `nspawn-mcp token add|list|remove`, which rewrites this file (comments are not kept).
# policies: the policies the token may use; empty or omitted: all of them."""


class TokenError(Exception):
    """A token command was refused; the message says why and what is allowed."""


class TokenFileError(TokenError):
    """The token file is missing, unreadable, unsafe or malformed; the message names the file and
    the line or field."""


IdentityName = Annotated[str, StringConstraints(pattern=IDENTITY_NAME.pattern)]
PolicyName = Annotated[str, StringConstraints(pattern=POLICY_NAME.pattern)]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class TokenEntry(BaseModel):
    """One token as stored: its hash, never the token."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: Sha256Hex
    policies: tuple[PolicyName, ...] = ()
    created: AwareDatetime


class TokenFile(BaseModel):
    """The whole token file: identity name -> entry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens: dict[IdentityName, TokenEntry] = {}

    @model_validator(mode="after")
    def _hashes_are_unique(self) -> Self:
        seen: dict[str, str] = {}
        for name, entry in self.tokens.items():
            if entry.sha256 in seen:
                raise ValueError(f"tokens {seen[entry.sha256]!r} and {name!r} have the same sha256")
            seen[entry.sha256] = name
        return self


@dataclass(frozen=True)
class TokenIdentity:
    """Who a token's bearer is: its name, and the policies it may use (empty: all)."""

    name: str
    policies: tuple[str, ...]
    created: datetime

    def may_use(self, policy: str) -> bool:
        return not self.policies or policy in self.policies


def _identity(name: str, entry: TokenEntry) -> TokenIdentity:
    return TokenIdentity(name=name, policies=entry.policies, created=entry.created)


def parse_token_file(text: str, source: str) -> TokenFile:
    """Parse and validate; errors name ``source`` and the line (TOML syntax) or the field (content)."""
    return load_toml_model(TokenFile, text, source, what="token file", error=TokenFileError)


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped, the rest as is."""
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__} here")


def render_token_file(data: TokenFile) -> str:
    """The file's text; written from the model's fields, so a new field is written too."""
    lines = [_HEADER]
    for name, entry in sorted(data.tokens.items()):
        lines += ["", f"[tokens.{name}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in entry.model_dump().items()]
    return "\n".join(lines) + "\n"


_FileKey = tuple[int, int, int, int, int, int, int]


def _file_key(info: os.stat_result) -> _FileKey:
    """What changes when the file is replaced, edited, chmod-ed or chown-ed."""
    return (
        info.st_dev,
        info.st_ino,
        info.st_size,
        info.st_mtime_ns,
        info.st_ctime_ns,
        info.st_mode,
        info.st_uid,
    )


def _check_name(name: str) -> None:
    if not IDENTITY_NAME.match(name):
        raise TokenError(f"bad token name {name!r}: names must match {IDENTITY_NAME.pattern}")


def _check_policies(policies: Iterable[str]) -> tuple[str, ...]:
    checked = tuple(dict.fromkeys(policies))
    for policy in checked:
        if not POLICY_NAME.match(policy):
            raise TokenError(f"bad policy name {policy!r}: policy names match {POLICY_NAME.pattern}")
    return checked


class TokenStore:
    """The token file at ``path``: managed by the ``token`` command, verified by the HTTP server.

    The mutating methods and :meth:`load` raise :class:`TokenFileError` for a file that
    cannot be trusted; :meth:`verify` never does (it admits nobody instead).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._loaded_key: _FileKey | None = None
        self._entries: tuple[tuple[bytes, TokenIdentity], ...] = ()
        self._problem: str | None = None

    # -- reading --------------------------------------------------------------------------------

    def _read(self) -> tuple[_FileKey, TokenFile]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TokenFileError(
                f"{self.path}: no such file (`nspawn-mcp token add NAME` creates it)"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise TokenFileError(f"{self.path}: a symbolic link; refusing to follow it") from None
            raise TokenFileError(f"{self.path}: cannot open the token file: {_reason(exc)}") from None
        try:
            info = os.fstat(fd)
            _check_safe(self.path, info)
            raw = os.read(fd, _MAX_FILE_BYTES + 1)
            if len(raw) > _MAX_FILE_BYTES:
                raise TokenFileError(f"{self.path}: larger than {_MAX_FILE_BYTES} bytes; not a token file")
        except OSError as exc:
            raise TokenFileError(f"{self.path}: cannot read the token file: {_reason(exc)}") from None
        finally:
            os.close(fd)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TokenFileError(f"{self.path}: not UTF-8 (byte {exc.start})") from None
        return _file_key(info), parse_token_file(text, str(self.path))

    def load(self) -> TokenFile:
        """The file's content, checked; raises :class:`TokenFileError` (a missing file included)."""
        return self._read()[1]

    def identities(self) -> list[TokenIdentity]:
        """Every token's identity, by name; raises :class:`TokenFileError`."""
        return [_identity(name, entry) for name, entry in sorted(self.load().tokens.items())]

    # -- changing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked_directory(self) -> Iterator[int]:
        """The file's directory, locked against other ``token`` commands (read, change, write)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def _current_or_empty(self) -> TokenFile:
        try:
            return self.load()
        except TokenFileError:
            if self.path.exists() or self.path.is_symlink():
                raise
            return TokenFile()

    def _write(self, directory_fd: int, data: TokenFile) -> None:
        """Atomically: a 0600 temporary file beside it, fsync, rename over, fsync the directory."""
        temporary = f".{self.path.name}.{secrets.token_hex(6)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o600, dir_fd=directory_fd)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(render_token_file(data).encode("utf-8"))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.rename(temporary, self.path.name, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=directory_fd)
            raise
        finally:
            os.close(fd)
        os.fsync(directory_fd)

    def add(self, name: str, policies: Iterable[str] = (), *, replace: bool = False) -> str:
        """Create a token for ``name`` and return it: the only time it exists outside its holder."""
        _check_name(name)
        checked = _check_policies(policies)
        with self._locked_directory() as directory_fd:
            current = self._current_or_empty()
            if name in current.tokens and not replace:
                raise TokenError(f"a token named {name!r} exists; give --replace to replace it")
            token = TOKEN_PREFIX + secrets.token_urlsafe(32)
            entry = TokenEntry(
                sha256=hashlib.sha256(token.encode()).hexdigest(),
                policies=checked,
                created=datetime.now(UTC).replace(microsecond=0),
            )
            self._write(directory_fd, TokenFile(tokens={**current.tokens, name: entry}))
        return token

    def remove(self, name: str) -> None:
        _check_name(name)
        with self._locked_directory() as directory_fd:
            current = self.load()
            if name not in current.tokens:
                raise TokenError(f"no token named {name!r} in {self.path}")
            rest = {other: entry for other, entry in current.tokens.items() if other != name}
            self._write(directory_fd, TokenFile(tokens=rest))

    # -- verifying ------------------------------------------------------------------------------

    def _current_entries(self) -> tuple[tuple[bytes, TokenIdentity], ...]:
        """The entries of the file as it is now: re-read when it changed; none if it cannot be trusted."""
        try:
            key: _FileKey | None = _file_key(os.stat(self.path, follow_symlinks=False))
        except OSError:
            key = None
        with self._lock:
            if key is not None and key == self._loaded_key:
                return self._entries
            problem = None
            try:
                key, data = self._read()
                entries = tuple(
                    (bytes.fromhex(entry.sha256), _identity(name, entry))
                    for name, entry in data.tokens.items()
                )
            except TokenFileError as exc:
                problem, entries = str(exc), ()
            if problem != self._problem:
                if problem is not None:
                    log.error("bearer tokens: admitting nobody: %s", problem)
                else:
                    log.info("bearer tokens: %d loaded from %s", len(entries), self.path)
                self._problem = problem
            self._loaded_key, self._entries = key, entries
            return entries

    def verify(self, presented: str) -> TokenIdentity | None:
        """The identity whose token ``presented`` is, or None; never raises for a bad file."""
        if not presented or len(presented) > _MAX_TOKEN_CHARS:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for expected, identity in self._current_entries():
            if hmac.compare_digest(expected, digest):
                found = identity
        return found


def _check_safe(path: Path, info: os.stat_result) -> None:
    """Refuse a file that someone other than us could have written or could read."""
    if not stat.S_ISREG(info.st_mode):
        raise TokenFileError(f"{path}: not a regular file")
    if info.st_uid != os.geteuid():
        raise TokenFileError(
            f"{path}: owned by uid {info.st_uid}, not by uid {os.geteuid()} that runs nspawn-mcp; "
            "refusing to use it (chown it, or recreate it with `nspawn-mcp token add`)"
        )
    if info.st_mode & 0o077:
        raise TokenFileError(
            f"{path}: group or others may access it (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"refusing to use it: run `chmod 600 {path}`"
        )
    if info.st_size > _MAX_FILE_BYTES:
        raise TokenFileError(f"{path}: larger than {_MAX_FILE_BYTES} bytes; not a token file")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
