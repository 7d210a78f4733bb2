"""One leader among the gateway replicas for the Kubernetes driver's cluster-wide work (issue 20).

The pod watch and the driver-state writes it makes must run once, not once per replica. The leader
is the holder of a ``coordination.k8s.io/v1`` Lease (``ha.leader.lease_name``), held the way
client-go's ``leaderelection`` holds it:

- every ``retry_period_s`` a candidate reads the Lease and takes it when it is free (no holder: a
  leader released it) or expired; expired is judged on *this* process's monotonic clock from the
  moment it first saw the Lease's current record (holder, renewTime, transitions), never by
  comparing ``renewTime`` with its own wall clock, so clock skew between replicas does not matter;
- the holder renews it every ``retry_period_s`` (``renewTime``); a takeover sets ``holderIdentity``
  (this replica's id), ``acquireTime`` and ``leaseTransitions + 1``; every write is an update at
  the resourceVersion read, so of two candidates one wins and the other gets 409 Conflict;
- a leader that has not renewed within ``renew_deadline_s`` (counted from the moment its last
  successful renewal was *sent*) stops its work at once, before another may take over at
  ``lease_duration_s``; on shutdown it releases the Lease (no holder, 1 s duration), so the next
  replica takes over within one retry period rather than a lease duration.

Unlike client-go, a process that finds the Lease held under its own id but did not take it itself
(a predecessor of the same id that crashed) takes it over as a new term rather than renewing it.

A Lease is not a fence: a leader paused (SIGSTOP) past its lease wakes up with its watch still
delivering. So on each acquisition the leader records its term in the database
(:class:`gateway.store.leadership.LeadershipStore`) before it starts any work, and its driver-state
writes are conditional on that term: once a newer leader claimed, an old one's writes change
nothing (:class:`~gateway.store.leadership.NotLeader`). The term is the Lease's
``leaseTransitions``, raised above the recorded term when it lags (a Lease deleted and created
again).

The work is a coroutine (``lead(term)``) run as a task owned here while this replica leads, and
cancelled when it stops leading or the elector stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lightkube import ApiError, AsyncClient
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease

from gateway.config import LeaderSettings
from gateway.ratelimit import RateLimitedLog
from gateway.replicas import ReplicaIdentity
from gateway.store.db import StoreError, utcnow
from gateway.store.leadership import LeadershipStore, LeaderTerm, NotLeader

log = logging.getLogger(__name__)

#: How long a shutdown waits for the Lease to be released (else it expires after its duration).
RELEASE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Election:
    """What a gateway needs to campaign: who it is, the Lease's settings, and where terms are
    recorded. The Lease lives in ``settings.namespace``, else in ``default_namespace`` (the
    driver's)."""

    identity: ReplicaIdentity
    settings: LeaderSettings
    store: LeadershipStore

    def namespace(self, default_namespace: str) -> str:
        return self.settings.namespace.strip() or default_namespace


def lease_rules(lease_name: str) -> list[dict[str, list[str]]]:
    """The RBAC rules the elector needs in the Lease's namespace: ``create`` on leases (RBAC cannot
    limit a create by name), ``get`` and ``update`` on that one Lease by name; nothing else."""
    return [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "update"],
            "resourceNames": [lease_name],
        },
    ]


def _record(spec: LeaseSpec | None) -> tuple[object, ...]:
    """What identifies one record of the Lease: a change of any of these is a renewal or a
    takeover, which restarts the expiry count of the candidates that see it."""
    if spec is None:
        return ()
    return (spec.holderIdentity, spec.renewTime, spec.leaseTransitions, spec.leaseDurationSeconds)


class LeaderElector:
    """Campaigns for the Lease and runs ``lead`` while holding it; see the module docstring."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        namespace: str,
        identity: ReplicaIdentity,
        settings: LeaderSettings,
        store: LeadershipStore,
        lead: Callable[[LeaderTerm], Coroutine[Any, Any, None]],
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._identity = identity
        self._settings = settings
        self._store = store
        self._lead = lead
        #: The Lease record last seen and when (monotonic) it was first seen.
        self._observed: tuple[object, ...] = ()
        self._observed_at = 0.0
        #: The Lease's leaseTransitions while this process holds it (None: it does not).
        self._holding: int | None = None
        #: Monotonic time the last successful renewal (or the acquisition) was sent.
        self._renewed_at = 0.0
        self._term: LeaderTerm | None = None
        self._work: asyncio.Task[None] | None = None
        self._loop: asyncio.Task[None] | None = None
        self._log = RateLimitedLog(log, concern="leader election", interval_s=60.0)

    @property
    def term(self) -> LeaderTerm | None:
        """The term this replica leads under now, or None."""
        return self._term

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.create_task(self._run(), name="leader-election")

    async def stop(self) -> None:
        """Stop the work, then release the Lease if this replica holds it (bounded: a Lease not
        released expires after its duration)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        await self._stop_work("this gateway is stopping")
        if self._holding is not None:
            try:
                await asyncio.wait_for(self._release(), RELEASE_TIMEOUT_S)
            except Exception as exc:  # best effort: a Lease not released expires
                log.warning("leader Lease %r not released (%r); it expires by itself", self._lease_name, exc)
            self._holding = None
        self._log.close()

    @property
    def _lease_name(self) -> str:
        return self._settings.lease_name

    async def _run(self) -> None:
        retry = self._settings.retry_period_s
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the election must outlive anything one round does
                log.exception("leader election round failed unexpectedly; trying again")
            # Candidates spread their tries (client-go's jitter); the leader renews on time.
            delay = retry if self._holding is not None else retry * (1 + 0.2 * random.random())
            await asyncio.sleep(delay)

    async def _tick(self) -> None:
        if self._work is not None and self._work.done():
            failure = None if self._work.cancelled() else self._work.exception()
            self._work = None
            if isinstance(failure, NotLeader):
                # A newer term was claimed: another replica leads, whatever the Lease said last.
                log.warning("leadership lost: %s", failure)
                self._term = None
                self._holding = None
            elif self._term is not None:
                log.error("the leader's work ended (%r); starting it again", failure)
                self._start_work(self._term)
        deadline = self._settings.renew_deadline_s
        if self._work is not None and time.monotonic() - self._renewed_at >= deadline:
            # Woken up late (a pause, a starved loop): stop before any await lets the work go on.
            await self._stop_work(f"no renewal within renew_deadline_s ({deadline:g} s)")
            self._term = None
            self._holding = None
        sent = time.monotonic()
        timeout = self._settings.retry_period_s
        if self._holding is not None:
            timeout = max(0.1, deadline - (sent - self._renewed_at))
        try:
            held = await asyncio.wait_for(self._try_acquire_or_renew(), timeout)
        except Exception as exc:  # the API or the database away, a transport or config error...
            held = None
            what = str(exc) if isinstance(exc, StoreError) else repr(exc)
            if isinstance(exc, ApiError):
                what = f"{exc.status.code} {exc.status.reason}: {exc}"
                if exc.status.code == 403:
                    what += (
                        " (the gateway's identity needs create, get and update on this Lease: docs/rbac.md)"
                    )
            self._log.log(
                logging.WARNING, ("lease",), f"leader Lease {self._lease_name!r} not renewed: {what}"
            )
        if held is not None:
            self._renewed_at = sent
            if self._term is None:
                await self._claim(held)
            return
        if self._holding is not None and time.monotonic() - self._renewed_at < deadline:
            return  # not renewed this time, still within the deadline: try again next period
        if self._term is not None or self._holding is not None:
            await self._stop_work(
                f"the Lease was not renewed within renew_deadline_s ({deadline:g} s) or was taken over"
            )
            self._term = None
            self._holding = None

    async def _claim(self, transitions: int) -> None:
        """Record the term in the database before any work; on failure the Lease is kept and the
        claim tried again next period (no work runs unfenced)."""
        try:
            term = await self._store.claim(self._lease_name, holder=self._identity.id, term=transitions)
        except StoreError as exc:
            self._log.log(logging.WARNING, ("claim",), f"leadership held but not yet recorded: {exc}")
            return
        if term is None:
            log.warning(
                "leader Lease %r taken at term %d, but a newer term is recorded: not leading",
                self._lease_name,
                transitions,
            )
            self._holding = None
            return
        self._term = term
        log.info(
            "leading: this replica holds the leader Lease and runs the cluster-wide work",
            extra={"lease": self._lease_name, "term": term.term, "replica": self._identity.id},
        )
        self._start_work(term)

    def _start_work(self, term: LeaderTerm) -> None:
        self._work = asyncio.create_task(self._lead(term), name=f"leader-work-{term.term}")

    async def _stop_work(self, why: str) -> None:
        work, self._work = self._work, None
        if work is None:
            return
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        log.warning("stopped leading: %s", why, extra={"lease": self._lease_name})

    def _observe(self, spec: LeaseSpec | None) -> None:
        record = _record(spec)
        if record != self._observed:
            self._observed = record
            self._observed_at = time.monotonic()

    async def _try_acquire_or_renew(self) -> int | None:
        """One round: the Lease's leaseTransitions when this replica holds it afterwards, else None."""
        now = utcnow()
        duration = math.ceil(self._settings.lease_duration_s)
        try:
            lease = await self._client.get(Lease, self._lease_name, namespace=self._namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            return await self._create(now, duration)
        spec = lease.spec or LeaseSpec()
        self._observe(spec)
        holder = spec.holderIdentity or ""
        transitions = spec.leaseTransitions or 0
        mine = self._holding is not None and holder == self._identity.id and transitions == self._holding
        if self._holding is not None and not mine:
            log.warning(
                "leader Lease %r taken over by %r (transitions %d)", self._lease_name, holder, transitions
            )
            self._holding = None
            return None
        if not mine and holder:
            valid_for = float(spec.leaseDurationSeconds or 0)
            if time.monotonic() < self._observed_at + valid_for:
                return None  # held by another (or by a predecessor of this id), not expired yet
        if mine:
            acquired: datetime | None = spec.acquireTime
        else:
            # A new term: above both the Lease's and the recorded one (a Lease created again).
            recorded = await self._store.get(self._lease_name)
            transitions = max(transitions + 1, (recorded.term + 1) if recorded is not None else 0)
            acquired = now
        lease.spec = LeaseSpec(
            holderIdentity=self._identity.id,
            leaseDurationSeconds=duration,
            acquireTime=acquired,
            renewTime=now,
            leaseTransitions=transitions,
        )
        try:
            updated = await self._client.replace(lease)
        except ApiError as exc:
            if exc.status.code == 409:  # another candidate wrote first, or the leader renewed
                return None
            raise
        self._observe(updated.spec)
        self._holding = transitions
        return transitions

    async def _create(self, now: datetime, duration: int) -> int | None:
        recorded = await self._store.get(self._lease_name)
        transitions = (recorded.term + 1) if recorded is not None else 0
        lease = Lease(
            metadata=ObjectMeta(name=self._lease_name, namespace=self._namespace),
            spec=LeaseSpec(
                holderIdentity=self._identity.id,
                leaseDurationSeconds=duration,
                acquireTime=now,
                renewTime=now,
                leaseTransitions=transitions,
            ),
        )
        try:
            created = await self._client.create(lease)
        except ApiError as exc:
            if exc.status.code == 409:  # another replica created it first
                return None
            raise
        self._observe(created.spec)
        self._holding = transitions
        return transitions

    async def _release(self) -> None:
        """Give the Lease up at once: no holder and a 1 s duration (client-go's ReleaseOnCancel), the
        transitions kept; only if this replica still holds it."""
        lease = await self._client.get(Lease, self._lease_name, namespace=self._namespace)
        spec = lease.spec or LeaseSpec()
        if spec.holderIdentity != self._identity.id or spec.leaseTransitions != self._holding:
            return
        now = utcnow()
        lease.spec = LeaseSpec(
            holderIdentity=None,
            leaseDurationSeconds=1,
            acquireTime=now,
            renewTime=now,
            leaseTransitions=spec.leaseTransitions,
        )
        await self._client.replace(lease)
        log.info("leader Lease released", extra={"lease": self._lease_name})
