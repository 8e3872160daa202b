"""Operator policy files, as validated data.

A policy is TOML, one file per policy, named after the file. Every field has a
safe default, so an empty file is the strictest sensible policy. Unknown keys are
errors: a typo must never silently widen (or narrow) what a sandbox may do.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress, IPvAnyNetwork, model_validator

from .sizes import ByteCount

__all__ = [
    "EgressRule",
    "ExecPolicy",
    "FilesPolicy",
    "LimitSet",
    "LimitsPolicy",
    "MountRoot",
    "MountsPolicy",
    "NetworkPolicy",
    "Policy",
    "PoolPolicy",
    "PortsPolicy",
    "SandboxesPolicy",
    "SnapshotsPolicy",
]

_MiB = 1 << 20
_DOMAIN = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_GiB = 1 << 30


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LimitSet(_Frozen):
    """Resource caps of one sandbox: what its slice carries."""

    memory: ByteCount = Field(default=512 * _MiB, ge=32 * _MiB, description="MemoryMax of the sandbox")
    cpus: float = Field(default=1.0, gt=0, le=1024, description="CPU time, in whole CPUs (CPUQuota/100)")
    processes: int = Field(default=256, ge=8, le=1_000_000, description="TasksMax of the sandbox")
    ttl_seconds: int = Field(default=3600, ge=10, le=7 * 86400, description="lifetime before reaping")
    disk: ByteCount | None = Field(
        default=None,
        description="cap on what the sandbox writes to its filesystem (a btrfs quota; with simple "
        "quotas, set-up's default, the image it starts from does not count; with classic qgroups "
        "it does); needs quotas on the pool, which `nspawn-mcp setup` enables; none unless set",
    )


class LimitsPolicy(_Frozen):
    """``default`` applies when the agent asks nothing; ``max`` is the most it may ask."""

    default: LimitSet = LimitSet()
    max: LimitSet = LimitSet(memory=2 * _GiB, cpus=2.0, processes=1024, ttl_seconds=86400)

    @model_validator(mode="after")
    def _default_within_max(self) -> LimitsPolicy:
        for field in LimitSet.model_fields:
            default, maximum = getattr(self.default, field), getattr(self.max, field)
            if maximum is None or default is None:
                continue  # an unset disk default means the maximum (see resolve)
            if default > maximum:
                raise ValueError(f"limits.default.{field} is larger than limits.max.{field}")
        return self


class ExecPolicy(_Frozen):
    default_timeout_seconds: float = Field(default=60, gt=0, le=86400)
    max_timeout_seconds: float = Field(default=600, gt=0, le=86400)
    max_output_bytes: ByteCount = Field(
        default=1 * _MiB,
        ge=1024,
        le=64 * _MiB,
        description="exec: stdout and stderr of a reply together; read_process_output: per stream and read",
    )
    max_stdin_bytes: ByteCount = Field(default=8 * _MiB, ge=0, le=64 * _MiB)
    max_background_processes: int = Field(default=16, ge=0, le=1024, description="per sandbox")
    max_background_output_bytes: ByteCount = Field(
        default=16 * _MiB, ge=1024, le=1024 * _MiB, description="per stream, kept on disk in the sandbox"
    )
    no_new_privileges: bool = Field(
        default=True,
        description="no process of the sandbox can gain privileges through setuid or file capabilities "
        "(NoNewPrivileges=); turn off only for images whose programs need setuid inside (sudo, ping)",
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> ExecPolicy:
        if self.default_timeout_seconds > self.max_timeout_seconds:
            raise ValueError("exec.default_timeout_seconds is larger than exec.max_timeout_seconds")
        return self


class FilesPolicy(_Frozen):
    allowed_host_dirs: tuple[str, ...] = Field(
        default=(".",),
        description="host directories copy_file may read from or write to; relative ones are "
        "relative to the client's working directory (a root stdio client's own; HTTP clients have none)",
    )
    max_copy_bytes: ByteCount = Field(
        default=1 * _GiB, ge=0, description="per copy_file, a directory's files summed"
    )
    max_read_bytes: ByteCount = Field(
        default=1 * _MiB,
        ge=1024,
        le=64 * _MiB,
        description="read_file: bytes per call (larger files are read in pieces); the resource "
        "sandbox://{id}/files/{path} reads whole files up to this",
    )
    max_write_bytes: ByteCount = Field(
        default=8 * _MiB, ge=0, le=64 * _MiB, description="write_file and edit_file: size of the file written"
    )
    max_list_entries: int = Field(default=1000, ge=1, le=10_000, description="list_files: entries per call")


class MountRoot(_Frozen):
    host: str = Field(description="a host directory agents may bind (it, or anything below it)")
    writable: bool = Field(
        default=False,
        description="whether binds under it may be read-write; then root inside writes as the directory's "
        "owner, which must not be root, and only its owner may have access to it (chmod 700)",
    )
    noexec: bool = Field(default=False, description="whether binds under it are mounted noexec")


class MountsPolicy(_Frozen):
    allowed: tuple[MountRoot, ...] = Field(default=(), description="host directories sandboxes may bind")
    max_mounts: int = Field(default=8, ge=0, le=64, description="binds per sandbox")


class EgressRule(_Frozen):
    cidr: IPvAnyNetwork = Field(
        description="destination addresses, e.g. '203.0.113.0/24' or '198.51.100.7/32'"
    )
    ports: tuple[int, ...] = Field(min_length=1, description="TCP ports allowed to those addresses")

    @model_validator(mode="after")
    def _ports_in_range(self) -> EgressRule:
        if any(not 1 <= port <= 65535 for port in self.ports):
            raise ValueError("ports must be between 1 and 65535")
        if self.cidr.version != 4:
            raise ValueError("only IPv4 ranges are supported for egress (sandboxes get no IPv6 route)")
        return self


class NetworkPolicy(_Frozen):
    mode: Literal["none", "egress", "host"] = Field(
        default="none",
        description="'none': loopback only; 'egress': only the listed addresses and domains, DNS filtered; "
        "'host': the host's network, unfiltered (trusted workloads only)",
    )
    allow: tuple[EgressRule, ...] = Field(default=(), description="egress: address ranges and ports")
    domains: tuple[str, ...] = Field(
        default=(),
        description="egress: names the sandbox may resolve and reach ('*.example.org' for subdomains)",
    )
    domain_ports: tuple[int, ...] = Field(
        default=(443,), description="egress: TCP ports for the listed domains"
    )
    upstream_dns: IPvAnyAddress | None = Field(
        default=None, description="egress: where listed names are resolved (default: the host's resolver)"
    )
    private_dns_answers: bool = Field(
        default=False,
        description="egress: let listed domains resolve to private addresses (an internal mirror); "
        "loopback, link-local and sandbox addresses are refused regardless",
    )

    @model_validator(mode="after")
    def _egress_fields_need_egress(self) -> NetworkPolicy:
        if self.mode != "egress" and (self.allow or self.domains):
            raise ValueError("network.allow and network.domains need network.mode = 'egress'")
        for domain in self.domains:
            if not _DOMAIN.match(domain):
                raise ValueError(f"invalid domain {domain!r}: use names like 'pypi.org' or '*.example.org'")
        return self


class SandboxesPolicy(_Frozen):
    max_live: int = Field(default=32, ge=1, le=10_000, description="live sandboxes of this policy")
    max_live_per_client: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="live sandboxes of this policy per client identity (a uid, or a token's name)",
    )
    on_disconnect: Literal["destroy", "keep"] = Field(
        default="destroy",
        description="what happens to a stdio client's sandboxes when it disconnects: destroyed at once, "
        "or kept until their TTL (the same identity sees them again when it reconnects)",
    )
    shared: bool = Field(
        default=False,
        description="every client may see and use every sandbox of this policy, not only the client "
        "that made it",
    )
    idle_timeout_seconds: int | None = Field(
        default=None,
        ge=10,
        le=7 * 86400,
        description="destroy a sandbox no tool call has used for this long; none unless set",
    )

    images: tuple[str, ...] = Field(default=("default",), min_length=1, description="images agents may use")


class PortsPolicy(_Frozen):
    """Ports of a sandbox that expose_port makes reachable from the host (forwards into the sandbox)."""

    max_exposed: int = Field(
        default=4, ge=0, le=64, description="ports one sandbox may have exposed at once; 0: none"
    )
    addresses: tuple[IPvAnyAddress, ...] = Field(
        default=(IPv4Address("127.0.0.1"),),
        min_length=1,
        description="host addresses an exposed port may listen on; the first is the default. Loopback "
        "reaches only this host's users; any other address makes the sandbox's port reachable from "
        "wherever that address is",
    )
    max_connections: int = Field(
        default=64, ge=1, le=4096, description="connections open at once through one exposed port"
    )


class PoolPolicy(_Frozen):
    """Sandboxes started ahead of demand (the warm pool), so a create only hands one out."""

    size: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="sandboxes of each pooled image kept started, with this policy's default limits and "
        "network; a create that asks no host mounts and at least the default memory takes one (its "
        "limits are applied then, and its TTL starts then). Each waiting sandbox costs a few MB of memory",
    )
    images: tuple[str, ...] = Field(
        default=(), description="the images kept warm (some of sandboxes.images); default: the first of them"
    )


class SnapshotsPolicy(_Frozen):
    """Checkpoints of running sandboxes (snapshot_sandbox), forks (fork_sandbox) and restores.

    A snapshot shares its data with the sandbox (copy-on-write). With the pool's simple quotas
    (set-up's default) what a sandbox wrote stays charged to it while a snapshot holds it, so
    snapshots count against the sandbox's ``limits.disk``; a fork is a sandbox of its own,
    counted against ``sandboxes.max_live`` and with its own disk cap.
    """

    max_per_sandbox: int = Field(
        default=8, ge=0, le=64, description="snapshots one sandbox may hold at once; 0: none"
    )
    max_forks: int = Field(
        default=10, ge=0, le=64, description="sandboxes one fork_sandbox call may make; 0: no forks"
    )
    keep_as_images: bool = Field(
        default=False,
        description="whether a snapshot may be kept as an image that outlives its sandbox "
        "(create_sandbox(image=...) under this policy starts from it; list_images shows it)",
    )
    max_kept: int = Field(default=4, ge=0, le=256, description="kept images of this policy at once")


class Policy(_Frozen):
    """One operator policy."""

    description: str = ""
    limits: LimitsPolicy = LimitsPolicy()
    exec: ExecPolicy = ExecPolicy()
    files: FilesPolicy = FilesPolicy()
    mounts: MountsPolicy = MountsPolicy()
    network: NetworkPolicy = NetworkPolicy()
    sandboxes: SandboxesPolicy = SandboxesPolicy()
    ports: PortsPolicy = PortsPolicy()
    pool: PoolPolicy = PoolPolicy()
    snapshots: SnapshotsPolicy = SnapshotsPolicy()

    @model_validator(mode="after")
    def _pooled_images_allowed(self) -> Policy:
        for image in self.pool.images:
            if image not in self.sandboxes.images:
                raise ValueError(f"pool.images: {image!r} is not one of sandboxes.images")
        return self
