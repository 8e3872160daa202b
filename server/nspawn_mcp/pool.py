"""The warm pool: sandboxes started ahead of demand, handed out by ``create_sandbox``.

The operator chooses what is pooled, per policy (``[pool] size`` sandboxes of each of
``[pool] images``, started with the policy's default limits and network). A create that
such a sandbox can serve takes one instead of starting one; its caps are then changed to
what the create asked (a running slice takes new MemoryMax / CPUQuota / TasksMax, the
image pool a new disk limit), and its life (its TTL) starts there. What cannot change on a
running sandbox decides what it can serve (:func:`fits`): its image, its network mode,
NoNewPrivileges, the size of its ``/dev/shm`` (a quarter of the memory it started with),
and binds, which pooled sandboxes never have.

Pooled sandboxes belong to nobody: they count against no policy's or client's quota,
only against the server's own maximum (the pool never takes the last places from the
clients), and the daemon keeps no record of them. A daemon that dies leaves them without
a record, so the next one removes them when it reconciles; one that stops removes them
itself (:meth:`WarmPool.stop`). A pooled sandbox older than :data:`MAX_AGE` is replaced
by a new one: its unit's lifetime cap (``RuntimeMaxUSec``, fixed at start) is the policy's
plus :data:`MAX_AGE`, so that a sandbox handed out late still gets its whole lifetime.

Refills run one at a time and only while no cold create is in flight
(:meth:`WarmPool.cold_create`): the pool uses the machine's idle moments, never the time
of the calls a client waits for.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import anyio

from .backend.api import Backend, CommandSpec
from .errors import BackendError
from .naming import new_sandbox_id
from .policy import CreateRequest, Policy, PolicySet, SandboxPlan, resolve_create

__all__ = ["MAX_AGE", "PoolSpec", "PooledSandbox", "WarmPool", "fits", "pool_specs"]

log = logging.getLogger(__name__)

MAX_AGE = 600.0
"""Seconds a pooled sandbox waits for a client before it is replaced by a fresh one."""
_RETRY_FIRST, _RETRY_MAX = 1.0, 60.0
"""Back-off after a failed refill (an image not installed, the host out of room)."""
_DRAIN_TIMEOUT = 30.0
_TICK = 1.0
_WARM_UP = CommandSpec(argv=("true",), cwd="/", env={}, stdin=b"", timeout_seconds=10, max_output_bytes=1024)


@dataclass(frozen=True)
class PoolSpec:
    """Keep ``size`` sandboxes started for ``plan`` (one policy's defaults for one image)."""

    plan: SandboxPlan
    size: int

    @property
    def label(self) -> str:
        return f"policy {self.plan.policy!r}, image {self.plan.image!r}"


@dataclass(frozen=True)
class PooledSandbox:
    sandbox_id: str
    plan: SandboxPlan
    """What it was started with (its caps change at hand-out)."""
    started: float
    """``time.monotonic()`` when it was ready."""


def pool_specs(policies: PolicySet) -> list[PoolSpec]:
    """What the operator's policies ask to keep warm."""
    return [
        PoolSpec(_pooled_plan(name, policy, image), policy.pool.size)
        for name, policy in sorted(policies.policies.items())
        if policy.pool.size > 0
        for image in policy.pool.images or policy.sandboxes.images[:1]
    ]


def _pooled_plan(name: str, policy: Policy, image: str) -> SandboxPlan:
    # no mounts are asked, so the working directory only shapes allowed_host_roots, which is the
    # taking client's own (its create's plan is the one recorded)
    plan = resolve_create(name, policy, CreateRequest(image=image, policy=name), cwd="/")
    cap = plan.limits.lifetime_cap_seconds + int(MAX_AGE)
    # an egress sandbox waits with its veth but no subnet, rules or resolver: those come at
    # hand-out (see Backend.adapt), from the taking create's plan
    return replace(plan, allowed_host_roots=(), egress=None, limits=replace(plan.limits, max_ttl_seconds=cap))


def fits(started: SandboxPlan, wanted: SandboxPlan) -> bool:
    """Whether a sandbox started for ``started`` can become one for ``wanted`` by changing its caps."""
    return (
        not wanted.mounts
        and wanted.policy == started.policy
        and wanted.image == started.image
        and wanted.network == started.network
        and wanted.no_new_privileges == started.no_new_privileges
        # /dev/shm is a quarter of the memory it started with: never more than a quarter of the new cap
        and wanted.limits.memory_bytes >= started.limits.memory_bytes
        and wanted.limits.lifetime_cap_seconds <= started.limits.lifetime_cap_seconds
    )


class WarmPool:
    """Started sandboxes waiting for a create; run :meth:`run` in a task, await :meth:`stop` at the end."""

    def __init__(
        self,
        backend: Backend,
        specs: list[PoolSpec],
        *,
        room: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``room``: how many more sandboxes the server may run besides its clients' and the pool's;
        ``clock``: seconds, for the ages of pooled sandboxes."""
        self._backend = backend
        self._specs = specs
        self._room = room
        self._clock = clock
        self._ready: dict[PoolSpec, list[PooledSandbox]] = {spec: [] for spec in specs}
        self._cold = 0
        """Cold creates in flight: refills wait until there are none."""
        self._starting: PooledSandbox | None = None
        self._stopped_alone: list[str] = []
        """Pooled sandboxes that stopped on their own: their remains are removed by the refill loop."""
        self._changed: anyio.Event | None = None
        """Set when something the refills wait for changed (made in :meth:`run`: it needs the loop)."""
        self._scope: anyio.CancelScope | None = None
        self._stopped: anyio.Event | None = None

    def sandboxes(self) -> list[PooledSandbox]:
        """Every pooled sandbox: the ready ones, and the one being started (its ``started`` is when
        its start began)."""
        found = [pooled for waiting in self._ready.values() for pooled in waiting]
        return found if self._starting is None else [*found, self._starting]

    def ready(self) -> int:
        """Pooled sandboxes ready now."""
        return sum(len(waiting) for waiting in self._ready.values())

    def can_serve(self, wanted: SandboxPlan) -> bool:
        return self._waiting_for(wanted) is not None

    def take(self, wanted: SandboxPlan) -> PooledSandbox | None:
        """A ready sandbox that can serve ``wanted``, now the caller's to adapt (or None).

        Synchronous, so a create can take one between its quota checks and registering it."""
        waiting = self._waiting_for(wanted)
        if waiting is None:
            return None
        taken = waiting.pop()  # the newest: the oldest are the next to be replaced
        self._wake()
        return taken

    def _waiting_for(self, wanted: SandboxPlan) -> list[PooledSandbox] | None:
        """The ready sandboxes of the first spec that can serve ``wanted`` (None: no spec has one)."""
        return next((w for spec, w in self._ready.items() if w and fits(spec.plan, wanted)), None)

    def discard(self, sandbox_id: str) -> bool:
        """Forget a pooled sandbox that stopped on its own; True if it was one."""
        for waiting in self._ready.values():
            for pooled in waiting:
                if pooled.sandbox_id == sandbox_id:
                    waiting.remove(pooled)
                    self._stopped_alone.append(sandbox_id)  # its snapshot and units are still there
                    log.info("pooled sandbox %s stopped; it will be replaced", sandbox_id)
                    self._wake()
                    return True
        return False

    @contextlib.contextmanager
    def cold_create(self) -> Iterator[None]:
        """Around a client's create that the pool could not serve: refills wait until it is done."""
        self._cold += 1
        try:
            yield
        finally:
            self._cold -= 1
            self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = anyio.Event()

    async def run(self) -> None:
        """Keep every spec filled until :meth:`stop`."""
        self._changed, self._stopped = anyio.Event(), anyio.Event()
        with anyio.CancelScope() as self._scope:
            try:
                await self._keep_filled()
            finally:
                self._stopped.set()

    async def stop(self) -> None:
        """Stop refilling and remove every pooled sandbox (the next daemon starts its own)."""
        if self._scope is not None and self._stopped is not None:
            self._scope.cancel()
            await self._stopped.wait()
        pooled = [p.sandbox_id for waiting in self._ready.values() for p in waiting] + self._stopped_alone
        for waiting in self._ready.values():
            waiting.clear()
        self._stopped_alone = []
        with anyio.CancelScope(shield=True), anyio.move_on_after(_DRAIN_TIMEOUT):
            async with anyio.create_task_group() as tasks:
                for sandbox_id in pooled:
                    tasks.start_soon(self._remove, sandbox_id)

    async def _keep_filled(self) -> None:
        """One start at a time, in the gaps between clients' cold creates."""
        if not self._specs:
            return
        for each in self._specs:
            log.info("warm pool: %d sandboxes of %s", each.size, each.label)
        retry_at: dict[PoolSpec, float] = {}
        delay: dict[PoolSpec, float] = {}
        while True:
            for sandbox_id in self._take_expired():
                await self._remove(sandbox_id)
            spec = self._next_to_fill(retry_at)
            if spec is None or self._cold:
                changed = self._changed
                assert changed is not None  # made by run
                with anyio.move_on_after(self._next_deadline(retry_at)):
                    await changed.wait()
                continue
            if await self._fill_one(spec):
                delay.pop(spec, None)
                retry_at.pop(spec, None)
            else:
                delay[spec] = min(_RETRY_MAX, delay.get(spec, _RETRY_FIRST / 2) * 2)
                retry_at[spec] = self._clock() + delay[spec]

    def _next_to_fill(self, retry_at: dict[PoolSpec, float]) -> PoolSpec | None:
        if self._room() <= 0:
            return None
        now = self._clock()
        wanting = [
            spec
            for spec in self._specs
            if len(self._ready[spec]) < spec.size and retry_at.get(spec, 0.0) <= now
        ]
        return min(wanting, key=lambda spec: len(self._ready[spec]) / spec.size, default=None)

    def _next_deadline(self, retry_at: dict[PoolSpec, float]) -> float:
        """Seconds until something is due that nothing wakes the pool for: a retry, the oldest's
        retirement, or at most :data:`_TICK` (room a client's destroy made under the server's maximum)."""
        now = self._clock()
        due = [at - now for at in retry_at.values()]
        due += [p.started + MAX_AGE - now for waiting in self._ready.values() for p in waiting]
        return max(0.05, min([*due, _TICK]))

    async def _fill_one(self, spec: PoolSpec) -> bool:
        sandbox_id = new_sandbox_id()
        self._starting = PooledSandbox(sandbox_id, spec.plan, self._clock())
        try:
            await self._backend.create(sandbox_id, spec.plan)
            # a supervisor's first command loads what every command needs (subprocess, the user
            # database): that one-time cost is paid here, not by the client that takes the sandbox.
            # (Each command's move into its own cgroup still costs 10-17 ms after the host was idle.)
            await self._backend.jail(sandbox_id).run(_WARM_UP)
        except Exception as exc:  # its own error boundary: a failed refill must not stop the daemon
            log.warning("warm pool: cannot start a sandbox of %s: %s", spec.label, exc)
            await self._remove(sandbox_id)
            return False
        except BaseException:  # stopped meanwhile
            await self._remove(sandbox_id)
            raise
        finally:
            self._starting = None
        self._ready[spec].append(PooledSandbox(sandbox_id, spec.plan, self._clock()))
        log.debug("warm pool: %s ready (%s)", sandbox_id, spec.label)
        return True

    def _take_expired(self) -> list[str]:
        """The pooled sandboxes to remove: those that waited too long, and those that stopped."""
        now = self._clock()
        expired, self._stopped_alone = self._stopped_alone, []
        for waiting in self._ready.values():
            for pooled in [p for p in waiting if now - p.started >= MAX_AGE]:
                waiting.remove(pooled)
                expired.append(pooled.sandbox_id)
        return expired

    async def _remove(self, sandbox_id: str) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self._backend.destroy(sandbox_id)
            except (BackendError, OSError) as exc:  # the next daemon's reconcile removes what is left
                log.warning("warm pool: cannot remove sandbox %s: %s", sandbox_id, exc)
