"""What an agent is told about an image a policy allows but the host does not have."""

from __future__ import annotations

__all__ = ["not_installed"]


def not_installed(image: str) -> str:
    """One sentence: what is missing, and the operator's commands that make it."""
    return (
        f"image {image!r} is allowed but not installed on this host; the operator can build it "
        f"(`nspawn-mcp image build {image}`) or import one (`nspawn-mcp image import FILE {image}`)"
    )
