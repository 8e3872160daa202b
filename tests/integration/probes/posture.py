"""Run inside a sandbox: try what a sandbox must not be able to do; print one JSON object."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
from collections.abc import Callable

libc = ctypes.CDLL(None, use_errno=True)

# x86_64 and aarch64 syscall numbers
SYSCALLS = {
    "x86_64": {
        "kexec_load": 246,
        "init_module": 175,
        "finit_module": 313,
        "open_by_handle_at": 304,
        "bpf": 321,
        "keyctl": 250,
        "add_key": 248,
        "perf_event_open": 298,
        "userfaultfd": 323,
        "io_uring_setup": 425,
        "swapon": 167,
        "reboot": 169,
        "settimeofday": 164,
    },
    "aarch64": {
        "kexec_load": 104,
        "init_module": 105,
        "finit_module": 273,
        "open_by_handle_at": 265,
        "bpf": 280,
        "keyctl": 219,
        "add_key": 217,
        "perf_event_open": 241,
        "userfaultfd": 282,
        "io_uring_setup": 425,
        "swapon": 224,
        "reboot": 142,
        "settimeofday": 170,
    },
}


def syscall(number: int) -> str:
    result = libc.syscall(number, 0, 0, 0, 0, 0)
    if result >= 0:
        return "allowed"
    return errno.errorcode.get(ctypes.get_errno(), "E?")


def attempt(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, "E?")
    return "allowed"


def write(path: str, data: str = "x") -> Callable[[], None]:
    def action() -> None:
        with open(path, "w") as target:
            target.write(data)

    return action


def read(path: str) -> Callable[[], None]:
    def action() -> None:
        with open(path, "rb") as source:
            source.read(16)

    return action


def kallsyms_hidden() -> bool:
    with open("/proc/kallsyms") as symbols:
        return all(line.startswith("0000000000000000") for line in symbols.readlines()[:50])


results = {name: syscall(number) for name, number in SYSCALLS[platform.machine()].items()}
results.update(
    {
        "read /proc/kcore": attempt(read("/proc/kcore")),
        "write /proc/sysrq-trigger": attempt(write("/proc/sysrq-trigger", "h")),
        "write core_pattern": attempt(write("/proc/sys/kernel/core_pattern", "|/bin/false")),
        "write uevent_helper": attempt(write("/sys/kernel/uevent_helper", "/bin/false")),
        "mknod /dev/sda": attempt(lambda: os.mknod("/root/sda", 0o600 | 0o060000, os.makedev(8, 0))),
        "read /dev/mem": attempt(read("/dev/mem")),
        "read /dev/kmsg": attempt(read("/dev/kmsg")),
        "kallsyms addresses": "hidden" if kallsyms_hidden() else "visible",
        "host dbus socket": "present" if os.path.exists("/run/dbus/system_bus_socket") else "absent",
        "systemd private socket": "present" if os.path.exists("/run/systemd/private") else "absent",
        "processes visible": str(len([p for p in os.listdir("/proc") if p.isdigit()])),
    }
)
print(json.dumps(results, sort_keys=True))
