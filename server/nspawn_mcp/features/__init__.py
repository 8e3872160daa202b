"""The MCP features beside the tools: resources, prompts, completions and logging (the tools are
in :mod:`nspawn_mcp.app`, which calls :func:`register_features`)."""

from __future__ import annotations

import importlib.resources

from mcp.server.mcpserver import MCPServer

from ..policy import PolicySet
from ..service import SandboxService
from .caller import Guard
from .client_log import register_logging
from .completions import register_completions
from .prompts import load_prompts, register_prompts
from .resources import policy_document, register_resources

__all__ = ["Guard", "policy_document", "register_features"]


def register_features(mcp: MCPServer[SandboxService], policies: PolicySet, guard: Guard) -> None:
    """Resources, the shipped prompts, completions and logging on ``mcp``; ``guard`` is the tools'
    error boundary, which settles who is calling."""
    prompts = load_prompts(importlib.resources.files("nspawn_mcp") / "data" / "prompts")
    register_resources(mcp, policies, guard)
    register_prompts(mcp, prompts)
    register_completions(mcp, policies, prompts, guard)
    register_logging(mcp, guard)
