"""The one rule that says what state a sandbox is in; the API, the status command and the metrics
all call it, so they can never disagree.

The store records facts: the session the sandbox last connected with, whether that session was
marked disconnected, when the gateway last heard from it, the exit. The flag alone cannot say that
a sandbox is connected: clearing it is one write, by the one gateway process that held the session,
and that process may die first, or its write may fail while the database is read-only or away.
So a sandbox counts as connected only while its last heartbeat is also fresh:

    fresh_for_s = the largest stale bound a session gets (interval, rounded as an upstream
                  supervisor rounds it, at least upstream's 5 s floor, + grace)
                  + 2 x heartbeat flush interval

A live session is never silent for longer than the stale bound (the gateway ends it), the
heartbeat time reaches the database at the next batched flush, and one more flush interval leaves
room for a flush that runs late. A session whose heartbeat a command widened is renewed by the
gateway holding it (``SessionRegistry.take_heartbeats``), so it stays fresh as well.

Past that bound a sandbox still flagged connected is shown ``disconnected`` since its last
heartbeat, and ``lost`` after ``lost_after_s``, exactly as if the disconnection had been written.

With several replicas (issue 20) the heartbeat alone is not enough either: a replica killed
between two flushes leaves its sandboxes' heartbeats fresh for up to ``fresh_for_s``, and nothing
else would ever clear their flag. So a sandbox also needs its owner's lease (``ReplicaLeases``, read
from the ``replicas`` table) to be alive, renewed within ``ha.lease_s`` of now. An owner whose row
lapsed or is missing (deleted at a clean shutdown, or never written) holds nothing: its sandboxes
show ``disconnected`` since they were last heard from, and ``lost`` after ``lost_after_s``. Callers
that pass no leases (single-process tools and tests) get the heartbeat rule alone.

The owner is a run, not only a replica id: a row that names the run of its session
(``sandboxes.owner_run``) counts only while the lease row is of that very run (``replicas.run_id``),
so a replica restarted under the same id does not revive the sessions its crashed predecessor left
flagged connected. A row without ``owner_run`` (written before the owner's run was recorded) keeps
the rule by replica id, and so does a lease row without ``run_id`` (renewed by a replica of the
release before run ids, during a rollout from it: that replica's hellos leave a newer release's
``owner_run`` in the sandbox row, which must not make its live session look dead).

The lease is judged on the clock it was written with: the database's on PostgreSQL (the snapshot
carries its offset from this process's clock, ``ReplicaLeases.skew``), so a replica whose clock is
off neither kills nor revives others' leases. Heartbeat times are still written on each replica's
clock: the heartbeat bound assumes clocks in step (NTP) well within ``fresh_for_s``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from gateway.config import SessionSettings


class LivenessFacts(Protocol):
    """What the rule reads of a sandbox: a full ``SandboxRow``, or the narrow
    ``SandboxLiveness`` the metrics count from."""

    @property
    def connected(self) -> bool: ...
    @property
    def connected_at(self) -> datetime | None: ...
    @property
    def disconnected_at(self) -> datetime | None: ...
    @property
    def last_heartbeat_at(self) -> datetime | None: ...
    @property
    def exit_code(self) -> int | None: ...
    @property
    def owner(self) -> str | None: ...
    @property
    def owner_run(self) -> str | None: ...


#: The owner a gateway of a release before replica leases wrote (``gateway-`` and the hex of a
#: Python object id, 9 digits or more): it renews no lease row, so during a rolling upgrade from
#: such a release its live sessions would otherwise show disconnected on the new replicas. A
#: replica id of that very shape without a row gets the heartbeat rule alone, as before leases,
#: but only for a sandbox row without ``owner_run`` (such a release never writes one) or whose
#: ``owner_run`` is another replica's run (left by a newer replica's earlier session).
LEGACY_OWNER = re.compile(r"gateway-[0-9a-f]{9,}")


@dataclass(frozen=True, slots=True)
class ReplicaLeases:
    """When each replica last renewed its lease and with which run (a snapshot of the ``replicas``
    table), how long a renewal holds, and the clock the renewals were written on."""

    lease_s: float
    renewed_at: Mapping[str, datetime] = field(default_factory=dict)
    #: Each row's run (``replicas.run_id``; None or absent: a row of a release before run ids).
    runs: Mapping[str, str | None] = field(default_factory=dict)
    #: The database's clock minus this process's, measured when the snapshot was read (PostgreSQL
    #: writes ``renewed_at`` with its own ``now()``); None: renewals were written on this process's
    #: clock (SQLite, one process).
    skew: timedelta | None = None
    #: Each row's sessions held at its last renewal (``replicas.sessions``), for the rebalancer.
    sessions: Mapping[str, int] = field(default_factory=dict)
    #: Each row's draining flag at its last renewal (``replicas.draining``): such a replica takes
    #: no sessions.
    draining: Mapping[str, bool] = field(default_factory=dict)
    #: When this process read the snapshot (its monotonic clock; None: not from a read, a test's):
    #: the rebalancer acts on a snapshot only while it is fresh.
    read_at: float | None = None

    def alive(self, replica_id: str | None, *, now: datetime, run: str | None = None) -> bool:
        """``replica_id`` renewed within ``lease_s`` of ``now`` (this process's clock, moved onto
        the database's by ``skew``) and, when ``run`` is given (the session's ``owner_run``) and
        the row carries a run, by that very run; a missing row, or no owner, is not alive. A
        session owned by a gateway of a release before leases (during a rolling upgrade) has no
        row to renew: when it names no run, the heartbeat rule alone judges it (see LEGACY_OWNER).
        A row without a run (renewed by a release before run ids) is judged by id alone."""
        if replica_id is None:
            return False
        renewed = self.renewed_at.get(replica_id)
        if renewed is None:
            # A release before leases writes no owner_run: a row whose owner_run is the owner's
            # own was written by a release that renews a lease, so its missing row means dead,
            # whatever the id looks like (a host name such as gateway-1a2b3c4d5 matches the
            # pattern). An owner_run of another replica's lease row was left there by a newer
            # replica's earlier session: the legacy owner's hello does not know the column.
            if LEGACY_OWNER.fullmatch(replica_id) is None:
                return False
            return run is None or any(r == run for rid, r in self.runs.items() if rid != replica_id)
        held_by = self.runs.get(replica_id)
        if run is not None and held_by is not None and held_by != run:
            # Another run holds the id now: the session's own process is gone (or, with two live
            # processes misconfigured under one id, the renewer logs it as an error). A row
            # without a run was renewed by a release before run ids (a rollout from it): that
            # writer knows no runs, so it is judged by id, as before run ids.
            return False
        if self.skew is not None:
            now = now + self.skew
        return (now - renewed).total_seconds() <= self.lease_s

    def alive_count(self, *, now: datetime) -> int:
        return sum(1 for rid in self.renewed_at if self.alive(rid, now=now))


#: Upstream's supervisor beats every ``max(heartbeat_interval_secs, 5)`` seconds whatever it is told
#: (../shared/WIRE.md, "Heartbeats"; upstream supervisor_session.rs): a session without our
#: capabilities is given a stale bound of at least this interval, or a short configured interval
#: would end it between two of its beats.
UPSTREAM_HEARTBEAT_FLOOR_S = 5.0


class SandboxState(enum.StrEnum):
    PENDING = "pending"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    LOST = "lost"
    EXITED = "exited"


@dataclass(frozen=True, slots=True)
class Liveness:
    """The bounds the rule needs, taken from the gateway's ``sessions`` settings."""

    #: The silence after which the gateway ends a session it holds (unless a command widened it).
    stale_after_s: float
    #: A heartbeat older than this no longer shows a live session.
    fresh_for_s: float
    #: Disconnected for longer than this: ``lost``.
    lost_after_s: float

    #: The same for a session without our capabilities (an upstream supervisor): at least its
    #: heartbeat floor (UPSTREAM_HEARTBEAT_FLOOR_S). 0: as ``stale_after_s`` (tests' own bounds).
    upstream_stale_after_s: float = 0.0

    @staticmethod
    def stale_after_for(
        interval_s: float, *, grace_s: float, jitter: float = 0.0, upstream: bool = False
    ) -> float:
        """The silence allowed a session asked to beat every ``interval_s``: the interval rounded
        as an upstream supervisor rounds it (whole seconds, at least one; with ``upstream``, at
        least the 5 s it beats at the fastest), stretched by how much later than the interval a
        beat may come (``jitter``, a fraction of it), plus ``grace_s``. The one formula for the
        bound a session is given and the one this rule counts on."""
        interval = max(interval_s, 1, round(interval_s))
        if upstream:
            interval = max(interval, UPSTREAM_HEARTBEAT_FLOOR_S)
        return interval * (1 + jitter) + grace_s

    def heartbeat_write_after(self, flush_interval_s: float, *, flush_deadline_s: float) -> float:
        """How old the heartbeat time written for a live session may grow before a flush must
        write a newer one (``SessionRegistry.take_heartbeats``): ``fresh_for_s`` less two flush
        intervals and two flush deadlines (W = fresh - 2F - 2D). The time written is the flush's
        own, taken when it starts and visible when it commits: the flush that finds the row due
        starts at most F + D after it became due (the one before it ran up to its deadline D,
        then the flusher slept F) and commits within D, and one flush that fails at once costs F
        more, so the row never looks stale while the session is live. Counting the flushes'
        durations matters: with W = fresh - 3F two flushes that each took their deadline left
        rows older than fresh_for_s for every reader (and let a late hello past the
        stale-connection rule). 0: write every flush."""
        return max(0.0, self.fresh_for_s - 2 * flush_interval_s - 2 * flush_deadline_s)

    def stale_after_of(self, *, upstream: bool) -> float:
        """The bound a session is given: an upstream one's, or ours."""
        return max(self.stale_after_s, self.upstream_stale_after_s) if upstream else self.stale_after_s

    @classmethod
    def from_settings(cls, sessions: SessionSettings) -> Liveness:
        # The bounds the gateway gives the sessions it accepts (OpenShellService._accept); a
        # heartbeat counts as fresh for the largest of them, or an upstream sandbox would show
        # disconnected between two of its beats.
        stale_after = cls.stale_after_for(sessions.heartbeat_interval_s, grace_s=sessions.grace_s)
        upstream = cls.stale_after_for(sessions.heartbeat_interval_s, grace_s=sessions.grace_s, upstream=True)
        return cls(
            stale_after_s=stale_after,
            fresh_for_s=max(stale_after, upstream) + 2 * sessions.heartbeat_flush_interval_s,
            lost_after_s=sessions.lost_after_s,
            upstream_stale_after_s=upstream,
        )


def is_connected(
    row: LivenessFacts, *, now: datetime, liveness: Liveness, leases: ReplicaLeases | None = None
) -> bool:
    """Flagged connected, held by an owner (replica and run) whose lease is alive (when ``leases``
    are given), and heard from within ``fresh_for_s``."""
    if not row.connected:
        return False
    if leases is not None and not leases.alive(row.owner, run=row.owner_run, now=now):
        return False
    heard = row.last_heartbeat_at or row.connected_at
    return heard is not None and (now - heard).total_seconds() <= liveness.fresh_for_s


def disconnected_since(
    row: LivenessFacts, *, now: datetime, liveness: Liveness, leases: ReplicaLeases | None = None
) -> datetime | None:
    """When the sandbox stopped being connected: the recorded disconnection, or for a session
    whose disconnection was never written (its heartbeat went stale, or its owner's lease lapsed),
    its last heartbeat: the last moment it was known to be connected. None while connected or
    never."""
    if is_connected(row, now=now, liveness=liveness, leases=leases):
        return None
    if not row.connected:
        return row.disconnected_at
    return row.last_heartbeat_at or row.connected_at


def sandbox_state(
    row: LivenessFacts, *, now: datetime, liveness: Liveness, leases: ReplicaLeases | None = None
) -> SandboxState:
    """``exited`` once the exit is known; else ``connected`` (see :func:`is_connected`);
    else ``lost`` when disconnected longer than ``lost_after_s``, ``disconnected`` when for less;
    else ``pending`` (registered, never connected)."""
    if row.exit_code is not None:
        return SandboxState.EXITED
    if is_connected(row, now=now, liveness=liveness, leases=leases):
        return SandboxState.CONNECTED
    since = disconnected_since(row, now=now, liveness=liveness, leases=leases)
    if since is not None:
        if (now - since).total_seconds() > liveness.lost_after_s:
            return SandboxState.LOST
        return SandboxState.DISCONNECTED
    if row.connected_at is not None:
        return SandboxState.DISCONNECTED
    return SandboxState.PENDING
