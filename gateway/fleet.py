"""The fleet summary (``GET /api/v1/fleet``, ``openshell-gateway fleet``): one document for an agent
or a person asking "how is the fleet?" without listing every sandbox.

- ``by_state``: how many sandboxes are in each state, decided by the one state rule
  (:mod:`gateway.sandbox_state`, written as SQL by :mod:`gateway.store.fleet`), so the counts are
  what ``GET /api/v1/sandboxes`` would show for the same rows;
- ``by_health``: the sandboxes not exited, by what their supervisors last reported (``healthy``,
  ``degraded``, ``unhealthy``, ``unknown``: nothing reported yet);
- ``unhealthy``: up to ``limit`` of those reported unhealthy or degraded (unhealthy first), with
  their state, the reasons of the last report, when it was made and since when the sandbox has
  been in that health;
- ``exited``: the sandboxes that exited since ``since`` (an instant, default one hour back), the
  latest first, up to ``limit``, with the exit code and the EXITED record's message, and how many
  exited in that time in all;
- ``replicas``: each gateway replica's lease row (sessions held, draining, the age of its last
  renewal, whether it is alive), for admins only: the session counts span every team's sandboxes.
  ``null`` for others, and ``[]`` for a gateway without leases.

Every count and list holds only the sandboxes the caller may list (an admin: all).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.sandbox_state import Liveness, ReplicaLeases, sandbox_state
from gateway.store.fleet import FleetQueries
from gateway.store.sandboxes import Owners

#: ``limit``'s default and bound: a summary is for reading, the sandbox list is for walking.
DEFAULT_LIMIT = 20
MAX_LIMIT = 500
#: ``since``'s default: what "recently exited" means without one.
DEFAULT_SINCE_S = 3600.0


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def _iso_ms(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat()


@dataclass(frozen=True, slots=True)
class FleetRequest:
    #: Whose sandboxes (None: every one, an admin's view) and whether replicas are shown.
    owners: Owners | None
    show_replicas: bool
    exited_since: datetime
    limit: int


def exited_since(since_ms: int | None, *, now: datetime) -> datetime:
    """What "recently exited" means: from ``since_ms`` (the request's ``since``) or an hour back."""
    if since_ms is None:
        return now - timedelta(seconds=DEFAULT_SINCE_S)
    return datetime.fromtimestamp(since_ms / 1000, UTC)


def replicas_json(leases: ReplicaLeases | None, *, now: datetime) -> list[dict[str, Any]]:
    """Each lease row, by id: sessions and draining as the replica last said, its last renewal's
    age on the clock it was written with (``ReplicaLeases.skew``) and whether it is alive."""
    if leases is None:
        return []
    on_db_clock = now + leases.skew if leases.skew is not None else now
    return [
        {
            "id": replica_id,
            "alive": leases.alive(replica_id, now=now),
            "sessions": leases.sessions.get(replica_id, 0),
            "draining": leases.draining.get(replica_id, False),
            "renewed_at": renewed.isoformat(),
            "lease_age_s": round((on_db_clock - renewed).total_seconds(), 3),
        }
        for replica_id, renewed in sorted(leases.renewed_at.items())
    ]


async def fleet_summary(
    queries: FleetQueries,
    request: FleetRequest,
    *,
    now: datetime,
    liveness: Liveness,
    leases: ReplicaLeases | None,
) -> dict[str, Any]:
    """The summary document (see the module docstring)."""
    live = await queries.live_owners(owners=request.owners, leases=leases, now=now)
    counts = await queries.counts(
        owners=request.owners, now=now, liveness=liveness, live=live, exited_since=request.exited_since
    )
    unhealthy = await queries.unhealthy(owners=request.owners, limit=request.limit)
    exited = await queries.exited(owners=request.owners, since=request.exited_since, limit=request.limit)
    unwell = counts.by_health["unhealthy"] + counts.by_health["degraded"]
    return {
        "at": now.isoformat(),
        "sandboxes": counts.total,
        "by_state": counts.by_state,
        "by_health": counts.by_health,
        "unhealthy": {
            "total": unwell,
            "truncated": unwell > len(unhealthy),
            "sandboxes": [
                {
                    "id": u.id,
                    "generation": u.generation,
                    "state": str(sandbox_state(u.facts, now=now, liveness=liveness, leases=leases)),
                    "health": u.health,
                    "reason": "; ".join(u.reasons),
                    "reasons": u.reasons,
                    "reported_at": _iso_ms(u.reported_ms),
                    "since": _iso_ms(u.since_ms),
                }
                for u in unhealthy
            ],
        },
        "exited": {
            "since": request.exited_since.isoformat(),
            "total": counts.exited_recently,
            "truncated": counts.exited_recently > len(exited),
            "sandboxes": [
                {
                    "id": x.id,
                    "generation": x.generation,
                    "exit_code": x.exit_code,
                    "exited_at": _iso(x.exited_at),
                    "reason": x.reason,
                }
                for x in exited
            ],
        },
        "replicas": replicas_json(leases, now=now) if request.show_replicas else None,
    }
