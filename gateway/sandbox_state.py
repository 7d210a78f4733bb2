"""The one rule that says what state a sandbox is in; the API, the status command and the metrics
all call it, so they can never disagree.

The store records facts: the session the sandbox last connected with, whether that session was
marked disconnected, when the gateway last heard from it, the exit. The flag alone cannot say that
a sandbox is connected: clearing it is one write, by the one gateway process that held the session,
and that process may die first, or its write may fail while the database is read-only or away.
So a sandbox counts as connected only while its last heartbeat is also fresh:

    fresh_for_s = stale bound (interval, rounded up as an upstream supervisor rounds it, + grace)
                  + 2 x heartbeat flush interval

A live session is never silent for longer than the stale bound (the gateway ends it), the
heartbeat time reaches the database at the next batched flush, and one more flush interval leaves
room for a flush that runs late. A session whose heartbeat a command widened is renewed by the
gateway holding it (``SessionRegistry.take_heartbeats``), so it stays fresh as well.

Past that bound a sandbox still flagged connected is shown ``disconnected`` since its last
heartbeat, and ``lost`` after ``lost_after_s``, exactly as if the disconnection had been written.

Issue 20 adds replica leases: the owner's lease joins the heartbeat here, in this one function.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
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

    @staticmethod
    def stale_after_for(interval_s: float, *, grace_s: float, jitter: float = 0.0) -> float:
        """The silence allowed a session asked to beat every ``interval_s``: the interval rounded
        as an upstream supervisor rounds it (whole seconds, at least one), stretched by how much
        later than the interval a beat may come (``jitter``, a fraction of it), plus ``grace_s``.
        The one formula for the bound a session is given and the one this rule counts on."""
        return max(interval_s, 1, round(interval_s)) * (1 + jitter) + grace_s

    @classmethod
    def from_settings(cls, sessions: SessionSettings) -> Liveness:
        # The bound the gateway gives each session it accepts (OpenShellService._accept).
        stale_after = cls.stale_after_for(sessions.heartbeat_interval_s, grace_s=sessions.grace_s)
        return cls(
            stale_after_s=stale_after,
            fresh_for_s=stale_after + 2 * sessions.heartbeat_flush_interval_s,
            lost_after_s=sessions.lost_after_s,
        )


def is_connected(row: LivenessFacts, *, now: datetime, liveness: Liveness) -> bool:
    """Flagged connected and heard from within ``fresh_for_s``."""
    if not row.connected:
        return False
    heard = row.last_heartbeat_at or row.connected_at
    return heard is not None and (now - heard).total_seconds() <= liveness.fresh_for_s


def disconnected_since(row: LivenessFacts, *, now: datetime, liveness: Liveness) -> datetime | None:
    """When the sandbox stopped being connected: the recorded disconnection, or for a session
    whose disconnection was never written, its last heartbeat. None while connected or never."""
    if is_connected(row, now=now, liveness=liveness):
        return None
    if not row.connected:
        return row.disconnected_at
    return row.last_heartbeat_at or row.connected_at


def sandbox_state(row: LivenessFacts, *, now: datetime, liveness: Liveness) -> SandboxState:
    """``exited`` once the exit is known; else ``connected`` (see :func:`is_connected`);
    else ``lost`` when disconnected longer than ``lost_after_s``, ``disconnected`` when for less;
    else ``pending`` (registered, never connected)."""
    if row.exit_code is not None:
        return SandboxState.EXITED
    if is_connected(row, now=now, liveness=liveness):
        return SandboxState.CONNECTED
    since = disconnected_since(row, now=now, liveness=liveness)
    if since is not None:
        if (now - since).total_seconds() > liveness.lost_after_s:
            return SandboxState.LOST
        return SandboxState.DISCONNECTED
    if row.connected_at is not None:
        return SandboxState.DISCONNECTED
    return SandboxState.PENDING
