"""This replica's identity and lease (issue 20).

A replica's id is ``ha.replica_id`` (the chart sets the pod name) or, when empty, the host name,
resolved once at start (:func:`replica_id`). It names the owner of the sessions this process holds
(``sandboxes.owner``) and its row in the ``replicas`` table.

:class:`LeaseRenewer` is an owned background task: it writes the row at start (address, sessions
held, draining=false, started_at, renewed_at) and renews it every ``ha.renew_interval_s``. A
failed renewal is logged (rate-limited) and retried at the next tick; it never ends the task nor
the process, and nothing in this process acts on its own lease: a store outage does not make a
replica drop the sessions it holds (they end by their own rules). Other replicas see it dead once
``ha.lease_s`` has passed without a renewal, which is true of a store outage long enough to stop
heartbeat flushes as well.

On a clean shutdown the row is first marked draining, then deleted once the sessions are closed:
a deleted row tells the others at once that this replica holds nothing, where an expired one would
keep the sandboxes it still held (whose disconnection writes failed) shown connected for up to
``ha.lease_s`` more. When the deletion fails, the row expires by itself. Rows not renewed for
``FORGET_AFTER_LEASES`` leases (crashed replicas whose id never came back) are deleted by any
live replica's renewal, so ids of pods gone for good do not pile up.

:class:`LeaseView` is what the API and metrics read: a snapshot of every row's ``renewed_at``,
cached per process for half a renewal interval, so listing 10,000 sandboxes reads the table once.
Half an interval keeps a live replica's cached renewal at most ``1.5 x renew_interval_s`` old,
within ``lease_s`` (at least two intervals) with one late renewal to spare.
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
from datetime import datetime, timedelta

from gateway.config import GatewayConfig, HaSettings
from gateway.ratelimit import RateLimitedLog
from gateway.sandbox_state import ReplicaLeases
from gateway.store.db import StoreError, utcnow
from gateway.store.replicas import ReplicaStore

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


class LeaseRenewer:
    """Keeps this replica's row in the ``replicas`` table alive; see the module docstring."""

    def __init__(
        self,
        store: ReplicaStore,
        *,
        replica: str,
        address: str,
        ha: HaSettings,
        sessions: Callable[[], int],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self.replica = replica
        self._address = address
        self._ha = ha
        self._sessions = sessions
        self._clock = clock
        self._started_at = clock()
        self._draining = False
        self._task: asyncio.Task[None] | None = None
        self._log = RateLimitedLog(log, concern="lease-renewal")
        #: Renewals that failed in a row (0 after a success): the metrics and logs read it.
        self.failures = 0

    async def renew_once(self) -> bool:
        """Write the row now; False (logged, rate-limited) when the store failed."""
        now = self._clock()
        try:
            await self._store.renew(
                self.replica,
                address=self._address,
                sessions=self._sessions(),
                draining=self._draining,
                started_at=self._started_at,
                renewed_at=now,
                forget_before=now - timedelta(seconds=FORGET_AFTER_LEASES * self._ha.lease_s),
            )
        except Exception as exc:  # never ends the renewer: the next tick retries
            self.failures += 1
            self._log.log(
                logging.WARNING,
                ("renew",),
                f"cannot renew this replica's lease ({self.failures} failed in a row); retrying: {exc}",
                exc_info=None if isinstance(exc, StoreError) else exc,
            )
            return False
        if self.failures:
            log.info("replica lease renewed again after %d failures", self.failures)
        self.failures = 0
        return True

    async def start(self) -> None:
        """Write the row once (a failure is logged, not raised: the store may come back), then
        renew it in an owned task."""
        await self.renew_once()
        self._task = asyncio.create_task(self._run(), name="replica-lease-renewer")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._ha.renew_interval_s)
            await self.renew_once()

    async def drain(self) -> None:
        """Say this replica is draining (shutdown has begun): renewals keep saying so."""
        self._draining = True
        try:
            await self._store.mark_draining(self.replica)
        except Exception as exc:
            log.warning("cannot mark this replica draining: %s", exc)

    async def stop(self) -> None:
        """Stop renewing and delete the row (see the module docstring); a failed deletion leaves
        the row to expire after ``ha.lease_s``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self._store.delete(self.replica)
        except Exception as exc:
            log.warning("cannot delete this replica's lease; it expires in %.0fs: %s", self._ha.lease_s, exc)
        self._log.close()


class LeaseView:
    """Every replica's last renewal, cached per process (see the module docstring)."""

    def __init__(
        self, store: ReplicaStore, *, ha: HaSettings, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._ha = ha
        self._monotonic = monotonic
        self._ttl_s = ha.renew_interval_s / 2
        self._cached: tuple[float, ReplicaLeases] | None = None
        self._lock = asyncio.Lock()

    async def leases(self) -> ReplicaLeases:
        """The cached snapshot, read again once older than half a renewal interval; a failed read
        raises StoreError (the caller is reading the sandboxes from the same store anyway)."""
        async with self._lock:  # one read for many concurrent requests
            cached = self._cached
            if cached is not None and self._monotonic() - cached[0] < self._ttl_s:
                return cached[1]
            rows = await self._store.leases()
            snapshot = ReplicaLeases(lease_s=self._ha.lease_s, renewed_at={r.id: r.renewed_at for r in rows})
            self._cached = (self._monotonic(), snapshot)
            return snapshot
