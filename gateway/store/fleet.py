"""The fleet summary's queries: counts and short lists over every sandbox a caller may see, each one
bounded SQL statement (GROUP BY for the counts, LIMIT for the lists) on SQLite and PostgreSQL, so
a summary of tens of thousands of sandboxes never loads them into Python.

**State.** A sandbox's state is decided by :func:`gateway.sandbox_state.sandbox_state`, in Python,
for one row at a time. To count by state in the database, :func:`state_column` writes the same
rule as one SQL ``CASE``, branch for branch (exited; connected: flagged, held by a live owner and
heard from within ``fresh_for_s``; lost/disconnected by the time since it stopped being connected;
pending). The one part SQL cannot say is whether an owner's lease is alive (the run check, the
legacy owners, the database clock's skew): that is asked of :meth:`ReplicaLeases.alive` itself, in
Python, once per distinct ``(owner, owner_run)`` pair of the connected rows (a handful: one per
replica run), and the answer goes into the ``CASE`` as a list of live pairs. The comparisons use
the same bounds, with the same strictness (``<=`` fresh, ``>`` lost), as the Python rule; the
tests check that the counts equal what ``GET /api/v1/sandboxes`` shows for the same rows.

**Health.** A sandbox's health is what its supervisor last reported: the newest ``health`` event
of its current generation (``healthy``, ``degraded``, ``unhealthy``; ``unknown`` without one).
Health is counted over the sandboxes that have not exited (an exited sandbox's last sample says
nothing about now). The newest health event is found through the partial index
``ix_events_health`` (``(sandbox_id, generation, id)`` of the health events only, migration 0011),
read backwards: one index probe per sandbox, whatever else it logged. (Through the index of every
event, a sandbox that logs much and samples health never or seldom cost a walk over all its
lines.)

**Visibility.** Every statement is filtered by the caller's :class:`Owners` (the rule of the
sandbox list), so a caller's counts and lists hold only what it may list.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, false, func, or_, select, true

from gateway.sandbox_state import Liveness, ReplicaLeases, SandboxState
from gateway.store.db import Database, store_errors
from gateway.store.sandboxes import Owners, SandboxLiveness
from gateway.store.schema import events as events_table
from gateway.store.schema import sandboxes as sandboxes_table

#: What the supervisor reports (``openshell_wire.records.HealthState``), and ``unknown``: no report.
HEALTH_STATES = ("healthy", "degraded", "unhealthy")
UNKNOWN_HEALTH = "unknown"
#: How a health (lifecycle) event's ``data`` starts: the store writes it with its first key first
#: and no spaces (``gateway.store.events._row``), so a prefix names the state without JSON parsing.
_HEALTH_PREFIX = '{"state":"%s"'
_EXITED_PREFIX = '{"kind":"exited"'

_s = sandboxes_table.c
_e = events_table.c
#: The condition of the partial index ix_events_health (see the module docstring).
_IS_HEALTH = _e.kind == "health"


def visible_to(owners: Owners | None) -> ColumnElement[bool]:
    """The sandboxes ``owners`` may list (None: every one), as :meth:`SandboxStore.list` filters."""
    if owners is None:
        return true()
    mine = [_s.created_by == owners.created_by] if owners.created_by is not None else []
    theirs = [_s.team.in_(list(owners.teams))] if owners.teams else []
    # Nobody named, no team: nothing is visible (an empty OR would match everything).
    return or_(*mine, *theirs) if mine or theirs else false()


def held_by_live_owner(live: Iterable[tuple[str, str | None]] | None) -> ColumnElement[bool]:
    """The rows whose ``(owner, owner_run)`` is one of ``live`` (None: no leases, every owner
    counts, as the rule without leases)."""
    if live is None:
        return true()
    pairs = [
        and_(_s.owner == owner, _s.owner_run == run if run is not None else _s.owner_run.is_(None))
        for owner, run in live
    ]
    return or_(*pairs) if pairs else false()


def _heard(op: str, at: datetime) -> ColumnElement[bool]:
    """The last time the sandbox was heard from (its heartbeat, else its connection) ``op`` ``at``."""
    beat, conn = _s.last_heartbeat_at, _s.connected_at
    if op == ">=":
        return or_(and_(beat.is_not(None), beat >= at), and_(beat.is_(None), conn >= at))
    return or_(and_(beat.is_not(None), beat < at), and_(beat.is_(None), conn < at))


def state_column(*, now: datetime, liveness: Liveness, live: ColumnElement[bool]) -> ColumnElement[str]:
    """:func:`gateway.sandbox_state.sandbox_state` as a SQL ``CASE`` (see the module docstring);
    ``live`` is :func:`held_by_live_owner` of the owners whose lease is alive."""
    fresh_from = now - timedelta(seconds=liveness.fresh_for_s)
    lost_before = now - timedelta(seconds=liveness.lost_after_s)
    flagged = _s.connected.is_(True)
    unflagged = _s.connected.is_(False)
    connected = and_(flagged, live, _heard(">=", fresh_from))
    # disconnected_since: the written disconnection, or (flagged but not connected) when it was
    # last heard from.
    since_known = or_(
        and_(unflagged, _s.disconnected_at.is_not(None)),
        and_(flagged, or_(_s.last_heartbeat_at.is_not(None), _s.connected_at.is_not(None))),
    )
    since_before_lost = or_(
        and_(unflagged, _s.disconnected_at < lost_before), and_(flagged, _heard("<", lost_before))
    )
    return case(
        (_s.exit_code.is_not(None), SandboxState.EXITED.value),
        (connected, SandboxState.CONNECTED.value),
        (and_(since_known, since_before_lost), SandboxState.LOST.value),
        (since_known, SandboxState.DISCONNECTED.value),
        (_s.connected_at.is_not(None), SandboxState.DISCONNECTED.value),
        else_=SandboxState.PENDING.value,
    )


def _newest_health(column: ColumnElement[Any]) -> Any:
    """``column`` of the newest health event of each sandbox's current generation (correlated)."""
    return (
        select(column)
        .where(_e.sandbox_id == _s.id, _e.generation == _s.generation, _IS_HEALTH)
        .order_by(_e.id.desc())
        .limit(1)
        .correlate(sandboxes_table)
        .scalar_subquery()
    )


def _health_of_data() -> ColumnElement[str]:
    return case(
        *((_e.data.startswith(_HEALTH_PREFIX % state), state) for state in HEALTH_STATES),
        else_=UNKNOWN_HEALTH,
    )


def health_column() -> ColumnElement[str]:
    """Each sandbox's last reported health, ``unknown`` without a report."""
    return func.coalesce(_newest_health(_health_of_data()), UNKNOWN_HEALTH)


@dataclass(frozen=True, slots=True)
class UnhealthySandbox:
    id: str
    generation: int
    health: str
    #: The newest health report's reasons, and when it was made (the record's own time, ms).
    reasons: list[str]
    reported_ms: int | None
    #: When the sandbox entered this health state: the first report of the current run of reports
    #: in this state (ms; None when no earlier report of another state is stored, then the first).
    since_ms: int | None
    #: The facts the state rule reads (the summary shows each listed sandbox's state).
    facts: SandboxLiveness


@dataclass(frozen=True, slots=True)
class ExitedSandbox:
    id: str
    generation: int
    exit_code: int
    exited_at: datetime
    #: The newest EXITED lifecycle record's message (``main process 12 exited with code 137,
    #: signal 9``) and detail; None when the exit came without one.
    reason: str | None


@dataclass(frozen=True, slots=True)
class FleetCounts:
    total: int
    by_state: dict[str, int]
    by_health: dict[str, int]
    exited_recently: int


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _record_ms(timestamp_ms: Any, received_at: Any) -> int | None:
    if timestamp_ms is not None and int(timestamp_ms) > 0:
        return int(timestamp_ms)
    if isinstance(received_at, datetime):
        # Integer arithmetic (timestamp() * 1000 in floats is 1 ms early for some instants).
        at: datetime = received_at if received_at.tzinfo is not None else received_at.replace(tzinfo=UTC)
        return (at - _EPOCH) // timedelta(milliseconds=1)
    return None


class FleetQueries:
    """The summary's reads (see the module docstring); every one filtered by ``owners``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def owners_held(self, *, owners: Owners | None) -> builtins.list[tuple[str, str | None]]:
        """The distinct ``(owner, owner_run)`` of the connected, not exited rows: the owners whose
        leases decide which of them count as connected (one per replica run, a handful)."""
        query = (
            select(_s.owner, _s.owner_run)
            .where(visible_to(owners), _s.connected.is_(True), _s.exit_code.is_(None), _s.owner.is_not(None))
            .distinct()
        )
        with store_errors("cannot read the sandboxes' owners"):
            async with self._db.engine.connect() as conn:
                return [(r.owner, r.owner_run) for r in await conn.execute(query)]

    async def live_owners(
        self, *, owners: Owners | None, leases: ReplicaLeases | None, now: datetime
    ) -> builtins.list[tuple[str, str | None]] | None:
        """The owners (with their runs) that hold their sandboxes by the lease rule, judged by
        :meth:`ReplicaLeases.alive` itself; None without leases (every owner counts)."""
        if leases is None:
            return None
        held = await self.owners_held(owners=owners)
        return [(o, r) for o, r in held if leases.alive(o, run=r, now=now)]

    async def counts(
        self,
        *,
        owners: Owners | None,
        now: datetime,
        liveness: Liveness,
        live: Sequence[tuple[str, str | None]] | None,
        exited_since: datetime,
    ) -> FleetCounts:
        visible = visible_to(owners)
        state = state_column(now=now, liveness=liveness, live=held_by_live_owner(live)).label("state")
        by_state_q = select(state, func.count()).where(visible).group_by(state)
        health = health_column().label("health")
        inner = select(health).where(visible, _s.exit_code.is_(None)).subquery()
        by_health_q = select(inner.c.health, func.count()).group_by(inner.c.health)
        exited_q = select(func.count()).where(
            visible, _s.exit_code.is_not(None), _s.exited_at >= exited_since
        )
        with store_errors("cannot count the sandboxes"):
            async with self._db.engine.connect() as conn:
                by_state = {str(k): int(n) for k, n in await conn.execute(by_state_q)}
                by_health = {str(k): int(n) for k, n in await conn.execute(by_health_q)}
                exited = int((await conn.execute(exited_q)).scalar_one())
        return FleetCounts(
            total=sum(by_state.values()),
            by_state={s.value: by_state.get(s.value, 0) for s in SandboxState},
            by_health={h: by_health.get(h, 0) for h in (*HEALTH_STATES, UNKNOWN_HEALTH)},
            exited_recently=exited,
        )

    async def unhealthy(self, *, owners: Owners | None, limit: int) -> builtins.list[UnhealthySandbox]:
        """Up to ``limit`` sandboxes not exited whose last report is unhealthy or degraded,
        unhealthy first, then by id."""
        health = health_column().label("health")
        newest = _newest_health(_e.id).label("health_id")
        inner = (
            select(sandboxes_table, health, newest)
            .where(visible_to(owners), _s.exit_code.is_(None))
            .subquery()
        )
        rank = case((inner.c.health == "unhealthy", 0), else_=1)
        query = (
            select(inner)
            .where(inner.c.health.in_(["unhealthy", "degraded"]))
            .order_by(rank, inner.c.id)
            .limit(limit)
        )
        with store_errors("cannot list the unhealthy sandboxes"):
            async with self._db.engine.connect() as conn:
                rows = list(await conn.execute(query))
                if not rows:
                    return []
                reports = {
                    r.id: r
                    for r in await conn.execute(
                        select(_e.id, _e.data, _e.timestamp_ms, _e.received_at).where(
                            _e.id.in_([r.health_id for r in rows])
                        )
                    )
                }
                found = []
                for row in rows:
                    report = reports.get(row.health_id)
                    data = json.loads(report.data) if report is not None and report.data else {}
                    reasons = data.get("reasons") if isinstance(data, dict) else None
                    found.append(
                        UnhealthySandbox(
                            id=row.id,
                            generation=int(row.generation),
                            health=row.health,
                            reasons=[str(r) for r in reasons] if isinstance(reasons, list) else [],
                            reported_ms=(
                                _record_ms(report.timestamp_ms, report.received_at) if report else None
                            ),
                            since_ms=await self._since(conn, row.id, int(row.generation), row.health),
                            facts=SandboxLiveness(
                                bool(row.connected),
                                row.connected_at,
                                row.disconnected_at,
                                row.last_heartbeat_at,
                                row.exit_code,
                                row.owner,
                                row.owner_run,
                            ),
                        )
                    )
                return found

    @staticmethod
    async def _since(conn: Any, sandbox_id: str, generation: int, health: str) -> int | None:
        """The time of the first report of the current run of ``health`` reports: the first
        health event after the newest one of another state."""
        of_sandbox = (_e.sandbox_id == sandbox_id, _e.generation == generation, _IS_HEALTH)
        other = (
            select(func.max(_e.id))
            .where(*of_sandbox, ~_e.data.startswith(_HEALTH_PREFIX % health))
            .scalar_subquery()
        )
        first = (
            await conn.execute(
                select(_e.timestamp_ms, _e.received_at)
                .where(*of_sandbox, _e.id > func.coalesce(other, 0))
                .order_by(_e.id)
                .limit(1)
            )
        ).first()
        return None if first is None else _record_ms(first.timestamp_ms, first.received_at)

    async def exited(
        self, *, owners: Owners | None, since: datetime, limit: int
    ) -> builtins.list[ExitedSandbox]:
        """Up to ``limit`` sandboxes that exited at or after ``since``, the latest first, each
        with its EXITED record's message as the reason."""
        record = (
            select(_e.message, _e.data)
            .where(
                _e.sandbox_id == _s.id,
                _e.generation == _s.generation,
                _e.kind == "lifecycle",
                _e.data.startswith(_EXITED_PREFIX),
            )
            .order_by(_e.id.desc())
            .limit(1)
            .correlate(sandboxes_table)
        )
        query = (
            select(
                _s.id,
                _s.generation,
                _s.exit_code,
                _s.exited_at,
                record.with_only_columns(_e.message).scalar_subquery().label("message"),
                record.with_only_columns(_e.data).scalar_subquery().label("data"),
            )
            .where(visible_to(owners), _s.exit_code.is_not(None), _s.exited_at >= since)
            .order_by(_s.exited_at.desc(), _s.id)
            .limit(limit)
        )
        with store_errors("cannot list the exited sandboxes"):
            async with self._db.engine.connect() as conn:
                rows = list(await conn.execute(query))
        found = []
        for row in rows:
            reason = row.message
            data = json.loads(row.data) if row.data else {}
            detail = data.get("detail") if isinstance(data, dict) else None
            if reason and isinstance(detail, str) and detail and detail not in reason:
                reason = f"{reason}: {detail}"
            found.append(
                ExitedSandbox(
                    id=row.id,
                    generation=int(row.generation),
                    exit_code=int(row.exit_code),
                    exited_at=row.exited_at,
                    reason=reason,
                )
            )
        return found
