"""This replica's identity and lease (issue 20).

A replica's id is ``ha.replica_id`` (the chart sets the pod name) or, when empty, the host name,
resolved once at start (:func:`replica_id`), with a run id new at every start
(:class:`ReplicaIdentity`). The id names the owner of the sessions this process holds
(``sandboxes.owner``, and ``owner_run`` the run) and its row in the ``replicas`` table, which
records the run that last wrote it: a replica restarted under the same id takes the row over, and
the sessions its crashed predecessor left flagged connected do not count as its own
(:mod:`gateway.sandbox_state`).

:class:`LeaseRenewer` is an owned background task. Its start writes the row (address, sessions
held, draining, started_at, renewed_at, run_id), retrying for up to ``ha.lease_s``: the
gateway serves no session before its lease exists, and does not start when it cannot write it
(LeaseStartError). It then renews the row every ``ha.renew_interval_s``. A failed renewal is logged
(rate-limited) and retried at the next tick; it never ends the task nor the process, and nothing
in this process acts on its own lease: a store outage does not make a replica drop the sessions it
holds (they end by their own rules). Other replicas see it dead once ``ha.lease_s`` has passed
without a renewal, which is true of a store outage long enough to stop heartbeat flushes as well.
A renewal that finds the row written by another run since its own last write logs an error: two
live processes share the id (a misconfiguration: each takes the lease from the other).

``draining`` is true until the gateway is ready (:meth:`LeaseRenewer.ready`: its gRPC server
serves and its first health verdict is SERVING; written at once): the others' rebalancers count
only replicas that take sessions as receivers (:mod:`gateway.rebalance`), and a replica whose row
exists while the Service does not route to it yet (a surge pod before its readiness probe) would
make them shed and refuse sessions that cannot land there. The flag is the existing column, read
by nothing else; a release before it reads such a row as a draining replica, which it is not
sending sessions to either.

On a clean shutdown the row is first marked draining (after any renewal in flight, so that one
cannot write draining=false back), then deleted once the sessions are closed: a deleted row tells
the others at once that this replica holds nothing, where an expired one would keep the sandboxes
it still held (whose disconnection writes failed) shown connected for up to ``ha.lease_s`` more.
Both touch the row only while this run holds it. When the deletion fails, the row expires by
itself. Rows not renewed for ``FORGET_AFTER_LEASES`` leases (crashed replicas whose id never came
back) are deleted by any live replica's renewal, so ids of pods gone for good do not pile up.

Lease times are the database's on PostgreSQL (``gateway.store.replicas``): written with its
``now()`` and judged against it, so no replica's clock matters; SQLite is one process, on its clock.
A reader measures its offset from the database's clock around one statement on a connection
already checked out, so a wait for the pool is not taken for skew (it would age every lease).

:class:`LeaseView` is what the API, the metrics and the rebalancer read: a snapshot of every row's
``renewed_at``, run, sessions held and draining flag, cached per process for half a renewal
interval, so listing 10,000 sandboxes reads the table once. Half an interval keeps a live
replica's cached renewal at most ``1.5 x renew_interval_s`` old, within ``lease_s`` (at least two
intervals) with one late renewal to spare. A read has a deadline (``grpc.store_timeout_s``):
past it, or on a failure, the previous snapshot is served for one more half interval, then the
read fails with StoreError (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from gateway.config import GatewayConfig, HaSettings
from gateway.ratelimit import RateLimitedLog
from gateway.sandbox_state import ReplicaLeases
from gateway.store.db import StoreError, utcnow
from gateway.store.replicas import Renewal, ReplicaStore

log = logging.getLogger(__name__)

#: Rows of other replicas not renewed for this many leases are deleted by any renewal: dead
#: either way, and a crashed pod's id would otherwise stay forever.
FORGET_AFTER_LEASES = 10


@dataclass(frozen=True, slots=True)
class ReplicaIdentity:
    """Who this process is to the others: its stable ``id`` (the lease row's key, a session
    owner's name) and ``run``, random at every start, so a replica restarted under the same id is
    told apart from its predecessor (``replicas.run_id``, ``sandboxes.owner_run``)."""

    id: str
    run: str


def this_replica(ha: HaSettings) -> ReplicaIdentity:
    """This process's identity: :func:`replica_id` and a new run id."""
    return ReplicaIdentity(id=replica_id(ha), run=uuid.uuid4().hex)


def replica_id(ha: HaSettings) -> str:
    """``ha.replica_id``, or the host name when it is empty."""
    return ha.replica_id.strip() or socket.gethostname()


def advertise_address(config: GatewayConfig) -> str:
    """``ha.advertise_address``, or ``grpc.listen`` when it is empty."""
    return config.ha.advertise_address.strip() or config.grpc.listen


class LeaseStartError(Exception):
    """This replica's lease row could not be written at start within the deadline."""


class LeaseRenewer:
    """Keeps this replica's row in the ``replicas`` table alive; see the module docstring."""

    def __init__(
        self,
        store: ReplicaStore,
        *,
        identity: ReplicaIdentity,
        address: str,
        ha: HaSettings,
        sessions: Callable[[], int],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self.identity = identity
        self.replica = identity.id
        self._address = address
        self._ha = ha
        self._sessions = sessions
        self._clock = clock
        self._started_at = clock()
        self._draining = False
        #: False until ready() (the row says draining meanwhile, see the module docstring).
        self._ready = False
        #: Set by ready(): the renewal loop writes at once instead of at its next tick.
        self._kick = asyncio.Event()
        #: Held around every write of the row: a renewal in flight when drain() begins commits
        #: before the draining mark, never after it (it would write draining=false back).
        self._write = asyncio.Lock()
        #: Whether this run has written the row at least once (a later renewal that finds another
        #: run's row is then proof of a second live process with this id).
        self._written = False
        self._task: asyncio.Task[None] | None = None
        self._log = RateLimitedLog(log, concern="lease-renewal")
        #: Renewals that failed in a row (0 after a success): the metrics and logs read it.
        self.failures = 0
        self._last_error = ""

    @property
    def written(self) -> bool:
        """This run has written its row (sessions may name it their owner from then on)."""
        return self._written

    async def renew_once(self) -> bool:
        """Write the row now; False (logged, rate-limited) when the store failed."""
        async with self._write:
            now = self._clock()
            try:
                renewal = await self._store.renew(
                    self.replica,
                    run=self.identity.run,
                    address=self._address,
                    sessions=self._sessions(),
                    draining=self._draining or not self._ready,
                    started_at=self._started_at,
                    renewed_at=now,
                    forget_after_s=FORGET_AFTER_LEASES * self._ha.lease_s,
                )
            except Exception as exc:  # never ends the renewer: the next tick retries
                self.failures += 1
                self._last_error = str(exc)
                self._log.log(
                    logging.WARNING,
                    ("renew",),
                    f"cannot renew this replica's lease ({self.failures} failed in a row); retrying: {exc}",
                    exc_info=None if isinstance(exc, StoreError) else exc,
                )
                return False
            self._check_run(renewal)
            self._written = True
        if self.failures:
            log.info("replica lease renewed again after %d failures", self.failures)
        self.failures = 0
        return True

    def _check_run(self, renewal: Renewal) -> None:
        """Say so when the row was another run's: a predecessor (once, at the first write), or a
        second live process under the same id (an error, rate-limited: it persists)."""
        other = renewal.previous_run
        if other is None or other == self.identity.run or renewal.previous_renewed_at is None:
            return
        age = (renewal.now - renewal.previous_renewed_at).total_seconds()
        if self._written:
            # This run wrote the row since: only a live process could have written it over.
            self._log.log(
                logging.ERROR,
                ("duplicate",),
                f"two live gateway processes share the replica id {self.replica!r} (this run "
                f"{self.identity.run}, the other {other}, which renewed the lease {age:.1f}s ago): "
                "give each replica its own ha.replica_id (the chart sets the pod name); until then "
                "each takes the lease from the other and their sandboxes flap between connected "
                "and disconnected",
            )
        elif age <= self._ha.lease_s:
            log.warning(
                "replica id %r was held by run %s, renewed %.1fs ago (within ha.lease_s): a "
                "predecessor that did not stop cleanly, whose sessions are not counted as this "
                "run's, or another live process with this id (if so, an error follows at the next "
                "renewals)",
                self.replica,
                other,
                age,
            )

    def start_in_background(self) -> None:
        """Renew from an owned task only, without waiting for a first write: for a replica that
        starts on a schema not yet migrated (readiness says not ready, a migration job is on its
        way), whose lease cannot be written until the job has run. Between the job's end and the
        first write (up to a second of retry, or longer while the write fails) the sandboxes
        table is usable already: the gateway refuses hellos until ``written`` (OVERLOADED with a
        retry hint), so no session names this replica before its lease exists."""
        self._task = asyncio.create_task(self._run(first_now=True), name="replica-lease-renewer")

    async def start(self, *, deadline_s: float | None = None) -> None:
        """Write the row, retrying until it is written, then renew it in an owned task. Sessions
        must not name this replica their owner before its lease exists (they would show
        disconnected on every replica), so the start waits for the first write; after
        ``deadline_s`` (``ha.lease_s`` by default) without one it raises LeaseStartError and the
        gateway does not serve."""
        loop = asyncio.get_running_loop()
        budget_s = self._ha.lease_s if deadline_s is None else deadline_s
        deadline = loop.time() + budget_s
        retry_s = min(1.0, self._ha.renew_interval_s)
        while True:
            try:
                if await asyncio.wait_for(self.renew_once(), max(0.0, deadline - loop.time())):
                    break
            except TimeoutError:
                self._last_error = "the database did not answer"
            if loop.time() >= deadline:
                raise LeaseStartError(
                    f"cannot write this replica's lease ({self.replica!r}) in the replicas table "
                    f"within {budget_s:g}s ({self._last_error}); not serving: the sessions it would "
                    "hold would show disconnected on every replica"
                )
            await asyncio.sleep(min(retry_s, max(0.0, deadline - loop.time())))
        self._task = asyncio.create_task(self._run(), name="replica-lease-renewer")

    async def _run(self, *, first_now: bool = False) -> None:
        if first_now:
            # Until the first write succeeds, try every second rather than every interval.
            written = await self.renew_once()
            while not written:
                await asyncio.sleep(min(1.0, self._ha.renew_interval_s))
                written = await self.renew_once()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self._ha.renew_interval_s)
            self._kick.clear()
            await self.renew_once()

    def ready(self) -> None:
        """The gateway takes sessions from now on (see the module docstring): the renewals say
        draining=false unless drain() was called, and the next one is written at once."""
        if not self._ready:
            self._ready = True
            self._kick.set()

    async def drain(self) -> None:
        """Say this replica is draining (shutdown has begun): renewals keep saying so. After any
        renewal in flight (which read draining=false) has committed, never before."""
        self._draining = True
        async with self._write:
            try:
                await self._store.mark_draining(self.replica, run=self.identity.run)
            except Exception as exc:
                log.warning("cannot mark this replica draining: %s", exc)

    async def stop(self) -> None:
        """Stop renewing and delete the row, if this run still holds it (see the module
        docstring); a failed deletion leaves the row to expire after ``ha.lease_s``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self._store.delete(self.replica, run=self.identity.run)
        except Exception as exc:
            log.warning("cannot delete this replica's lease; it expires in %.0fs: %s", self._ha.lease_s, exc)
        self._log.close()


class LeaseView:
    """Every replica's last renewal, cached per process (see the module docstring)."""

    def __init__(
        self,
        store: ReplicaStore,
        *,
        ha: HaSettings,
        timeout_s: float,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._ha = ha
        self._timeout_s = timeout_s
        self._monotonic = monotonic
        self._clock = clock
        self._ttl_s = ha.renew_interval_s / 2
        self._cached: tuple[float, ReplicaLeases] | None = None
        #: The last failed read (when, what): no other read is tried for a TTL after it, so
        #: requests do not queue one timeout each behind the lock while the database hangs.
        self._failed: tuple[float, StoreError] | None = None
        self._lock = asyncio.Lock()
        self._log = RateLimitedLog(log, concern="lease-view")

    async def leases(self) -> ReplicaLeases:
        """The cached snapshot, read again once older than half a renewal interval. A read that
        fails or takes longer than ``timeout_s`` raises StoreError (the API answers 503), except
        that a snapshot younger than two TTLs is served once more (see ``_stale_or_raise``)."""
        async with self._lock:  # one read for many concurrent requests
            cached, failed = self._cached, self._failed
            at = self._monotonic()
            if cached is not None and at - cached[0] < self._ttl_s:
                return cached[1]
            if failed is not None and at - failed[0] < self._ttl_s:
                return self._stale_or_raise(failed[1], at)
            try:
                snapshot = await asyncio.wait_for(self._store.snapshot(clock=self._clock), self._timeout_s)
            except (StoreError, TimeoutError) as exc:
                error = (
                    exc
                    if isinstance(exc, StoreError)
                    else StoreError(f"cannot read the replicas' leases within {self._timeout_s:g}s")
                )
                self._failed = (self._monotonic(), error)
                return self._stale_or_raise(error, self._monotonic())
            self._failed = None
            leases = ReplicaLeases(
                lease_s=self._ha.lease_s,
                renewed_at={r.id: r.renewed_at for r in snapshot.rows},
                runs={r.id: r.run_id for r in snapshot.rows},
                sessions={r.id: r.sessions for r in snapshot.rows},
                draining={r.id: r.draining for r in snapshot.rows},
                # Both clocks read around one statement on the checked-out connection: the wait
                # for the pool (and its pre-ping) is not counted as skew.
                skew=(
                    None
                    if snapshot.database_now is None or snapshot.local_now is None
                    else snapshot.database_now - snapshot.local_now
                ),
                read_at=self._monotonic(),
            )
            self._cached = (self._monotonic(), leases)
            return leases

    def _stale_or_raise(self, error: StoreError, at: float) -> ReplicaLeases:
        """The last snapshot while it is younger than two TTLs, else ``error``. Safe: each lease is
        still judged against the current time, so a stale snapshot can only show a replica that
        renewed since as dead sooner, never a lapsed one alive; what it can miss is a row deleted
        at a clean stop (whose sessions wrote their disconnection) and a new replica's row."""
        cached = self._cached
        if cached is not None and at - cached[0] < 2 * self._ttl_s:
            self._log.log(
                logging.WARNING, ("stale",), f"{error}; serving the snapshot read {at - cached[0]:.1f}s ago"
            )
            return cached[1]
        raise error
