"""Pure builder: a resolved plan plus names and paths -> what systemd is asked to run.

Modeled on systemd's ``units/systemd-nspawn@.service`` (Type=notify,
KillMode=mixed, Delegate=yes, DevicePolicy=closed) with the differences a
disposable sandbox needs:

- ``--keep-unit`` so the container stays in our service (and so in our slice,
  which carries the caps) instead of a scope machined would make;
- ``--settings=no`` so no ``.nspawn`` file can change the container
  (CVE-2026-40226 class);
- ``--private-users=pick --private-users-ownership=map``: root inside is an
  unprivileged uid outside, while files in the snapshot keep their real owners;
- ``--private-network``: loopback only (policies may choose the host's network instead);

- ``--as-pid2`` with the exec supervisor as payload. Its listening socket is the
  server's, passed as the service's standard input (``--console=pipe`` hands
  nspawn's stdin to the payload): nothing of the control path is a file the
  sandbox can write. (``--notify-ready=yes`` cannot be used for the supervisor's
  readiness: nspawn accepts READY=1 only from the container's PID 1, nspawn's stub
  init here. The backend asks the supervisor for a ``ping`` instead.)

What the service carries is inherited by nspawn and so by every process of the
sandbox: ``NoNewPrivileges`` (unless the policy lets setuid programs work inside)
and ``RestrictAddressFamilies``, an allow list of the socket families a sandbox
has a use for. Everything else is refused: ``AF_VSOCK`` above all (network
namespaces do not confine it; on a VM host it reaches the hypervisor), and
``AF_PACKET``, ``AF_ALG``, ``AF_KEY``, Bluetooth, CAN, TIPC, RDS, XDP and the
rest, which no agent workload needs and which carry most of the kernel's socket
CVEs.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass

from ..naming import machine_name, service_unit, slice_unit
from ..policy import ResolvedLimits, SandboxPlan
from .properties import ExecCommand

__all__ = [
    "ADDRESS_FAMILIES",
    "CONTAINER_LIB_DIR",
    "SUPERVISOR_LISTEN_FD",
    "SandboxPaths",
    "SandboxUnits",
    "build_units",
    "slice_caps",
    "supervisor_command",
]

NSPAWN = "/usr/bin/systemd-nspawn"
CONTAINER_LIB_DIR = "/run/nspawn-mcp/lib"
SUPERVISOR_LISTEN_FD = 0
"""The supervisor's listening socket: the service's standard input."""
ADDRESS_FAMILIES = ("AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK")
_USEC = 1_000_000
NSPAWN_KILLED_EXIT = 1
"""What nspawn exits with after it killed the container on SIGTERM (a stop of its unit)."""


@dataclass(frozen=True)
class SandboxPaths:
    """Where a sandbox's pieces live on the host."""

    root: str
    """The snapshot machined cloned, e.g. ``/var/lib/machines/sbx-1a2b3c4d``."""
    lib_dir: str
    """Host directory holding ``supervisor.py``, bound read-only at ``CONTAINER_LIB_DIR``."""


@dataclass(frozen=True)
class SandboxUnits:
    slice_name: str
    slice_properties: Mapping[str, object]
    service_name: str
    service_properties: Mapping[str, object]

    @property
    def argv(self) -> list[str]:
        exec_start: list[ExecCommand] = self.service_properties["ExecStart"]  # type: ignore[assignment]
        return list(exec_start[0][1])


def _network(plan: SandboxPlan) -> list[str]:
    if plan.network == "none":
        return ["--private-network"]
    if plan.network == "egress":
        return ["--network-veth"]  # host end ve-<id>; addressed and filtered by backend.network
    return []


def supervisor_command(lib_dir: str, listen: str, python: str = "/usr/bin/python3") -> list[str]:
    """The supervisor as a process: imported from ``lib_dir`` (so the bytecode the server compiled is
    used), listening on ``listen`` (``fd:N``, or a socket path where tests run it on the host)."""
    return [
        python,
        "-I",
        "-S",
        "-c",
        f"import sys; sys.path.insert(0, {lib_dir!r}); "
        "import supervisor; sys.exit(supervisor.main(sys.argv))",
        listen,
    ]


def nspawn_argv(sandbox_id: str, plan: SandboxPlan, paths: SandboxPaths) -> list[str]:

    return [
        NSPAWN,
        "--quiet",
        "--keep-unit",
        "--register=yes",
        "--settings=no",
        f"--machine={machine_name(sandbox_id)}",
        f"--directory={paths.root}",
        "--private-users=pick",
        "--private-users-ownership=map",
        *_network(plan),
        "--link-journal=no",
        "--resolv-conf=off",
        "--timezone=off",
        "--console=pipe",
        "--as-pid2",
        # on top of nspawn's own filter: io_uring bypasses seccomp for the operations it queues
        "--system-call-filter=~io_uring_setup io_uring_enter io_uring_register",
        "--setenv=MALLOC_ARENA_MAX=1",
        # nspawn's own /dev/shm may grow to a tenth of the host's memory, far past the sandbox's
        # cap: memory no process owns, which the OOM killer cannot take back
        f"--tmpfs=/dev/shm:mode=1777,size={plan.limits.memory_bytes // 4}",
        f"--bind-ro={paths.lib_dir}:{CONTAINER_LIB_DIR}",
        "--",
        *supervisor_command(CONTAINER_LIB_DIR, f"fd:{SUPERVISOR_LISTEN_FD}"),
    ]


def slice_caps(limits: ResolvedLimits) -> dict[str, object]:
    """The caps a sandbox's slice carries; a running slice takes new ones (a pooled sandbox's hand-out)."""
    return {
        "MemoryMax": limits.memory_bytes,
        "MemorySwapMax": 0,
        "TasksMax": limits.processes,
        "CPUQuotaPerSecUSec": round(limits.cpus * _USEC),
    }


def build_units(sandbox_id: str, plan: SandboxPlan, paths: SandboxPaths) -> SandboxUnits:
    limits = plan.limits
    slice_name = slice_unit(sandbox_id)
    argv = nspawn_argv(sandbox_id, plan, paths)
    return SandboxUnits(
        slice_name=slice_name,
        slice_properties={
            "Description": f"nspawn-mcp sandbox {sandbox_id} (policy {plan.policy})",
            "CollectMode": "inactive-or-failed",
            "MemoryAccounting": True,
            "TasksAccounting": True,
            "CPUAccounting": True,
            **slice_caps(limits),
        },
        service_name=service_unit(sandbox_id),
        service_properties={
            "Description": f"nspawn-mcp sandbox {sandbox_id}",
            "Slice": slice_name,
            "CollectMode": "inactive-or-failed",
            "Type": "notify",
            "NotifyAccess": "main",
            "ExecStart": [(NSPAWN, argv, False)],
            "KillMode": "mixed",
            "Delegate": True,
            "DevicePolicy": "closed",
            "DeviceAllow": [("char-pts", "rw")],
            "TimeoutStartUSec": 30 * _USEC,
            "TimeoutStopUSec": 5 * _USEC,
            # a destroy kills every process of the unit, nspawn included (SIGKILL: KillUnit), and a
            # stop of the unit makes nspawn kill the container (its --kill-signal is SIGKILL without
            # --boot) and exit 1, "container terminated by signal KILL". Both are the clean end of a
            # sandbox, not failures; one that dies on its own is reported by the daemon (machine_removed)
            "SuccessExitStatus": ([NSPAWN_KILLED_EXIT], [signal.SIGKILL.value]),
            # the daemon destroys the sandbox at its (extendable) expiry; its unit stops it at the
            # policy's longest lifetime even if no daemon runs (systemd 252 cannot change this later)
            "RuntimeMaxUSec": limits.lifetime_cap_seconds * _USEC,
            "StandardOutput": "journal",
            "StandardError": "journal",
            "NoNewPrivileges": plan.no_new_privileges,
            "RestrictAddressFamilies": (True, list(ADDRESS_FAMILIES)),
        },
    )
