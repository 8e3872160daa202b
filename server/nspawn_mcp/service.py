"""Use cases: the order of steps, ownership, quotas, lifetimes and cleanup on failure.

The service knows nothing of D-Bus or MCP. It resolves every request against the
operator's policy first (``nspawn_mcp.policy``), then drives a :class:`Backend`.
Cleanup runs shielded from cancellation, so a cancelled MCP request never leaves
half a sandbox behind.

Ownership: a sandbox belongs to the client that made it (:mod:`nspawn_mcp.identity`),
and while that client's stdio connection lasts, to that connection. Any other client
is told there is no such sandbox, unless the sandbox's policy shares them. When a
connection ends its sandboxes are destroyed, or kept until their TTL where the policy
says ``keep``; a restarted daemon gives connections a grace period to come back.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
import posixpath
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from . import commands, copies, hostfs
from .audit import AuditLog
from .backend.api import (
    Backend,
    CommandSpec,
    Jail,
    MeasuredUsage,
    OutputChunk,
    ProcessState,
    SnapshotRef,
)
from .commands import CommandRequest, Keep
from .errors import (
    BackendError,
    InvalidRequest,
    NotFound,
    PolicyRefused,
    QuotaExceeded,
    SandboxError,
    SandboxGone,
)
from .events import Action, EventFeed, Level, SandboxEvent
from .forwards import PortForwards
from .identity import Client, current_client
from .images import Catalog, ImageEntry
from .images.hints import not_installed
from .models import (
    CopyResult,
    ExecResult,
    ExposedPort,
    ImageList,
    ImageSummary,
    OsRelease,
    ProcessInfo,
    ProcessList,
    ProcessOutputResult,
    SandboxInfo,
    SandboxStatus,
    SandboxUsage,
    StdinWritten,
)
from .naming import new_sandbox_id, parse_sandbox_id
from .policy import (
    BindMount,
    CreateRequest,
    ExecRequest,
    HostTarget,
    Policy,
    PolicySet,
    SandboxPlan,
    check_container_path,
    confine_host_path,
    resolve_create,
    resolve_exec,
    resolve_expose,
)
from .policy.models import FilesPolicy
from .pool import MAX_AGE as POOL_MAX_AGE
from .pool import PoolSpec, WarmPool
from .records import Exposure, LiveSandbox, MetaStore, SandboxRecord
from .snapshots import Snapshots

__all__ = ["SandboxService"]

log = logging.getLogger(__name__)

_MiB = 1 << 20
_REAP_INTERVAL = 1.0
KILL_WAIT_SECONDS = 2.0
"""How long kill_process waits for a signalled process to end before it answers."""
_TOMBSTONES = 4096
"""How many gone sandboxes are remembered, so that a request for one says why it is gone."""
RECONNECT_GRACE = timedelta(seconds=30)
"""How long a restarted daemon waits for a connection to come back before applying its policy's
``on_disconnect`` to its sandboxes."""


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


class _HandOutFailed(Exception):
    """A pooled sandbox could not be adapted to a create's plan (it is removed)."""


@dataclass(frozen=True)
class _Tombstone:
    """What is left of a gone sandbox: whose it was and why it went."""

    owner: str
    policy: str
    reason: str


class SandboxService:
    def __init__(
        self,
        backend: Backend,
        policies: PolicySet,
        *,
        records_dir: Path,
        cwd: str | None = None,
        max_sandboxes: int = 64,
        clock: Callable[[], datetime] = _now,
        audit: AuditLog | None = None,
        catalog: Catalog | None = None,
        forwards: PortForwards | None = None,
        pool: list[PoolSpec] | None = None,
    ) -> None:
        """``pool``: what to keep warm (see :mod:`nspawn_mcp.pool`); run :attr:`pool`'s ``run``."""
        self._backend = backend
        self._catalog = catalog
        self._forwards = forwards
        """Where exposed ports listen; None: this server offers no port forwards."""
        self._policies = policies
        self._store = MetaStore(records_dir)
        self._cwd = cwd or os.getcwd()
        self._max_sandboxes = max_sandboxes
        self._clock = clock
        self._sandboxes: dict[str, SandboxRecord] = {}
        self._audit = audit or AuditLog(None)
        self._tombstones: OrderedDict[str, _Tombstone] = OrderedDict()
        self._sessions: set[str] = set()
        """Stdio connections that are connected now."""
        self._orphans: dict[str, datetime] = {}
        """Sessions that own sandboxes but are not connected, and when their grace period ends."""
        self.pool = WarmPool(backend, pool or [], room=self.room, clock=lambda: self._clock().timestamp())
        """Sandboxes started ahead of demand; run its ``run`` in a task and await its ``stop`` at the end."""
        self._cleanup: MemoryObjectSendStream[str] | None = None
        """Where destroys hand the remains of what they killed; None: :meth:`run_cleanup` is not running."""
        self._removing: set[str] = set()
        """Sandboxes killed whose remains are not removed yet (their ids are not given out again)."""
        self._removed: anyio.Event | None = None
        """Set each time remains were removed (what :meth:`settled` waits for)."""
        self.events = EventFeed()
        """What each client is told of its own sandboxes (MCP log messages); run its pump."""
        self.snapshots = Snapshots(self)
        """Snapshots, forks and restores of these sandboxes."""

    @contextlib.contextmanager
    def _audited(
        self, action: str, sandbox_id: str | None = None, **detail: object
    ) -> Iterator[dict[str, object]]:
        """Record the decision on ``action``; the body may add details (such as a new sandbox_id)."""
        extra: dict[str, object] = {}
        try:
            yield extra
        except BaseException as exc:  # cancellations are decisions too
            self._audit.record(action, sandbox_id=sandbox_id, error=exc, detail=detail | extra)
            if isinstance(exc, PolicyRefused | QuotaExceeded):  # a refusal: journaled, and its client told
                log.warning(
                    "refused %s for %s: %s",
                    action,
                    current_client.get(),
                    exc,
                    extra={
                        "sandbox": sandbox_id,
                        "event": "refused",
                        "rule": exc.rule if isinstance(exc, PolicyRefused) else "quota",
                    },
                )
                self._tell_caller("warning", "refused", f"{action} refused: {exc}", sandbox_id)
            raise
        identity = extra.pop("sandbox_id", sandbox_id)
        self._audit.record(
            action, sandbox_id=identity if isinstance(identity, str) else None, detail=detail | extra
        )

    # -- lifecycle -------------------------------------------------------------

    async def reconcile(self) -> None:
        """Adopt the running sandboxes that have a record; remove everything else of ours.

        Run once, at start, before any client is served (the daemon is the only process
        that creates sandboxes, so nothing is half-made by anybody else meanwhile).
        """
        self._store.discard_unfinished()
        running = await self._backend.running()
        grace_ends = self._clock() + RECONNECT_GRACE
        for sandbox_id in sorted(running):
            sandbox = self._store.load(sandbox_id)
            if sandbox is None or sandbox.state != "running":
                why = {
                    None: "no record of how it was made",
                    "creating": "the daemon died while making it",
                    "destroying": "the daemon died while destroying it",
                }[None if sandbox is None else sandbox.state]
                log.warning("removing sandbox %s: %s", sandbox_id, why)
                await self._backend.destroy(sandbox_id)
                self._store.remove(sandbox_id)
                if sandbox is not None and sandbox.state == "destroying":  # its owner asked for this
                    reason = "it was being destroyed when the nspawn-mcp daemon restarted"
                    self._tombstones[sandbox_id] = _Tombstone(sandbox.owner, sandbox.plan.policy, reason)
                continue
            try:
                await self._backend.adopt(sandbox_id, sandbox.plan)
            except Exception as exc:  # one sandbox that cannot be served must not keep the daemon down
                log.warning("removing sandbox %s: it cannot be adopted: %s", sandbox_id, exc)
                await self._backend.destroy(sandbox_id)
                self._store.remove(sandbox_id)
                reason = "the restarted nspawn-mcp daemon could not take it over"
                self._tombstones[sandbox_id] = _Tombstone(sandbox.owner, sandbox.plan.policy, reason)
                continue
            self._sandboxes[sandbox_id] = sandbox
            await self._restore_ports(sandbox)
            if sandbox.session is not None:
                self._orphans.setdefault(sandbox.session, grace_ends)
        for sandbox_id in sorted((await self._backend.leftovers() | self._store.ids()) - running):
            log.info("removing the remains of sandbox %s", sandbox_id)
            sandbox = self._store.load(sandbox_id)
            await self._backend.destroy(sandbox_id)
            self._store.remove(sandbox_id)
            if sandbox is not None and sandbox.state == "destroying":  # killed; its remains were left
                reason = "it was being destroyed when the nspawn-mcp daemon restarted"
                self._tombstones[sandbox_id] = _Tombstone(sandbox.owner, sandbox.plan.policy, reason)
        await self.snapshots.reconcile(set(self._sandboxes))

    async def _restore_ports(self, sandbox: SandboxRecord) -> None:
        """Listen again on the host ports an adopted sandbox's record names; drop (and log) the ones
        that cannot be had again (taken meanwhile, or the policy no longer allows them)."""
        if not sandbox.ports:
            return
        rules = self._policy_of(sandbox.plan.policy).ports
        allowed = {str(address) for address in rules.addresses}
        for port, exposure in sorted(sandbox.ports.items()):
            why = None
            if self._forwards is None or exposure.host not in allowed:
                why = "port forwards are not offered, or the policy no longer allows that address"
            else:
                try:
                    await self._forwards.open(
                        sandbox.sandbox_id, port, exposure.host, exposure.host_port, rules.max_connections
                    )
                except OSError as exc:
                    why = str(exc)
            if why is not None:
                log.warning(
                    "sandbox %s: dropping the exposure of port %d at %s:%d: %s",
                    sandbox.sandbox_id,
                    port,
                    exposure.host,
                    exposure.host_port,
                    why,
                )
                del sandbox.ports[port]
        self._store.save(sandbox)

    def machine_removed(self, name: str) -> None:
        """The sandbox's machine went away (it crashed, hit its TTL in systemd, ...)."""
        if self.pool.discard(name):
            return
        sandbox = self._sandboxes.get(name)
        if sandbox is not None and sandbox.state == "running":
            log.info("sandbox %s stopped on its own; cleaning up", name, extra={"sandbox": name})
            sandbox.state = "gone"

    # -- connections -------------------------------------------------------------

    def session_started(self, client: Client) -> None:
        """A stdio connection came (or came back, after a daemon restart: its sandboxes are its again)."""
        if client.session is not None:
            self._sessions.add(client.session)
            self._orphans.pop(client.session, None)

    async def session_ended(self, client: Client) -> None:
        """A stdio connection ended: its sandboxes are destroyed, or kept where the policy says so."""
        if client.session is None:
            return
        self._sessions.discard(client.session)
        self._orphans.pop(client.session, None)
        await self._release_session(client.identity, client.session)

    async def _release_session(self, identity: str, session: str) -> None:
        for sandbox in list(self._sandboxes.values()):
            if sandbox.session != session or sandbox.owner != identity or sandbox.state != "running":
                continue
            rules = self._policy_of(sandbox.plan.policy).sandboxes
            if rules.on_disconnect == "keep":
                sandbox.session = None
                self._store.save(sandbox)
                log.info("client %s disconnected; keeping %s until its TTL", identity, sandbox.sandbox_id)
                continue
            reason = (
                f"its client disconnected (policy {sandbox.plan.policy!r}: sandboxes.on_disconnect = destroy)"
            )
            with self._audited("destroy_sandbox", sandbox.sandbox_id, reason="client disconnected"):
                await self._destroy_quietly(sandbox, reason, "disconnected")

    async def run_reaper(self) -> None:
        """Forever: destroy expired sandboxes and clean up ones that died."""
        while True:
            await anyio.sleep(_REAP_INTERVAL)
            await self.reap_once()

    async def reap_once(self) -> None:
        """Destroy what expired, idled out or died, and the sandboxes of connections that never came back."""
        now = self._clock()
        for session, deadline in list(self._orphans.items()):
            if deadline <= now:
                del self._orphans[session]
                owners = {s.owner for s in self._sandboxes.values() if s.session == session}
                for owner in owners:
                    await self._release_session(owner, session)
        for sandbox in list(self._sandboxes.values()):
            reaped = await self._why_reaped(sandbox, now)
            if reaped is not None:
                event, reason = reaped
                with self._audited("destroy_sandbox", sandbox.sandbox_id, reason=reason.split(" (")[0]):
                    destroyed = await self._destroy_quietly(sandbox, reason, event)
                if destroyed:
                    self._tell_owner(
                        sandbox,
                        "notice" if event == "expired" else "warning",
                        "expired" if event == "expired" else "reaped",
                        f"sandbox {sandbox.sandbox_id} was destroyed: {reason}",
                    )

    async def _why_reaped(self, sandbox: SandboxRecord, now: datetime) -> tuple[str, str] | None:
        """What happened (a :data:`nspawn_mcp.journal.EVENTS` name) and why it is destroyed; None: it
        lives on."""
        if sandbox.state == "gone":
            if await self._oom_struck(sandbox):
                return "stopped", f"it was {self._oom_killed(sandbox)}"
            return "stopped", "it stopped on its own (it crashed, or its unit was stopped)"
        if sandbox.state != "running":
            return None
        if sandbox.expires_at <= now:
            return "expired", (
                f"it expired at {_stamp(sandbox.expires_at)} (its lifetime of "
                f"{int((sandbox.expires_at - sandbox.created_at).total_seconds())} s; "
                "policy rule: limits.*.ttl_seconds, extend_sandbox extends it)"
            )
        idle = self._policy_of(sandbox.plan.policy).sandboxes.idle_timeout_seconds
        if idle is not None and (sandbox.last_used or sandbox.created_at) + timedelta(seconds=idle) <= now:
            return (
                "idled-out",
                f"no tool call used it for {idle} s (policy rule: sandboxes.idle_timeout_seconds)",
            )
        return None

    async def _destroy_quietly(self, sandbox: SandboxRecord, reason: str, event: str) -> bool:
        """Destroy for a reason of the daemon's own; a failure is logged (the reaper tries again)
        and the answer is False."""
        try:
            await self._destroy(sandbox, reason, event)
        except SandboxError as exc:
            log.warning("cleaning up sandbox %s failed: %s", sandbox.sandbox_id, exc)
            return False
        return True

    # -- tools -----------------------------------------------------------------

    async def list_images(self) -> ImageList:
        """The installed images, what set-up recorded of each, and which of the caller's policies allow it."""
        client = current_client.get()
        usable = [name for name in self._policies.names if client.policies is None or name in client.policies]
        allowing = {name: self._policies.get(name).sandboxes.images for name in usable}
        recorded: dict[str, ImageEntry] = {}
        if self._catalog is not None:
            entries = await anyio.to_thread.run_sync(self._catalog.entries)
            recorded = {entry.name: entry for entry in entries}
        hidden = set()  # snapshots kept as images: for the policy and the client that kept each
        for entry in recorded.values():
            if entry.source != "snapshot":
                continue
            if entry.policy in allowing and self.snapshots.kept_allows(entry, entry.policy, client):
                allowing[entry.policy] = (*allowing[entry.policy], entry.name)
            else:
                hidden.add(entry.name)
        installed = [image for image in await self._backend.images() if image.name not in hidden]
        summaries = [
            _image_summary(
                image.name,
                recorded.get(image.name),
                size=image.usage_bytes,
                created=image.created,
                policies=[name for name in usable if image.name in allowing[name]],
                default_allows="default" in allowing and image.name in allowing["default"],
            )
            for image in installed
        ]
        wanted = {image for images in allowing.values() for image in images}
        return ImageList(images=summaries, not_installed=sorted(wanted - {i.name for i in installed}))

    async def _image_environment(self, image: str) -> dict[str, str]:
        """The environment the image's recipe sets for every command (none for an imported image)."""
        if self._catalog is None:
            return {}
        entry = await anyio.to_thread.run_sync(self._catalog.get, image)
        return dict(entry.env) if entry is not None else {}

    async def create(self, request: CreateRequest, env: Mapping[str, str] | None = None) -> SandboxInfo:
        """Create a sandbox; ``env`` is set for every command in it (a command's own env wins)."""
        detail = asdict(request) | ({"env": sorted(env)} if env else {})  # names only, never values
        with self._audited("create_sandbox", request=detail) as audit:
            info = await self._create(request, commands.sandbox_environment(env or {}))
            audit["sandbox_id"] = info.sandbox_id
        return info

    def _usable_policy(self, name: str, client: Client) -> Policy:
        """Policy ``name``, if the client may use it."""
        if client.policies is not None and name not in client.policies:
            raise PolicyRefused(
                f"policy {name!r} is not one this client may use; it may use: "
                + ", ".join(sorted(client.policies)),
                rule="the client's token (nspawn-mcp token add --policy)",
            )
        return self._policies.get(name)

    async def _create(self, request: CreateRequest, env: dict[str, str]) -> SandboxInfo:
        client = current_client.get()
        policy = self._usable_policy(request.policy, client)
        workdir = self._workdir(client, naming_host_paths=bool(request.mounts))
        kept: tuple[str, ...] = ()
        if request.image not in policy.sandboxes.images and self._catalog is not None:
            entry = await anyio.to_thread.run_sync(self._catalog.get, request.image)
            if self.snapshots.kept_allows(entry, request.policy, client):
                kept = (request.image,)
        plan = resolve_create(request.policy, policy, request, cwd=workdir, also_allowed=kept)
        if not self.pool.can_serve(plan) and plan.image not in await self._backend.available_images():
            raise NotFound(not_installed(plan.image))
        if plan.mounts:
            plan = replace(plan, mounts=await anyio.to_thread.run_sync(_resolve_binds, plan.mounts))
        # The image's environment is taken now: a rebuild of the image later does not change
        # what this sandbox's commands see (its files do not change either).
        env = commands.merged_environment(await self._image_environment(plan.image), env, {})
        return await self._launch(policy, plan, env)

    async def _launch(
        self, policy: Policy, plan: SandboxPlan, env: dict[str, str], source: SnapshotRef | str | None = None
    ) -> SandboxInfo:
        """Make the caller's sandbox of a resolved plan: from the warm pool, from its image, or from
        ``source`` (a fork's: see :meth:`Backend.create`)."""
        client = current_client.get()
        if source is not None:
            sandbox = await self._start(policy, plan, client, env, from_pool=False, source=source)
        else:
            try:
                sandbox = await self._start(policy, plan, client, env, from_pool=True)
            except _HandOutFailed:  # the pooled sandbox it took is removed: start one
                sandbox = await self._start(policy, plan, client, env, from_pool=False)
        log.info(
            "created %s (policy %s) for %s",
            sandbox.sandbox_id,
            plan.policy,
            client,
            extra={
                "sandbox": sandbox.sandbox_id,
                "client": client.identity,
                "event": "created",
                "policy": plan.policy,
            },
        )
        self._tell_caller(
            "info",
            "created",
            f"sandbox {sandbox.sandbox_id} created (image {plan.image!r}, policy {plan.policy!r}); "
            f"it expires at {_stamp(sandbox.expires_at)}",
            sandbox.sandbox_id,
        )
        return sandbox.info()

    async def _start(
        self,
        policy: Policy,
        plan: SandboxPlan,
        client: Client,
        env: dict[str, str],
        *,
        from_pool: bool,
        source: SnapshotRef | str | None = None,
    ) -> SandboxRecord:
        """Register the sandbox and start it, or take one from the warm pool and adapt it to ``plan``
        (raises _HandOutFailed when that fails: it is removed, and the caller may start one instead)."""
        # From the quota checks to registering the sandbox nothing awaits, so concurrent
        # creates cannot both take the last slot, the same pooled sandbox or the same subnet.
        owner = client.identity
        self._check_quotas(policy, plan, owner)
        pooled = self.pool.take(plan) if from_pool else None
        sandbox_id = self._fresh_id() if pooled is None else pooled.sandbox_id
        if plan.egress is not None:
            subnet = self._backend.reserve_subnet(sandbox_id)  # released when it is destroyed
            plan = replace(plan, egress=replace(plan.egress, subnet=subnet))
        created = self._clock()  # a pooled sandbox's life starts now too
        sandbox = SandboxRecord(
            sandbox_id=sandbox_id,
            plan=plan,
            created_at=created,
            expires_at=created + timedelta(seconds=plan.limits.ttl_seconds),
            owner=owner,
            session=client.session,
            env=env,
        )
        self._sandboxes[sandbox.sandbox_id] = sandbox
        try:
            if pooled is None:
                self._store.save(sandbox)  # "creating": a daemon that dies from here on leaves it half-made
                with self.pool.cold_create():
                    await self._backend.create(sandbox.sandbox_id, plan, source)
            else:  # no record until it is adapted: a daemon that dies meanwhile removes it
                await self._backend.adapt(sandbox.sandbox_id, pooled.plan, plan)
            sandbox.state = "running"
            self._store.save(sandbox)  # complete: a restarted daemon adopts it
        except Exception as exc:
            with anyio.CancelScope(shield=True):
                await self._destroy(sandbox, "its creation failed", "create-failed")
            if pooled is None:
                raise
            log.warning("pooled sandbox %s could not be handed out (%s); starting a new one", sandbox_id, exc)
            raise _HandOutFailed from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._destroy(sandbox, "its creation failed", "create-failed")
            raise
        return sandbox

    def _fresh_id(self) -> str:
        """A new sandbox id: never one given out before while anything remembers it."""
        sandbox_id = new_sandbox_id()
        while sandbox_id in self._sandboxes or sandbox_id in self._removing or sandbox_id in self._tombstones:
            sandbox_id = new_sandbox_id()
        return sandbox_id

    def room(self) -> int:
        """How many more sandboxes (clients' and pooled) the server's maximum leaves room for."""
        return self._max_sandboxes - len(self._live()) - self.pool.ready()

    def _live(self) -> list[SandboxRecord]:
        """The clients' sandboxes that count against the server's maximum (all but gone ones)."""
        return [s for s in self._sandboxes.values() if s.state != "gone"]

    def _check_quotas(self, policy: Policy, plan: SandboxPlan, owner: str, count: int = 1) -> None:
        """Whether ``count`` more sandboxes of ``plan`` fit."""
        live = self._live()
        if len(live) + count > self._max_sandboxes:
            raise QuotaExceeded(
                f"this server already runs {len(live)} sandboxes, its maximum; destroy one first"
            )
        same_policy = [s for s in live if s.plan.policy == plan.policy]
        if len(same_policy) + count > policy.sandboxes.max_live:
            raise QuotaExceeded(
                f"policy {plan.policy!r} allows {policy.sandboxes.max_live} live sandboxes and "
                f"{len(same_policy)} exist; destroy one first (policy rule: sandboxes.max_live)"
            )
        per_client = policy.sandboxes.max_live_per_client
        mine = sum(1 for s in same_policy if s.owner == owner)
        if per_client is not None and mine + count > per_client:
            raise QuotaExceeded(
                f"policy {plan.policy!r} allows {per_client} live sandboxes per client and you have {mine} "
                f"(you are {owner}); "
                "destroy one first (policy rule: sandboxes.max_live_per_client)"
            )

    async def destroy(self, sandbox_id: str) -> None:
        with self._audited("destroy_sandbox", sandbox_id):
            sandbox = self._get(sandbox_id, allow_gone=True)
            await self._destroy(sandbox, f"its owner destroyed it at {_stamp(self._clock())}")
        self._tell_caller("info", "destroyed", f"sandbox {sandbox_id} destroyed", sandbox_id)

    async def _destroy(self, sandbox: SandboxRecord, reason: str, event: str = "destroyed") -> None:
        """Destroy it; the journal entry says ``event`` (see :data:`nspawn_mcp.journal.EVENTS`) and why.

        Returns once nothing of the sandbox runs any more (its processes are killed); its remains
        (units, snapshot, directories, record) are removed by :meth:`run_cleanup` if it runs.
        """
        sandbox.state = "destroying"
        with anyio.CancelScope(shield=True):
            if self._forwards is not None:
                await self._forwards.close_sandbox(sandbox.sandbox_id)
            try:  # a daemon that dies from here on leaves it half-destroyed: the next one finishes
                self._store.save(sandbox)
            except OSError as exc:
                log.warning("cannot mark sandbox %s as being destroyed: %s", sandbox.sandbox_id, exc)
            try:
                await self._backend.kill(sandbox.sandbox_id)
                if self._cleanup is None:  # nobody removes remains in the background: now, then
                    await self._remove_remains(sandbox.sandbox_id)
                else:
                    self._removing.add(sandbox.sandbox_id)
                    self._cleanup.send_nowait(sandbox.sandbox_id)
            except BaseException:
                sandbox.state = "gone"
                raise
            self._sandboxes.pop(sandbox.sandbox_id, None)
            try:
                await self.snapshots.discard(sandbox.sandbox_id)
            except SandboxError as exc:  # the next start removes them
                log.warning("removing the snapshots of %s failed: %s", sandbox.sandbox_id, exc)
            self._tombstones[sandbox.sandbox_id] = _Tombstone(sandbox.owner, sandbox.plan.policy, reason)
            while len(self._tombstones) > _TOMBSTONES:
                self._tombstones.popitem(last=False)
        log.info(
            "destroyed %s: %s",
            sandbox.sandbox_id,
            reason,
            extra={
                "sandbox": sandbox.sandbox_id,
                "client": sandbox.owner,
                "event": event,
                "policy": sandbox.plan.policy,
            },
        )

    async def _remove_remains(self, sandbox_id: str) -> None:
        """Everything left of a killed sandbox, then its record (the record goes last: until then a
        restarted daemon knows to finish the job)."""
        await self._backend.destroy(sandbox_id)
        self._store.remove(sandbox_id)

    async def run_cleanup(self) -> None:
        """Forever: remove the remains of destroyed sandboxes, behind the destroys that killed them.

        One at a time, in order; a removal that fails is logged and left to the next daemon start's
        reconcile (the record still says "destroying")."""
        send, receive = anyio.create_memory_object_stream[str](math.inf)
        self._cleanup = send
        try:
            with send, receive:
                async for sandbox_id in receive:
                    try:  # not shielded: a daemon that stops meanwhile leaves it to the next one's reconcile
                        await self._remove_remains(sandbox_id)
                    except SandboxError as exc:
                        log.warning("removing what is left of sandbox %s failed: %s", sandbox_id, exc)
                    finally:
                        self._removing.discard(sandbox_id)
                        if self._removed is not None:
                            self._removed.set()
        finally:
            self._cleanup = None

    async def settled(self) -> None:
        """Return once the remains of every destroyed sandbox are removed (tests, benchmarks)."""
        while self._removing:
            self._removed = anyio.Event()
            await self._removed.wait()

    async def live_sandboxes(self) -> list[LiveSandbox]:
        """Every live sandbox, whoever made it, and the warm pool's, with what each uses now (for the
        operator, who is root on the host: the daemon admits only such peers to ask, see
        nspawn_mcp.daemon.sessions)."""
        # taken at one instant (no await), so no sandbox is missed or counted twice while it is
        # handed out of the pool meanwhile
        rows = [
            LiveSandbox(
                sandbox_id=sandbox.sandbox_id,
                owner=sandbox.owner,
                policy=sandbox.plan.policy,
                image=sandbox.plan.image,
                created_at=sandbox.created_at,
                expires_at=sandbox.expires_at,
                memory_bytes=None,
                cpu_nsec=None,
                tasks=None,
                connected=sandbox.session is not None and sandbox.session in self._sessions,
            )
            for sandbox in sorted(self._sandboxes.values(), key=lambda s: s.created_at)
            if sandbox.state == "running"
        ]
        for pooled in self.pool.sandboxes():
            started = datetime.fromtimestamp(pooled.started, UTC)
            rows.append(
                LiveSandbox(
                    sandbox_id=pooled.sandbox_id,
                    owner="",
                    policy=pooled.plan.policy,
                    image=pooled.plan.image,
                    created_at=started,
                    expires_at=started + timedelta(seconds=POOL_MAX_AGE),
                    memory_bytes=None,
                    cpu_nsec=None,
                    tasks=None,
                    connected=False,
                    pooled=True,
                )
            )
        measured = []
        for row in rows:
            try:
                usage = await self._backend.usage(row.sandbox_id)
            except BackendError:  # going away meanwhile: a row without figures, not a failed list
                usage = MeasuredUsage()
            measured.append(
                replace(row, memory_bytes=usage.memory_bytes, cpu_nsec=usage.cpu_nsec, tasks=usage.tasks)
            )
        return measured

    async def operator_destroy(self, sandbox_id: str) -> None:
        """Destroy any client's sandbox (the operator's ``nspawn-mcp destroy``); its owner is told,
        when it next asks for it, that the operator destroyed it."""
        with self._audited("destroy_sandbox", sandbox_id, reason="operator"):
            sandbox = self._sandboxes.get(parse_sandbox_id(sandbox_id))
            if sandbox is None or sandbox.state in ("creating", "destroying"):
                raise NotFound(f"no live sandbox {sandbox_id}; `nspawn-mcp list` shows them")
            reason = f"the host's operator destroyed it at {_stamp(self._clock())}"
            await self._destroy(sandbox, reason, "destroyed")
        self._tell_owner(sandbox, "warning", "destroyed", f"sandbox {sandbox_id} was destroyed: {reason}")

    def list(self) -> list[SandboxInfo]:
        """The live sandboxes the calling client may see."""
        client = current_client.get()
        return [
            s.info()
            for s in self._sandboxes.values()
            if s.state == "running" and self._visible(s.owner, s.session, s.plan.policy, client)
        ]

    async def extend(self, sandbox_id: str, seconds: int) -> SandboxInfo:
        """Push the sandbox's expiry out by ``seconds``, within its policy's longest lifetime."""
        with self._audited("extend_sandbox", sandbox_id, seconds=seconds):
            sandbox = self._get(sandbox_id)
            longest = sandbox.plan.limits.lifetime_cap_seconds
            expires = sandbox.expires_at + timedelta(seconds=seconds)
            if expires - sandbox.created_at > timedelta(seconds=longest):
                left = longest - int((sandbox.expires_at - sandbox.created_at).total_seconds())
                raise PolicyRefused(
                    f"a sandbox of policy {sandbox.plan.policy!r} lives at most {longest} s in all; "
                    f"{sandbox_id} can be extended by at most {max(left, 0)} s more",
                    rule="limits.max.ttl_seconds",
                )
            sandbox.expires_at = expires
            self._store.save(sandbox)
        return sandbox.info()

    def _command(
        self,
        sandbox: SandboxRecord,
        request: CommandRequest,
        max_output_bytes: int | None = None,
        keep: Keep = "head",
    ) -> CommandSpec:
        policy = self._policy_of(sandbox.plan.policy)
        stdin_bytes = (request.stdin or "").encode("utf-8", errors="surrogatepass")
        plan = resolve_exec(
            policy, ExecRequest(timeout_seconds=request.timeout_seconds, stdin_bytes=len(stdin_bytes))
        )
        return CommandSpec(
            argv=commands.argv(request.command),
            cwd=check_container_path(request.cwd) if request.cwd is not None else None,
            env=commands.merged_environment({}, sandbox.env, commands.environment(request.env or {})),
            stdin=stdin_bytes,
            timeout_seconds=plan.timeout_seconds,
            max_output_bytes=max_output_bytes or plan.max_output_bytes,
            user=commands.user_name(request.user),
            keep=keep,
        )

    async def exec(
        self,
        sandbox_id: str,
        request: CommandRequest,
        *,
        include_base64: bool = False,
        keep: Keep = "head",
        on_output: Callable[[OutputChunk], Awaitable[None]] | None = None,
    ) -> ExecResult:
        """Run a command; its stdout and stderr together fit the policy's exec.max_output_bytes (the
        base64 copies, if asked for, counted too), cut at the end ``keep`` does not keep."""
        summary = commands.summary(request.command)
        with self._audited("exec", sandbox_id, command=summary, user=request.user) as audit:
            sandbox = self._get(sandbox_id)
            spec = self._command(sandbox, request, keep=keep)
            async with self._jail(sandbox) as jail:
                outcome = await jail.run(spec, on_output)
            audit["exit_code"] = outcome.exit_code
        # base64 is 4/3 of the bytes (padding included): text and copy together stay in the cap
        budget = (spec.max_output_bytes - 8) * 3 // 7 if include_base64 else spec.max_output_bytes
        stdout, stderr, cut = commands.fit_output(outcome.stdout, outcome.stderr, budget, keep)
        truncated = cut or outcome.stdout_truncated or outcome.stderr_truncated
        return ExecResult(
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            timed_out=outcome.timed_out,
            truncated=truncated,
            kept=keep if truncated else None,
            oom_killed=await self._oom_struck(sandbox) if commands.killed_by_sigkill(outcome) else False,
            duration_ms=outcome.duration_ms,
            stdout_base64=base64.b64encode(stdout).decode() if include_base64 else None,
            stderr_base64=base64.b64encode(stderr).decode() if include_base64 else None,
        )

    async def _oom_struck(self, sandbox: SandboxRecord) -> bool:
        """Whether the OOM killer struck in the sandbox since we last looked."""
        count = await self._backend.oom_kills(sandbox.sandbox_id)
        if count is None or count <= sandbox.oom_kills_seen:
            return False
        sandbox.oom_kills_seen = count
        return True

    @contextlib.asynccontextmanager
    async def _jail(self, sandbox: SandboxRecord) -> AsyncIterator[Jail]:
        """The sandbox's supervisor; if the sandbox died of OOM meanwhile, the error says so."""
        try:
            yield self._backend.jail(sandbox.sandbox_id)
        except SandboxGone:
            if await self._oom_struck(sandbox):
                raise SandboxGone(f"sandbox {sandbox.sandbox_id} was {self._oom_killed(sandbox)}") from None
            raise

    @contextlib.asynccontextmanager
    async def file_access(
        self, action: str, sandbox_id: str, **detail: object
    ) -> AsyncIterator[tuple[Jail, FilesPolicy]]:
        """The one way the file tools (:mod:`nspawn_mcp.files`) reach a sandbox: ownership checked
        (:meth:`_get`), the decision audited; its supervisor and its policy's file rules."""
        with self._audited(action, sandbox_id, **detail):
            sandbox = self._get(sandbox_id)
            async with self._jail(sandbox) as jail:
                yield jail, self._policy_of(sandbox.plan.policy).files

    @staticmethod
    def _oom_killed(sandbox: SandboxRecord) -> str:
        return f"OOM-killed: it hit its memory cap of {sandbox.plan.limits.memory_bytes // _MiB} MiB"

    # -- ports -------------------------------------------------------------------------

    async def expose_port(
        self, sandbox_id: str, sandbox_port: int, host_address: str | None = None
    ) -> ExposedPort:
        """Forward a host address (a free port the kernel picks) to ``sandbox_port`` on the sandbox's
        loopback, until unexpose_port or the sandbox's end."""
        with self._audited("expose_port", sandbox_id, sandbox_port=sandbox_port, host=host_address) as audit:
            sandbox = self._get(sandbox_id)
            if sandbox_port in sandbox.ports:
                shown = sandbox.ports[sandbox_port].info().address
                raise InvalidRequest(
                    f"port {sandbox_port} of {sandbox_id} is already exposed at {shown}; "
                    "unexpose_port it first to expose it elsewhere"
                )
            policy = self._policy_of(sandbox.plan.policy)
            host = resolve_expose(sandbox.plan.policy, policy, sandbox_port, host_address, len(sandbox.ports))
            if self._forwards is None:
                raise BackendError("this server does not offer port forwards")
            try:
                host_port = await self._forwards.open(
                    sandbox_id, sandbox_port, host, 0, policy.ports.max_connections
                )
            except OSError as exc:
                log.warning("cannot listen on %s for %s: %s", host, sandbox_id, exc)
                raise BackendError(f"cannot listen on host address {host}; ask the operator") from None
            exposure = Exposure(sandbox_port=sandbox_port, host=host, host_port=host_port)
            sandbox.ports[sandbox_port] = exposure
            try:
                self._store.save(sandbox)
            except BaseException:
                del sandbox.ports[sandbox_port]
                with anyio.CancelScope(shield=True):
                    await self._forwards.close(sandbox_id, sandbox_port)
                raise
            audit["host_port"] = host_port
        return exposure.info()

    async def unexpose_port(self, sandbox_id: str, sandbox_port: int) -> None:
        """Stop forwarding ``sandbox_port``; its open connections end too."""
        with self._audited("unexpose_port", sandbox_id, sandbox_port=sandbox_port):
            sandbox = self._get(sandbox_id)
            if sandbox_port not in sandbox.ports:
                exposed = ", ".join(str(port) for port in sorted(sandbox.ports)) or "none"
                raise NotFound(
                    f"port {sandbox_port} of {sandbox_id} is not exposed; exposed ports: {exposed}"
                )
            del sandbox.ports[sandbox_port]
            if self._forwards is not None:
                await self._forwards.close(sandbox_id, sandbox_port)
            self._store.save(sandbox)

    # -- background processes ------------------------------------------------------

    async def start_background(self, sandbox_id: str, request: CommandRequest) -> ExecResult:
        """Start a command in the background; its output is kept (bounded) inside the sandbox."""
        summary = commands.summary(request.command)
        with self._audited("exec_background", sandbox_id, command=summary, user=request.user):
            sandbox = self._get(sandbox_id)
            policy = self._policy_of(sandbox.plan.policy)
            spec = self._command(sandbox, request, policy.exec.max_background_output_bytes)
            async with self._jail(sandbox) as jail:
                running = sum(1 for process in await jail.list() if process.running)
                if running >= policy.exec.max_background_processes:
                    raise QuotaExceeded(
                        f"{running} background processes are running in {sandbox_id}, the policy's maximum; "
                        "kill one first (policy rule: exec.max_background_processes)"
                    )
                # no timeout unless one was asked for: background processes live with the sandbox
                timeout = spec.timeout_seconds if request.timeout_seconds is not None else None
                process_id = await jail.spawn(spec, timeout)

        return ExecResult(
            exit_code=None,
            stdout="",
            stderr="",
            timed_out=False,
            truncated=False,
            duration_ms=0.0,
            process_id=process_id,
        )

    async def read_process_output(
        self, sandbox_id: str, process_id: str, since: str | None = None, keep: Keep = "head"
    ) -> ProcessOutputResult:
        """Output after the cursor, at most exec.max_output_bytes a stream: the oldest first (head) or,
        with ``keep='tail'``, the newest, skipping the rest."""
        sandbox = self._get(sandbox_id)
        stdout_offset, stderr_offset = commands.parse_cursor(since)
        limit = self._policy_of(sandbox.plan.policy).exec.max_output_bytes
        tail = keep == "tail"
        async with self._jail(sandbox) as jail:
            output = await jail.read(
                commands.process_id(process_id), stdout_offset, stderr_offset, limit, tail
            )
        skipped = (output.next_stdout_offset - len(output.stdout) - stdout_offset) + (
            output.next_stderr_offset - len(output.stderr) - stderr_offset
        )
        return ProcessOutputResult(
            skipped_bytes=skipped if tail else None,
            process=_process_info(output.state),
            stdout=output.stdout.decode("utf-8", errors="replace"),
            stderr=output.stderr.decode("utf-8", errors="replace"),
            next_cursor=f"{output.next_stdout_offset}:{output.next_stderr_offset}",
            more=len(output.stdout) >= limit or len(output.stderr) >= limit,
        )

    async def write_process_stdin(
        self, sandbox_id: str, process_id: str, data: str, close: bool
    ) -> StdinWritten:
        sandbox = self._get(sandbox_id)
        payload = data.encode("utf-8", errors="surrogatepass")
        limit = self._policy_of(sandbox.plan.policy).exec.max_stdin_bytes
        if len(payload) > limit:
            raise PolicyRefused(
                f"data is {len(payload)} bytes, above the maximum {limit}", rule="exec.max_stdin_bytes"
            )
        async with self._jail(sandbox) as jail:
            written = await jail.write(commands.process_id(process_id), payload, close)
        return StdinWritten(process_id=process_id, written=written, closed=close)

    async def kill_process(self, sandbox_id: str, process_id: str, signal: str | int = "TERM") -> ProcessInfo:
        """Signal a background process and answer with its state once it ended, or after
        :data:`KILL_WAIT_SECONDS` if it has not (it ignored the signal, or was only paused)."""
        sandbox = self._get(sandbox_id)
        number = commands.signal_number(signal)
        async with self._jail(sandbox) as jail:
            state = await jail.kill(commands.process_id(process_id), number, KILL_WAIT_SECONDS)
        return _process_info(state).model_copy(update={"signalled": commands.signal_name(number)})

    async def list_processes(self, sandbox_id: str) -> ProcessList:
        sandbox = self._get(sandbox_id)
        async with self._jail(sandbox) as jail:
            states = await jail.list()
        return ProcessList(processes=[_process_info(state) for state in states])

    async def copy_to_sandbox(
        self, sandbox_id: str, host_source: str, sandbox_destination: str
    ) -> CopyResult:
        with self._audited("copy_to_sandbox", sandbox_id, host_path=host_source[:4096]):
            sandbox = self._get(sandbox_id)
            destination = check_container_path(sandbox_destination)
            target = self._host_target(sandbox, host_source)
            limit = self._policy_of(sandbox.plan.policy).files.max_copy_bytes
            async with self._jail(sandbox) as jail:
                return await copies.copy_in(self._backend, sandbox_id, jail, target, destination, limit)

    async def copy_from_sandbox(
        self, sandbox_id: str, sandbox_source: str, host_destination: str
    ) -> CopyResult:
        """Through the sandbox's supervisor: what root inside may read, checked and capped as it comes."""
        with self._audited("copy_from_sandbox", sandbox_id, host_path=host_destination[:4096]):
            sandbox = self._get(sandbox_id)
            source = check_container_path(sandbox_source)
            target = self._host_target(sandbox, host_destination)
            limit = self._policy_of(sandbox.plan.policy).files.max_copy_bytes
            async with self._jail(sandbox) as jail:
                return await copies.copy_out(jail, source, target, limit)

    async def status(self, sandbox_id: str) -> SandboxStatus:
        """A sandbox now, for its owner: limits, what it uses, expiry, exposed ports."""
        sandbox = self._get(sandbox_id, allow_gone=True)
        measured = await self._backend.usage(sandbox_id)
        info = sandbox.info()
        return SandboxStatus(
            sandbox_id=sandbox_id,
            status="running" if sandbox.state == "running" else "stopped",
            image=info.image,
            policy=info.policy,
            network=self._policy_of(sandbox.plan.policy).network.mode,
            limits=info.limits,
            usage=SandboxUsage(
                memory_mb=None if measured.memory_bytes is None else round(measured.memory_bytes / _MiB, 1),
                cpu_seconds=None if measured.cpu_nsec is None else round(measured.cpu_nsec / 1e9, 3),
                processes=measured.tasks,
                disk_mb=None if measured.disk_bytes is None else round(measured.disk_bytes / _MiB, 1),
            ),
            created_at=info.created_at,
            expires_at=info.expires_at,
            expires_in_seconds=max(0, int((sandbox.expires_at - self._clock()).total_seconds())),
            ports=info.ports,
            mounts=info.mounts,
            env=info.env,
        )

    # -- helpers -----------------------------------------------------------------

    def _tell_caller(self, level: Level, action: Action, message: str, sandbox_id: str | None) -> None:
        """An event for the client of the request being served (see :mod:`nspawn_mcp.events`)."""
        client = current_client.get()
        self.events.emit(SandboxEvent(level, action, message, client.identity, client.session, sandbox_id))

    def _tell_owner(self, sandbox: SandboxRecord, level: Level, action: Action, message: str) -> None:
        """An event for the client that owns ``sandbox``, whoever's request (or the reaper) caused it."""
        self.events.emit(
            SandboxEvent(level, action, message, sandbox.owner, sandbox.session, sandbox.sandbox_id)
        )

    def _policy_shared(self, name: str) -> bool:
        """Whether policy ``name`` shares its sandboxes between clients (False if it is gone)."""
        return name in self._policies.policies and self._policies.policies[name].sandboxes.shared

    def _policy_of(self, name: str) -> Policy:
        """The policy a sandbox was made under; the strictest one (an empty policy) if the operator
        removed it since (a restarted daemon adopts sandboxes of policies it no longer has)."""
        try:
            return self._policies.get(name)
        except PolicyRefused:
            return Policy()

    def _visible(self, owner: str, session: str | None, policy: str, client: Client) -> bool:
        """Whether ``client`` may see a sandbox: its own (while its connection lasts), or a shared one."""
        if client.identity == "local" or self._policy_of(policy).sandboxes.shared:
            return True
        return owner == client.identity and session in (None, client.session)

    def _get(self, sandbox_id: str, *, allow_gone: bool = False) -> SandboxRecord:
        parse_sandbox_id(sandbox_id)
        client = current_client.get()
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None or not self._visible(sandbox.owner, sandbox.session, sandbox.plan.policy, client):
            tombstone = self._tombstones.get(sandbox_id)
            # the identity that owned it is told why it went, from whichever connection it asks
            if tombstone is not None and self._visible(tombstone.owner, None, tombstone.policy, client):
                raise SandboxGone(f"sandbox {sandbox_id} is gone: {tombstone.reason}; create a new one")
            raise NotFound(f"no sandbox {sandbox_id}; list_sandboxes shows yours")
        if sandbox.state in ("creating", "destroying"):
            raise NotFound(f"no sandbox {sandbox_id}; list_sandboxes shows yours")
        if sandbox.state == "gone" and not allow_gone:
            raise SandboxGone(f"sandbox {sandbox_id} has stopped on its own; create a new one")
        sandbox.last_used = self._clock()
        return sandbox

    def _workdir(self, client: Client, *, naming_host_paths: bool) -> str:
        """What the client's relative host paths (and the policy's relative directories) are relative to.

        A client with no working directory on this host (a non-root peer) may not name host
        paths at all; without any, "/" makes relative allowed directories protected ones, which
        never count.
        """
        if client.identity == "local":
            return self._cwd
        if client.workdir is not None:
            return client.workdir
        if naming_host_paths:
            raise InvalidRequest(
                "host paths are not available to this client: copy_file and mounts are for clients "
                "running as root on the daemon's host (and HTTP clients, where the policy names "
                "absolute host directories)"
            )
        return "/"

    def _host_target(self, sandbox: SandboxRecord, path: str) -> HostTarget:
        workdir = self._workdir(current_client.get(), naming_host_paths=True)
        return confine_host_path(path, sandbox.plan.allowed_host_roots, workdir)


def _resolve_binds(mounts: tuple[BindMount, ...]) -> tuple[BindMount, ...]:
    """Each bind's source, resolved on the host beneath its allowed root (blocking I/O)."""
    resolved = []
    for mount in mounts:
        relative = posixpath.relpath(mount.source, mount.root)
        source = hostfs.resolve_bind_source(
            HostTarget(root=mount.root, relative=relative), writable=mount.writable
        )
        resolved.append(
            replace(mount, root=source.root, source=source.path, device=source.device, inode=source.inode)
        )
    return tuple(resolved)


def _process_info(state: ProcessState) -> ProcessInfo:
    return ProcessInfo(
        process_id=state.process_id,
        command=list(state.argv),
        running=state.running,
        exit_code=state.exit_code,
        signal=state.signal,
        timed_out=state.timed_out,
        truncated=state.stdout_truncated or state.stderr_truncated,
    )


def _image_summary(
    name: str,
    entry: ImageEntry | None,
    *,
    size: int | None,
    created: datetime | None,
    policies: list[str],
    default_allows: bool,
) -> ImageSummary:
    os_release = None
    if entry is not None and entry.os_release:
        fields = entry.os_release
        os_release = OsRelease(
            pretty_name=fields.get("PRETTY_NAME"), id=fields.get("ID"), version=fields.get("VERSION_ID")
        )
    when = entry.built_at if entry is not None else created
    return ImageSummary(
        name=name,
        description=entry.description if entry is not None else "",
        size_mb=round(size / _MiB, 1) if size is not None else None,
        created_at=_stamp(when.astimezone(UTC)) if when is not None else None,
        os_release=os_release,
        packages=list(entry.packages) if entry is not None else [],
        source=entry.source if entry is not None else None,
        policies=policies,
        default_policy_allows=default_allows,
    )
