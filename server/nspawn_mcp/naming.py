"""Names this server gives to what it creates on the host, and how it recognises them.

Machine names double as network-interface suffixes (``ve-<name>``, 15 characters at
most), so sandbox ids are kept to 12 characters. Everything the server creates
carries a fixed prefix, which is how a restarted server finds its own sandboxes
and leaves everybody else's alone.

Every name is built and parsed here, nowhere else; a parser gives the sandbox id
back, or None for a name that is not one of ours.

==============================  ==================================  ==================================
what                            built by                            parsed by
==============================  ==================================  ==================================
machine and its image           :func:`machine_name`                :func:`sandbox_of_machine`
the nspawn service              :func:`service_unit`                :func:`sandbox_of_unit`
the slice with its caps         :func:`slice_unit`                  :func:`sandbox_of_unit`
the host end of its veth        :func:`host_interface`              :func:`sandbox_of_interface`
its nftables chains and set     :func:`nft_object`                  (never parsed)
a template image                :func:`template_image`              :func:`template_of_image`
a template being built          :func:`template_staging`            (never parsed; hidden from machined)
an image being imported         :func:`import_staging_image`        :func:`image_of_import_staging`
a snapshot of a sandbox         :func:`snapshot_image`              :func:`snapshot_of_image`
a snapshot kept as an image     :func:`kept_image`                  :func:`snapshot_of_kept_image`
a snapshot a fork copies        :func:`fork_image`                  :func:`snapshot_of_image`
a sandbox's freezer cgroup      :func:`freezer_group`               :func:`sandbox_of_freezer_group`
==============================  ==================================  ==================================

A snapshot's name is the agent's (:func:`parse_snapshot_name`); the image it is stored as
carries the sandbox's id, so a snapshot goes with its sandbox. One kept as an image is a
template (``create_sandbox(image=...)`` starts from it), named after the sandbox and the
snapshot, and outlives the sandbox.

An image being imported is never a template (machined lists it, so it must not parse
as one): it becomes one only once it has been checked. An imported disk image
(``ImportRaw``; machined lists it without its ``.raw`` suffix) is staged under the
``raw`` kind of staging name, then copied into a tree under the ``tree`` kind.
"""

from __future__ import annotations

import re
import secrets
from typing import Literal

from .errors import InvalidRequest

__all__ = [
    "INTERFACE_PATTERN",
    "PARENT_SLICE",
    "SANDBOX_ID",
    "UNIT_PATTERNS",
    "NftObject",
    "StagingKind",
    "fork_image",
    "freezer_group",
    "host_interface",
    "image_of_import_staging",
    "import_staging_image",
    "kept_image",
    "machine_name",
    "new_sandbox_id",
    "nft_object",
    "parse_sandbox_id",
    "parse_snapshot_name",
    "sandbox_of_freezer_group",
    "sandbox_of_interface",
    "sandbox_of_machine",
    "sandbox_of_unit",
    "service_unit",
    "slice_unit",
    "snapshot_image",
    "snapshot_of_image",
    "snapshot_of_kept_image",
    "template_image",
    "template_of_image",
    "template_staging",
]

SANDBOX_ID = re.compile(r"sbx-[0-9a-f]{8}")
"""What a sandbox id looks like; use ``fullmatch`` (``match`` would accept a prefix)."""
PARENT_SLICE = "nspawnmcp.slice"

_ID_PREFIX = "sbx-"
_SERVICE = re.compile(r"nspawn-mcp-(sbx-[0-9a-f]{8})\.service")
# A dash in a slice name means nesting: nspawnmcp-X.slice lands under nspawnmcp.slice.
_SLICE = re.compile(r"nspawnmcp-([0-9a-f]{8})\.slice")
_INTERFACE = re.compile(r"ve-(sbx-[0-9a-f]{8})")
_TEMPLATE_PREFIX = "nspawn-mcp-"
_IMPORT_STAGING = re.compile(r"nspawnmcp-import-(tree|raw)-([a-z0-9][a-z0-9-]{0,31})")

_SNAPSHOT_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,17}[a-z0-9])?")
_SNAPSHOT_IMAGE = re.compile(r"nspawnmcp-(snap|fork)-([0-9a-f]{8})-([a-z0-9-]{1,19})")
_KEPT = re.compile(r"(sbx-[0-9a-f]{8})-([a-z0-9-]{1,19})")
_FREEZER_GROUP = "nspawnmcp"

INTERFACE_PATTERN = "ve-sbx-*"
"""An nftables wildcard that matches every interface :func:`sandbox_of_interface` may claim."""
UNIT_PATTERNS = ("nspawn-mcp-sbx-*.service", "nspawnmcp-*.slice")
"""Globs (systemd's ``ListUnitsByPatterns``) that match every unit :func:`sandbox_of_unit` may claim."""

NftObject = Literal["egress", "sni", "input", "resolved"]
"""The per-sandbox nftables objects: forwarding chain, redirect chain, input chain, resolved set."""


def new_sandbox_id() -> str:
    return _ID_PREFIX + secrets.token_hex(4)


def parse_sandbox_id(value: str) -> str:
    """Validate an id an agent sent; the message says what an id looks like."""
    if not SANDBOX_ID.fullmatch(value):
        shown = (
            value
            if len(value) <= 40 and value.isprintable()
            else value[:40].encode("unicode_escape").decode()
        )
        raise InvalidRequest(
            f"invalid sandbox_id {shown!r}: ids look like 'sbx-1a2b3c4d' (from create_sandbox)"
        )
    return value


def _suffix(sandbox_id: str) -> str:
    """The id's eight hex digits."""
    return sandbox_id[len(_ID_PREFIX) :]


def machine_name(sandbox_id: str) -> str:
    """The machine machined registers, and the image (snapshot) it runs from: the id itself."""
    return sandbox_id


def sandbox_of_machine(name: str) -> str | None:
    """The sandbox a machine or image belongs to; None if it is not a sandbox of ours."""
    return name if SANDBOX_ID.fullmatch(name) else None


def service_unit(sandbox_id: str) -> str:
    return f"nspawn-mcp-{sandbox_id}.service"


def slice_unit(sandbox_id: str) -> str:
    return f"nspawnmcp-{_suffix(sandbox_id)}.slice"


def sandbox_of_unit(name: str) -> str | None:
    """The sandbox a service or slice unit belongs to; None for any other unit."""
    if found := _SERVICE.fullmatch(name):
        return found[1]
    if found := _SLICE.fullmatch(name):
        return _ID_PREFIX + found[1]
    return None


def host_interface(sandbox_id: str) -> str:
    """nspawn names the host end of the veth ``ve-<machine>`` (15 characters at most)."""
    return f"ve-{machine_name(sandbox_id)}"[:15]


def sandbox_of_interface(name: str) -> str | None:
    """The sandbox a host network interface belongs to; None for any other interface."""
    found = _INTERFACE.fullmatch(name)
    return found[1] if found else None


def nft_object(kind: NftObject, sandbox_id: str) -> str:
    """The name of one of the sandbox's nftables chains or sets."""
    return f"{kind}_{_suffix(sandbox_id)}"


def template_image(image: str) -> str:
    """The machined image sandboxes of ``image`` (a policy's image name, like ``default``) are cloned from."""
    return f"{_TEMPLATE_PREFIX}{image}"


def template_of_image(name: str) -> str | None:
    """The image name a template stands for; None if ``name`` is not a template image."""
    if not name.startswith(_TEMPLATE_PREFIX) or name == _TEMPLATE_PREFIX:
        return None
    return name[len(_TEMPLATE_PREFIX) :]


def template_staging(image: str) -> str:
    """The subvolume a build of ``image`` happens in, next to its template; ``.#`` hides it from machined."""
    return f".#{template_image(image)}.build"


StagingKind = Literal["tree", "raw"]


def import_staging_image(image: str, kind: StagingKind = "tree") -> str:
    """The machined image an import of ``image`` is staged as until it is checked (a valid host name)."""
    return f"nspawnmcp-import-{kind}-{image}"


def image_of_import_staging(name: str) -> tuple[str, StagingKind] | None:
    """The image an import staging name stands for, and its kind; None for any other name."""
    found = _IMPORT_STAGING.fullmatch(name)
    if found is None:
        return None
    kind: StagingKind = "raw" if found[1] == "raw" else "tree"
    return found[2], kind


def parse_snapshot_name(value: str) -> str:
    """Validate a snapshot name an agent sent; the message says what names look like."""
    if not _SNAPSHOT_NAME.fullmatch(value):
        shown = value[:40].encode("unicode_escape").decode()
        raise InvalidRequest(
            f"invalid snapshot name {shown!r}: names are 1-19 lower-case letters, digits and inner dashes, "
            "like 'before-upgrade'"
        )
    return value


def snapshot_image(sandbox_id: str, name: str) -> str:
    """The read-only machined image snapshot ``name`` of the sandbox is stored as (not a template)."""
    return f"nspawnmcp-snap-{_suffix(sandbox_id)}-{name}"


def fork_image(sandbox_id: str, token: str) -> str:
    """A snapshot of the sandbox taken only for the forks of one call (never an agent's; removed after)."""
    return f"nspawnmcp-fork-{_suffix(sandbox_id)}-{token}"


def snapshot_of_image(name: str) -> tuple[str, str, bool] | None:
    """The sandbox and snapshot a snapshot image (or a fork's) stands for, and whether it is a fork's;
    None for any other name."""
    found = _SNAPSHOT_IMAGE.fullmatch(name)
    if found is None:
        return None
    return _ID_PREFIX + found[2], found[3], found[1] == "fork"


def kept_image(sandbox_id: str, name: str) -> str:
    """The image (``create_sandbox(image=...)``, a template) snapshot ``name`` is kept as."""
    return f"{sandbox_id}-{name}"


def snapshot_of_kept_image(image: str) -> tuple[str, str] | None:
    """The sandbox and snapshot a kept image was taken of; None for any other image name."""
    found = _KEPT.fullmatch(image)
    return (found[1], found[2]) if found else None


def freezer_group(sandbox_id: str) -> str:
    """The sandbox's cgroup in a v1 freezer hierarchy, relative to its root."""
    return f"{_FREEZER_GROUP}/{sandbox_id}"


def sandbox_of_freezer_group(name: str) -> str | None:
    """The sandbox a directory in the freezer hierarchy's ``nspawnmcp`` group belongs to; None otherwise."""
    return name if SANDBOX_ID.fullmatch(name) else None
