"""Making a checked image the template sandboxes are cloned from: one atomic step.

The staging image and the template are btrfs subvolumes side by side in the pool, so
``renameat2`` can swap them: a create that clones the template sees the old one or the
new one, never none. Sandboxes of the old one keep running (each is a snapshot of its
own); the old template is removed after the swap.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio.to_thread

from .. import kernel
from ..backend.machine1 import Machined
from ..naming import template_image

__all__ = ["publish_template"]


def _swap(machines_view: Path, staging: str, template: str) -> bool:
    pool = os.open(machines_view, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            kernel.renameat2(pool, staging, pool, template, kernel.RENAME_NOREPLACE)
        except FileExistsError:
            kernel.renameat2(pool, staging, pool, template, kernel.RENAME_EXCHANGE)
            return True
        return False
    finally:
        os.close(pool)


async def publish_template(machined: Machined, machines_view: Path, staging: str, image: str) -> bool:
    """Make the staging image ``staging`` the read-only template of ``image``.

    ``machines_view``: the pool's directory as this process can open it (the box's
    ``/proc/PID/root/var/lib/machines``). Returns True when it replaced an older template.
    """
    await machined.mark_image_read_only(staging)
    replaced = await anyio.to_thread.run_sync(_swap, machines_view, staging, template_image(image))
    if replaced:  # the old template now has the staging name
        await machined.mark_image_read_only(staging, False)
        await machined.remove_image(staging)
    return replaced
