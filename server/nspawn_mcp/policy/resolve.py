"""Turning (operator policy, agent request) into a plan, or a refusal naming the rule.

Pure: no D-Bus, no filesystem, no clock. The backend runs only what comes out of
here, so everything a sandbox may do is decided in this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidRequest, PolicyRefused
from .models import Policy
from .paths import check_mount_target, confine_host_path, resolve_allowed_roots

__all__ = [
    "CreateRequest",
    "EgressPlan",
    "ExecPlan",
    "ExecRequest",
    "ResolvedLimits",
    "SandboxPlan",
    "resolve_create",
    "resolve_exec",
]

_MiB = 1 << 20


@dataclass(frozen=True)
class MountRequest:
    """A host path to bind into the sandbox."""

    host: str
    sandbox: str
    writable: bool = False


@dataclass(frozen=True)
class CreateRequest:
    """What an agent asked for; ``None`` means "the policy's default"."""

    image: str = "default"
    policy: str = "default"
    memory_mb: int | None = None
    cpus: float | None = None
    max_processes: int | None = None
    ttl_seconds: int | None = None
    mounts: tuple[MountRequest, ...] = ()
    disk_mb: int | None = None


@dataclass(frozen=True)
class BindMount:
    """A bind the policy allowed. ``source`` is checked again, beneath ``root``, when it is opened.

    Binds are always ``nosuid,nodev``; ``noexec`` when the allowed root says so.
    ``device`` and ``inode`` identify the source as the service found it on the host
    (0 until then): the very object mounted later must be that one.
    """

    root: str
    source: str
    target: str
    writable: bool
    noexec: bool = False
    device: int = 0
    inode: int = 0


@dataclass(frozen=True)
class ResolvedLimits:
    memory_bytes: int
    cpus: float
    processes: int
    ttl_seconds: int
    disk_bytes: int | None = None
    max_ttl_seconds: int | None = None
    """The longest the sandbox may live, extensions included (the policy's maximum); its unit
    enforces it even when the daemon is not running. None (records of older versions): ttl_seconds."""

    @property
    def lifetime_cap_seconds(self) -> int:
        return self.ttl_seconds if self.max_ttl_seconds is None else self.max_ttl_seconds


@dataclass(frozen=True)
class EgressPlan:
    """What an 'egress' sandbox may reach; ``subnet`` is its /30, given when it is created."""

    rules: tuple[tuple[str, tuple[int, ...]], ...]
    domains: tuple[str, ...]
    domain_ports: tuple[int, ...]
    upstream_dns: str | None
    private_dns_answers: bool = False
    subnet: str | None = None


@dataclass(frozen=True)
class SandboxPlan:
    """Everything about a sandbox that the policy decided."""

    policy: str
    image: str
    limits: ResolvedLimits
    network: Literal["none", "egress", "host"]
    allowed_host_roots: tuple[str, ...]
    mounts: tuple[BindMount, ...] = ()
    egress: EgressPlan | None = None
    no_new_privileges: bool = True


@dataclass(frozen=True)
class ExecRequest:
    timeout_seconds: float | None = None
    stdin_bytes: int = 0


@dataclass(frozen=True)
class ExecPlan:
    timeout_seconds: float
    max_output_bytes: int


def _pick(
    asked: float | None, default: float, maximum: float, *, field: str, unit: str, minimum: float, rule: str
) -> float:
    if asked is None:
        return default
    if math.isnan(asked) or asked < minimum:
        raise InvalidRequest(f"{field} must be at least {minimum:g}{unit}")
    if asked > maximum:
        raise PolicyRefused(f"{field}={asked:g}{unit} is above the maximum {maximum:g}{unit}", rule=rule)
    return asked


def resolve_create(
    policy_name: str,
    policy: Policy,
    request: CreateRequest,
    *,
    cwd: str,
    also_allowed: tuple[str, ...] = (),
) -> SandboxPlan:
    """Resolve a create request against ``policy``; ``also_allowed``: images the policy allows
    besides its list (snapshots it kept as images)."""
    if request.image not in (*policy.sandboxes.images, *also_allowed):
        raise PolicyRefused(
            f"image {request.image!r} is not allowed by policy {policy_name!r}; it allows: "
            f"{', '.join(policy.sandboxes.images)} (list_images shows which are installed)",
            rule="sandboxes.images",
        )
    default, maximum = policy.limits.default, policy.limits.max
    memory_mb = _pick(
        request.memory_mb,
        default.memory // _MiB,
        maximum.memory // _MiB,
        field="memory_mb",
        unit=" MiB",
        minimum=32,
        rule="limits.max.memory",
    )
    cpus = _pick(
        request.cpus, default.cpus, maximum.cpus, field="cpus", unit="", minimum=0.01, rule="limits.max.cpus"
    )
    processes = _pick(
        request.max_processes,
        default.processes,
        maximum.processes,
        field="max_processes",
        unit="",
        minimum=8,
        rule="limits.max.processes",
    )
    ttl = _pick(
        request.ttl_seconds,
        default.ttl_seconds,
        maximum.ttl_seconds,
        field="ttl_seconds",
        unit=" s",
        minimum=10,
        rule="limits.max.ttl_seconds",
    )
    memory_bytes = default.memory if request.memory_mb is None else int(memory_mb) * _MiB
    disk_bytes = _pick_disk(request.disk_mb, default.disk, maximum.disk)
    return SandboxPlan(
        policy=policy_name,
        image=request.image,
        limits=ResolvedLimits(
            memory_bytes=memory_bytes,
            cpus=float(cpus),
            processes=int(processes),
            ttl_seconds=int(ttl),
            disk_bytes=disk_bytes,
            max_ttl_seconds=maximum.ttl_seconds,
        ),
        network=policy.network.mode,
        allowed_host_roots=resolve_allowed_roots(policy.files.allowed_host_dirs, cwd),
        mounts=_resolve_mounts(policy, request.mounts, cwd),
        egress=_egress_plan(policy) if policy.network.mode == "egress" else None,
        no_new_privileges=policy.exec.no_new_privileges,
    )


def _egress_plan(policy: Policy) -> EgressPlan:
    network = policy.network
    return EgressPlan(
        rules=tuple((str(rule.cidr), tuple(rule.ports)) for rule in network.allow),
        domains=tuple(network.domains),
        domain_ports=tuple(network.domain_ports),
        upstream_dns=str(network.upstream_dns) if network.upstream_dns else None,
        private_dns_answers=network.private_dns_answers,
    )


def _pick_disk(asked_mb: int | None, default: int | None, maximum: int | None) -> int | None:
    if asked_mb is None:
        return default if default is not None else maximum

    if maximum is None:
        raise PolicyRefused(
            "this policy sets no disk quotas, so disk_mb cannot be chosen", rule="limits.max.disk"
        )
    disk = _pick(
        asked_mb,
        0,
        maximum // _MiB,
        field="disk_mb",
        unit=" MiB",
        minimum=512,
        rule="limits.max.disk",
    )
    return int(disk) * _MiB


def _resolve_mounts(policy: Policy, requests: tuple[MountRequest, ...], cwd: str) -> tuple[BindMount, ...]:
    if not requests:
        return ()
    if len(requests) > policy.mounts.max_mounts:
        raise PolicyRefused(
            f"{len(requests)} mounts asked, at most {policy.mounts.max_mounts} allowed",
            rule="mounts.max_mounts",
        )
    pairs = [
        (root, spec) for spec in policy.mounts.allowed for root in resolve_allowed_roots([spec.host], cwd)
    ]
    roots = tuple(root for root, _ in pairs)
    writable_roots = {root for root, spec in pairs if spec.writable}
    noexec_roots = {root for root, spec in pairs if spec.noexec}
    if not roots:
        raise PolicyRefused("this policy allows no host mounts", rule="mounts.allowed")

    mounts: list[BindMount] = []
    targets: set[str] = set()
    for request in requests:
        target = check_mount_target(request.sandbox)
        if target in targets:
            raise InvalidRequest(f"two mounts at {target}")
        targets.add(target)
        host = confine_host_path(request.host, roots, cwd, rule="mounts.allowed")
        if request.writable and host.root not in writable_roots:
            raise PolicyRefused(f"{host.root} may only be mounted read-only", rule="mounts.allowed.writable")
        mounts.append(
            BindMount(
                root=host.root,
                source=host.path,
                target=target,
                writable=request.writable,
                noexec=host.root in noexec_roots,
            )
        )
    return tuple(mounts)


def resolve_exec(policy: Policy, request: ExecRequest) -> ExecPlan:
    """Resolve one exec's timeout and output caps against ``policy``."""
    timeout = _pick(
        request.timeout_seconds,
        policy.exec.default_timeout_seconds,
        policy.exec.max_timeout_seconds,
        field="timeout_seconds",
        unit=" s",
        minimum=0.001,
        rule="exec.max_timeout_seconds",
    )
    if request.stdin_bytes > policy.exec.max_stdin_bytes:
        raise PolicyRefused(
            f"stdin is {request.stdin_bytes} bytes, above the maximum {policy.exec.max_stdin_bytes}",
            rule="exec.max_stdin_bytes",
        )
    return ExecPlan(timeout_seconds=timeout, max_output_bytes=policy.exec.max_output_bytes)
