"""Where nspawn-mcp keeps its files on the host.

Everything lives under one state directory on the root filesystem, so that the
server, machined and a private systemd (``box``) all see the same paths even
though the box has its own ``/tmp`` and ``/run``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    state_dir: Path = Path("/var/lib/nspawn-mcp")
    machines_dir: Path = Path("/var/lib/machines")

    runtime_dir: Path = Path("/run/nspawn-mcp")

    @classmethod
    def from_env(cls) -> Layout:
        return cls(
            state_dir=Path(os.environ.get("NSPAWN_MCP_STATE_DIR", "/var/lib/nspawn-mcp")),
            runtime_dir=Path(os.environ.get("NSPAWN_MCP_RUNTIME_DIR", "/run/nspawn-mcp")),
        )

    @property
    def daemon_socket(self) -> Path:
        """Where the daemon serves MCP to front ends (root only, or a group the operator names)."""
        return self.runtime_dir / "daemon.sock"

    @property
    def daemon_lock(self) -> Path:
        """Held by the running daemon: there is one per host."""
        return self.state_dir / "daemon.lock"

    @property
    def records_dir(self) -> Path:
        """One record per sandbox (``<id>.json``): what a restarted daemon adopts."""
        return self.state_dir / "records"

    @property
    def lib_dir(self) -> Path:
        """Holds supervisor.py, bound read-only into every sandbox."""
        return self.state_dir / "lib"

    @property
    def sandboxes_dir(self) -> Path:
        return self.state_dir / "sandboxes"

    def sandbox_dir(self, sandbox_id: str) -> Path:
        """Per-sandbox, reachable by the host's root only: the control socket, resolv.conf."""
        return self.sandboxes_dir / sandbox_id

    def control_socket(self, sandbox_id: str) -> Path:
        """Where the server reaches the sandbox's supervisor (which got the listening end as an fd)."""
        return self.sandbox_dir(sandbox_id) / "exec.sock"

    @property
    def staging_dir(self) -> Path:
        return self.state_dir / "staging"

    @property
    def box_dir(self) -> Path:
        return self.state_dir / "box"

    @property
    def pool_image(self) -> Path:

        return self.state_dir / "pool.img"

    @property
    def images_dir(self) -> Path:
        """The image catalog (what set-up recorded about each image) and the build logs."""
        return self.state_dir / "images"
