"""The policy layer: operator policies and the pure resolution of requests into plans."""

from .loader import PolicyError, PolicySet, load_policy_file
from .models import Policy
from .paths import HostTarget, check_container_path, confine_host_path
from .ports import resolve_expose
from .resolve import (
    BindMount,
    CreateRequest,
    EgressPlan,
    ExecPlan,
    ExecRequest,
    MountRequest,
    ResolvedLimits,
    SandboxPlan,
    resolve_create,
    resolve_exec,
)

__all__ = [
    "BindMount",
    "CreateRequest",
    "EgressPlan",
    "ExecPlan",
    "ExecRequest",
    "HostTarget",
    "MountRequest",
    "Policy",
    "PolicyError",
    "PolicySet",
    "ResolvedLimits",
    "SandboxPlan",
    "check_container_path",
    "confine_host_path",
    "load_policy_file",
    "resolve_create",
    "resolve_exec",
    "resolve_expose",
]
