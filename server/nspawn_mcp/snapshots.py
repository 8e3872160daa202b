"""Use cases of checkpoints: snapshots of running sandboxes, forks, restores, kept images.

A snapshot is a read-only copy of a sandbox's filesystem taken with its processes
frozen (:mod:`nspawn_mcp.backend.freezer`); it belongs to its sandbox and goes with it
(destroy, expiry, reaping, a restart that cannot adopt the sandbox), unless the
policy lets it be kept as an image (``snapshots.keep_as_images``): then it is a
template named after the sandbox and the snapshot, recorded in the image catalog with
the policy that kept it, the only one that may start sandboxes from it.

A fork is a new sandbox made as ``create_sandbox`` makes one (:meth:`SandboxService._launch`:
quotas, owner, record), from a snapshot or from the parent's current filesystem
instead of an image, with the parent's plan (policy, limits, binds, network, env).
Forks of one call start from one instant of the parent.

Snapshots are counted here, in memory, from what the image pool holds at start
(:meth:`Snapshots.reconcile`): as with creates, nothing awaits between a limit's check
and the snapshot's registration.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from .backend.api import SnapshotKind, SnapshotRef
from .errors import InvalidRequest, NotFound, PolicyRefused, SandboxError, SandboxGone
from .identity import Client, current_client
from .images import ImageEntry
from .models import ForkResult, RestoreResult, SandboxInfo, SnapshotDeleted, SnapshotInfo, SnapshotList
from .naming import kept_image, parse_snapshot_name
from .policy import Policy, SandboxPlan

if TYPE_CHECKING:
    from .records import SandboxRecord
    from .service import SandboxService

__all__ = ["Snapshots"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Held:
    """One snapshot of a live sandbox."""

    ref: SnapshotRef
    created_at: datetime

    def info(self) -> SnapshotInfo:
        kept = self.ref.kind == "kept"
        return SnapshotInfo(
            sandbox_id=self.ref.sandbox_id,
            name=self.ref.name,
            created_at=self.created_at.astimezone(UTC).isoformat(timespec="milliseconds"),
            kept_as_image=kept_image(self.ref.sandbox_id, self.ref.name) if kept else None,
        )


class Snapshots:
    """Snapshots, forks and restores of the service's sandboxes."""

    def __init__(self, service: SandboxService) -> None:
        self._service = service
        self._held: dict[str, dict[str, _Held]] = {}
        """sandbox -> its snapshots by name (reserved before they are taken)."""

    # -- tools ---------------------------------------------------------------------

    async def take(self, sandbox_id: str, name: str | None = None, keep: bool = False) -> SnapshotInfo:
        """A read-only checkpoint of the running sandbox, its processes frozen for the instant."""
        service = self._service
        with service._audited("snapshot_sandbox", sandbox_id, name=name, keep=keep) as audit:
            sandbox = service._get(sandbox_id)
            rules = service._policy_of(sandbox.plan.policy).snapshots
            held = self._held.setdefault(sandbox_id, {})
            policy = sandbox.plan.policy
            if len(held) >= rules.max_per_sandbox:
                raise PolicyRefused(
                    f"policy {policy!r} allows {rules.max_per_sandbox} snapshots per sandbox and "
                    f"{sandbox_id} has {len(held)}; delete_snapshot one first",
                    rule="snapshots.max_per_sandbox",
                )
            if name is None:
                name = next(f"snap-{n}" for n in range(1, len(held) + 2) if f"snap-{n}" not in held)
            name = parse_snapshot_name(name)
            if name in held:
                raise InvalidRequest(
                    f"{sandbox_id} already has a snapshot {name!r}; pick another name or delete_snapshot it"
                )
            kind: SnapshotKind = "kept" if keep else "snapshot"
            if keep:
                await self._check_keep(sandbox, rules.keep_as_images, rules.max_kept)
                if len(held) >= rules.max_per_sandbox or name in held:  # taken while we looked
                    raise InvalidRequest(f"{sandbox_id} already has a snapshot {name!r}; pick another name")
            snapshot = _Held(SnapshotRef(sandbox_id, name, kind), service._clock())
            held[name] = snapshot  # registered before the first await: the limit holds under races
            try:
                await service._backend.snapshot(snapshot.ref)
                if keep:
                    await anyio.to_thread.run_sync(self._record_kept, sandbox, snapshot)
            except BaseException:
                held.pop(name, None)
                with anyio.CancelScope(shield=True):
                    await service._backend.remove_snapshot(snapshot.ref)
                raise
            audit["snapshot"] = name
        return snapshot.info()

    def listing(self, sandbox_id: str) -> SnapshotList:
        self._service._get(sandbox_id)
        held = self._held.get(sandbox_id, {})
        return SnapshotList(snapshots=[held[name].info() for name in sorted(held)])

    async def delete(self, sandbox_id: str, name: str) -> SnapshotDeleted:
        service = self._service
        with service._audited("delete_snapshot", sandbox_id, name=name):
            service._get(sandbox_id)
            snapshot = self._find(sandbox_id, name)
            del self._held[sandbox_id][snapshot.ref.name]
            with anyio.CancelScope(shield=True):
                await service._backend.remove_snapshot(snapshot.ref)
                if snapshot.ref.kind == "kept" and service._catalog is not None:
                    image = kept_image(sandbox_id, snapshot.ref.name)
                    await anyio.to_thread.run_sync(service._catalog.remove, image)
        return SnapshotDeleted(sandbox_id=sandbox_id, name=snapshot.ref.name, deleted=True)

    async def restore(self, sandbox_id: str, name: str) -> RestoreResult:
        """The sandbox rolled back to the snapshot: every process ended, started again on it."""
        service = self._service
        with service._audited("restore_sandbox", sandbox_id, name=name):
            sandbox = service._get(sandbox_id)
            snapshot = self._find(sandbox_id, name)
            try:
                states = await service._backend.jail(sandbox_id).list()
            except SandboxGone:
                states = []
            gone = [state.process_id for state in states if state.running]
            # "creating" while it restarts: its machine's removal is expected (machine_removed ignores
            # it), and a daemon that dies meanwhile leaves it half-made (the next start removes it)
            sandbox.state = "creating"
            try:
                service._store.save(sandbox)
                await service._backend.restore(sandbox_id, sandbox.plan, snapshot.ref)
                sandbox.state = "running"
                sandbox.oom_kills_seen = 0  # a new slice counts from 0
                service._store.save(sandbox)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await service._destroy(sandbox, f"its restore to snapshot {name!r} failed", "stopped")
                raise
        return RestoreResult(sandbox_id=sandbox_id, snapshot=snapshot.ref.name, gone_processes=gone)

    async def fork(self, sandbox_id: str, snapshot: str | None = None, count: int = 1) -> ForkResult:
        """``count`` new sandboxes of the caller's from the parent's current filesystem (one instant
        of it) or from one of its snapshots; each counted and capped as a create is."""
        service = self._service
        with service._audited("fork_sandbox", sandbox_id, snapshot=snapshot, count=count) as audit:
            parent = service._get(sandbox_id)
            client = current_client.get()
            policy = service._usable_policy(parent.plan.policy, client)
            rules = policy.snapshots
            if count > rules.max_forks:
                raise PolicyRefused(
                    f"policy {parent.plan.policy!r} allows at most {rules.max_forks} forks per call; "
                    f"{count} were asked for",
                    rule="snapshots.max_forks",
                )
            source: SnapshotRef | str = (
                sandbox_id if snapshot is None else self._find(sandbox_id, snapshot).ref
            )
            plan = parent.plan
            if plan.egress is not None:
                plan = replace(plan, egress=replace(plan.egress, subnet=None))
            service._check_quotas(policy, plan, client.identity, count)
            temporary = None
            if snapshot is None and count > 1:  # one instant of the parent for all of them
                temporary = SnapshotRef(sandbox_id, secrets.token_hex(2), "fork")
                source = temporary
            made: list[SandboxInfo] = []
            try:
                if temporary is not None:
                    await service._backend.snapshot(temporary)
                made = await self._launch_all(policy, plan, dict(parent.env), source, count)
            finally:
                if temporary is not None:
                    with anyio.CancelScope(shield=True):
                        await service._backend.remove_snapshot(temporary)
            audit["forks"] = [info.sandbox_id for info in made]
        return ForkResult(sandboxes=made)

    async def _launch_all(
        self,
        policy: Policy,
        plan: SandboxPlan,
        env: dict[str, str],
        source: SnapshotRef | str,
        count: int,
    ) -> list[SandboxInfo]:
        """Start ``count`` forks at once; all of them, or (destroying the ones made) none."""
        service = self._service
        made: list[SandboxInfo | None] = [None] * count
        failures: list[BaseException] = []

        async def one(index: int) -> None:
            try:
                made[index] = await service._launch(policy, plan, env, source)
            except SandboxError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tasks:
            for index in range(count):
                tasks.start_soon(one, index)
        infos = [info for info in made if info is not None]
        if failures:
            with anyio.CancelScope(shield=True):
                for info in infos:
                    record = service._sandboxes.get(info.sandbox_id)
                    if record is not None:
                        await service._destroy(record, "a fork made with it failed", "create-failed")
            raise failures[0]
        return infos

    # -- the service's hooks ------------------------------------------------------------

    async def discard(self, sandbox_id: str) -> None:
        """The sandbox is gone: so are its snapshots, but for the ones kept as images."""
        for snapshot in self._held.pop(sandbox_id, {}).values():
            if snapshot.ref.kind != "kept":
                await self._service._backend.remove_snapshot(snapshot.ref)

    async def reconcile(self, adopted: set[str]) -> None:
        """At start: count the snapshots of adopted sandboxes; remove those of any other, and every
        fork's (a daemon that died while forking left it)."""
        backend = self._service._backend
        for image in await backend.snapshots():
            ref = image.ref
            if ref.sandbox_id in adopted and ref.kind != "fork":
                created = image.created or self._service._clock()
                self._held.setdefault(ref.sandbox_id, {})[ref.name] = _Held(ref, created)
            elif ref.kind != "kept":
                log.info("removing snapshot %s of gone sandbox %s", ref.name, ref.sandbox_id)
                await backend.remove_snapshot(ref)

    def kept_allows(self, entry: ImageEntry | None, policy: str, client: Client) -> bool:
        """Whether ``client`` may start sandboxes under ``policy`` from ``entry``, a kept snapshot: one
        that policy kept, and that this client kept (any client's, where the policy is shared). A kept
        snapshot holds what its sandbox held: no other client of a policy that is not shared reads it."""
        if not _kept_under(entry, policy):
            return False
        assert entry is not None  # _kept_under said so
        return entry.owner == client.identity or self._service._policy_shared(policy)

    # -- helpers -----------------------------------------------------------------------------

    def _find(self, sandbox_id: str, name: str) -> _Held:
        held = self._held.get(sandbox_id, {})
        snapshot = held.get(parse_snapshot_name(name))
        if snapshot is None:
            names = ", ".join(sorted(held)) or "none"
            raise NotFound(f"{sandbox_id} has no snapshot {name!r}; its snapshots: {names}")
        return snapshot

    async def _check_keep(self, sandbox: SandboxRecord, allowed: bool, max_kept: int) -> None:
        policy = sandbox.plan.policy
        catalog = self._service._catalog
        if not allowed or catalog is None:
            raise PolicyRefused(
                f"policy {policy!r} does not let snapshots be kept as images; take it without keep",
                rule="snapshots.keep_as_images",
            )
        entries = await anyio.to_thread.run_sync(catalog.entries)
        kept = sum(1 for entry in entries if _kept_under(entry, policy))
        if kept >= max_kept:
            raise PolicyRefused(
                f"policy {policy!r} keeps at most {max_kept} snapshots as images and has {kept}; "
                "delete_snapshot a kept one of a live sandbox, or ask the operator to remove one",
                rule="snapshots.max_kept",
            )

    def _record_kept(self, sandbox: SandboxRecord, snapshot: _Held) -> None:
        catalog = self._service._catalog
        assert catalog is not None  # _check_keep refused otherwise
        catalog.put(
            ImageEntry(
                name=kept_image(sandbox.sandbox_id, snapshot.ref.name),
                description=f"snapshot {snapshot.ref.name!r} of sandbox {sandbox.sandbox_id} "
                f"(image {sandbox.plan.image})",
                source="snapshot",
                origin=f"{sandbox.sandbox_id}:{snapshot.ref.name}",
                version=secrets.token_hex(4),
                built_at=snapshot.created_at,
                build_seconds=0,
                env=dict(sandbox.env),
                policy=sandbox.plan.policy,
                owner=sandbox.owner,
            )
        )


def _kept_under(entry: ImageEntry | None, policy: str) -> bool:
    """Whether ``entry`` is a snapshot ``policy`` kept as an image."""
    return entry is not None and entry.source == "snapshot" and entry.policy == policy
