"""The unit properties nspawn-mcp sets, with their D-Bus signatures.

A pure table (no D-Bus import): ``encode`` checks names and value shapes before
anything reaches systemd, so a typo is an error here rather than a confusing
``InvalidArgs`` reply. Only properties listed here can be set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

__all__ = ["SIGNATURES", "ExecCommand", "encode"]

ExecCommand = tuple[str, Sequence[str], bool]
"""One ``ExecStart`` entry: (binary, argv including argv[0], ignore-failure)."""

SIGNATURES: Mapping[str, str] = {
    # unit
    "Description": "s",
    "DefaultDependencies": "b",
    "CollectMode": "s",
    "AddRef": "b",
    "StartLimitIntervalUSec": "t",
    # service
    "Type": "s",
    "ExecStart": "a(sasb)",
    "NotifyAccess": "s",
    "KillMode": "s",
    "KillSignal": "i",
    "SendSIGHUP": "b",
    "TimeoutStartUSec": "t",
    "TimeoutStopUSec": "t",
    "RuntimeMaxUSec": "t",
    "Restart": "s",
    "RestartUSec": "t",
    "RestartPreventExitStatus": "(aiai)",
    "SuccessExitStatus": "(aiai)",
    "Environment": "as",
    "WorkingDirectory": "s",
    "StandardInputFileDescriptor": "h",
    "StandardOutput": "s",
    "StandardError": "s",
    "SyslogIdentifier": "s",
    # cgroup
    "Slice": "s",
    "Delegate": "b",
    "MemoryAccounting": "b",
    "MemoryMax": "t",
    "MemorySwapMax": "t",
    "TasksAccounting": "b",
    "TasksMax": "t",
    "CPUAccounting": "b",
    "CPUQuotaPerSecUSec": "t",
    "DevicePolicy": "s",
    "DeviceAllow": "a(ss)",
    # sandboxing of the service, inherited by everything in the container
    "NoNewPrivileges": "b",
    "RestrictAddressFamilies": "(bas)",
}


def _conforms(value: object, signature: str) -> bool:
    if signature == "s":
        return isinstance(value, str)
    if signature == "b":
        return isinstance(value, bool)
    if signature in ("t", "i", "h"):
        # "h": the index of a descriptor passed along with the call
        return isinstance(value, int) and not isinstance(value, bool) and (signature == "i" or value >= 0)
    if signature == "as":
        return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
    if signature == "a(ss)":
        return isinstance(value, list | tuple) and all(
            isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in value
        )
    if signature == "(bas)":
        return (
            isinstance(value, tuple)
            and len(value) == 2
            and isinstance(value[0], bool)
            and isinstance(value[1], list | tuple)
            and all(isinstance(v, str) for v in value[1])
        )
    if signature == "(aiai)":  # exit statuses, signals
        return (
            isinstance(value, tuple)
            and len(value) == 2
            and all(
                isinstance(part, list | tuple)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in part)
                for part in value
            )
        )
    if signature == "a(sasb)":
        return isinstance(value, list | tuple) and all(
            isinstance(v, tuple)
            and len(v) == 3
            and isinstance(v[0], str)
            and isinstance(v[1], list | tuple)
            and isinstance(v[2], bool)
            for v in value
        )
    return False


def _normalise(value: object, signature: str) -> object:
    if signature == "a(sasb)":
        return [[binary, list(argv), ignore] for binary, argv, ignore in value]  # type: ignore[attr-defined]
    if signature == "a(ss)":
        return [list(pair) for pair in value]  # type: ignore[attr-defined]
    if signature == "as":
        return list(value)  # type: ignore[call-overload]
    if signature == "(bas)":
        allow, names = cast(tuple[bool, Sequence[str]], value)
        return [allow, list(names)]
    if signature == "(aiai)":
        statuses, signals = cast(tuple[Sequence[int], Sequence[int]], value)
        return [list(statuses), list(signals)]
    return value


def encode(properties: Mapping[str, object]) -> list[tuple[str, str, object]]:
    """``{"MemoryMax": 1<<29}`` -> ``[("MemoryMax", "t", 536870912)]``, validated."""
    encoded: list[tuple[str, str, object]] = []
    for name, value in properties.items():
        signature = SIGNATURES.get(name)
        if signature is None:
            raise ValueError(f"unit property {name!r} is not in the property table")
        if not _conforms(value, signature):
            raise ValueError(f"unit property {name!r} needs D-Bus type {signature}, got {value!r}")
        encoded.append((name, signature, _normalise(value, signature)))
    return encoded
