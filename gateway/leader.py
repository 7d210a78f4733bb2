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
  successful renewal was *sent*) stops its work at that deadline, before another may take over at
  ``lease_duration_s``: while holding, the loop sleeps until the next retry period or the deadline,
  whichever comes first, and a renewal or a term claim in flight is given only what is left of it
  (client-go may overrun it by a retry period); on shutdown it releases the Lease (no holder, 1 s
  duration), so the next replica takes over within one retry period rather than a lease duration.
  Stopping is cancelling the work: a database write already under way when it is cancelled may
  still end (commit or roll back) after the deadline; the term fence below is what keeps that safe.

Unlike client-go, a process that finds the Lease held under its own id but did not take it itself
(a predecessor of the same id that crashed) takes it over as a new term rather than renewing it.

A Lease is not a fence: a leader paused (SIGSTOP) past its lease wakes up with its watch still
delivering. So on each acquisition the leader records its term in the database
(:class:`gateway.store.leadership.LeadershipStore`) before it starts any work, and its driver-state
writes are conditional on that term: once a newer leader claimed, an old one's writes change
nothing (:class:`~gateway.store.leadership.NotLeader`). The term is the Lease's
``leaseTransitions``, raised above the recorded term when it lags (a Lease deleted and created
again). The recorded row is keyed by the Lease's namespace and name, so two
deployments sharing a database with a Lease each never share a term.

The work is a coroutine (``lead(term)``) run as a task owned here while this replica leads, and
cancelled when it stops leading or the elector stops.
"""

from __future__ import annotations

import asyncio
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
from gateway.metrics import note_leader
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
        self._leading_term: LeaderTerm | None = None
        self._work: asyncio.Task[None] | None = None
        #: The term claim in flight, and the leaseTransitions it is for.
        self._claiming: asyncio.Task[LeaderTerm | None] | None = None
        self._claiming_for = -1
        self._dropped: set[asyncio.Task[LeaderTerm | None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._log = RateLimitedLog(log, concern="leader election", interval_s=60.0)

    @property
    def term(self) -> LeaderTerm | None:
        """The term this replica leads under now, or None."""
        return self._term

    @property
    def _term(self) -> LeaderTerm | None:
        return self._leading_term

    @_term.setter
    def _term(self, term: LeaderTerm | None) -> None:
        self._leading_term = term
        note_leader(self._identity.id, term is not None)  # the openshell_gateway_leader gauge

    def start(self) -> None:
        if self._loop is None:
            note_leader(self._identity.id, self._term is not None)
            self._loop = asyncio.create_task(self._run(), name="leader-election")

    async def stop(self) -> None:
        """Stop the work, then release the Lease if this replica holds it (bounded: a Lease not
        released expires after its duration)."""
        if self._loop is not None:
            self._loop.cancel()
            # Not ``suppress(CancelledError)`` around ``await``: that would also absorb a
            # cancellation of the caller.
            await asyncio.wait({self._loop})
            self._loop = None
        self._drop_claim()
        if self._dropped:
            await asyncio.wait(set(self._dropped))
        await self._stop_work("this gateway is stopping")
        if self._holding is not None:
            try:
                await asyncio.wait_for(self._release(), RELEASE_TIMEOUT_S)
            except Exception as exc:  # best effort: a Lease not released expires
                log.warning("leader Lease %r not released (%r); it expires by itself", self._lease_name, exc)
            self._holding = None
        note_leader(self._identity.id, None)
        self._log.close()

    @property
    def _lease_name(self) -> str:
        return self._settings.lease_name

    @property
    def _row_name(self) -> str:
        """The leadership row's key: ``namespace/name`` of the Lease (two deployments sharing one
        database, each with its own Lease of the same name, must not share a term)."""
        return f"{self._namespace}/{self._settings.lease_name}"

    def _left(self) -> float:
        """Seconds left of the renew deadline (negative: past it)."""
        return self._settings.renew_deadline_s - (time.monotonic() - self._renewed_at)

    async def _run(self) -> None:
        retry = self._settings.retry_period_s
        while True:
            began = time.monotonic()
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the election must outlive anything one round does
                log.exception("leader election round failed unexpectedly; trying again")
            # Candidates spread their tries (client-go's jitter); the leader renews on time, and
            # wakes at its renew deadline if that comes first (a renewal failing fast must not push
            # the stop a retry period past it, possibly past lease_duration_s). The margin keeps the
            # wake-up from landing a hair before the deadline and trying once more.
            if self._holding is not None:
                # A retry period from the round's start (a claim waited on may have taken part of it).
                delay = max(0.0, min(retry - (time.monotonic() - began), self._left() + 0.001))
            else:
                delay = retry * (1 + 0.2 * random.random())
            await asyncio.sleep(delay)

    async def _tick(self) -> None:
        try:
            await self._round()
        finally:
            if self._holding is None:
                self._drop_claim()  # its Lease lost: a term recorded later would lead nothing

    async def _round(self) -> None:
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
        if (self._work is not None or self._holding is not None) and self._left() <= 0:
            # The deadline reached (on time, or woken up late: a pause, a starved loop): stop
            # before any await lets the work go on.
            await self._stop_work(f"no renewal within renew_deadline_s ({deadline:g} s)")
            self._term = None
            self._holding = None
        sent = time.monotonic()
        timeout = self._settings.retry_period_s
        if self._holding is not None:
            timeout = max(0.0, self._left())  # a renewal that lands after the deadline is too late
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation that lands
            # as the call ends (it returns or raises the call's outcome instead), and the stopped
            # loop would go on campaigning.
            async with asyncio.timeout(timeout):
                held = await self._try_acquire_or_renew()
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
        claim tried again next period (no work runs unfenced; the claim is idempotent, so a retry
        of one that committed unseen answers the term).

        The claim runs as its own task and this round waits for it at most until the next renewal
        is due: it may wait on a fenced write in flight (an ex-leader frozen inside one, until
        PostgreSQL ends that transaction after ``database.idle_in_transaction_timeout_s``), and
        meanwhile the Lease must still be renewed; the next rounds renew and look at it again."""
        claiming = self._claiming
        if claiming is None or self._claiming_for != transitions:
            self._drop_claim()
            claiming = self._claiming = asyncio.create_task(
                self._store.claim(self._row_name, holder=self._identity.id, term=transitions),
                name=f"leader-claim-{transitions}",
            )
            self._claiming_for = transitions
        wait = max(0.0, min(self._settings.retry_period_s, self._left()))
        done, _ = await asyncio.wait({claiming}, timeout=wait)
        if not done:
            self._log.log(
                logging.WARNING,
                ("claim",),
                "leadership held but not yet recorded: the claim waits (for a write of an earlier "
                "leader still in flight?); renewing the Lease meanwhile",
            )
            return
        self._claiming = None
        try:
            term = claiming.result()
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
        if self._left() <= 0:
            return  # recorded, but the Lease is past its deadline: the next round stops holding it
        self._term = term
        log.info(
            "leading: this replica holds the leader Lease and runs the cluster-wide work",
            extra={"lease": self._lease_name, "term": term.term, "replica": self._identity.id},
        )
        self._start_work(term)

    def _drop_claim(self) -> None:
        """Cancel a claim in flight (this replica no longer holds the Lease it was for); kept until
        it ended, so that stop() waits for it."""
        claiming, self._claiming = self._claiming, None
        if claiming is None:
            return
        claiming.cancel()
        self._dropped.add(claiming)

        def ended(task: asyncio.Task[LeaderTerm | None]) -> None:
            self._dropped.discard(task)
            if not task.cancelled():
                task.exception()  # retrieved: a failure of a claim given up is not news

        claiming.add_done_callback(ended)

    def _start_work(self, term: LeaderTerm) -> None:
        self._work = asyncio.create_task(self._lead(term), name=f"leader-work-{term.term}")

    async def _stop_work(self, why: str) -> None:
        work = self._work
        if work is None:
            return
        work.cancel()
        # Wait for the work to end without absorbing a cancellation of *this* task (the election
        # loop being stopped meanwhile): suppressing CancelledError around ``await work`` would eat
        # it, and the loop would go on and could lead again after stop(). The work stays referenced
        # until it ended, so stop() still waits for it if this wait is cancelled.
        await asyncio.wait({work})
        self._work = None
        if not work.cancelled() and work.exception() is not None:
            log.warning("the leader's work ended with %r", work.exception())
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
            recorded = await self._store.get(self._row_name)
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
        recorded = await self._store.get(self._row_name)
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
