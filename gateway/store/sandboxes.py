"""The sandbox registry: one row per sandbox, its current session, liveness and exit.

A row is created when a sandbox is first seen (by a driver that launches it, or by the hello of a
supervisor the gateway did not launch). Sessions come and go on the row: connecting records the
session id, the journal epoch and the owning replica (its ``ha.replica_id`` and the run of the
process, ``owner_run``: the lease of that run in the ``replicas`` table decides whether the session
still counts, :mod:`gateway.sandbox_state`). Connecting is a claim: one UPDATE raises
``owner_epoch`` and returns it, so the newest hello owns the row, whichever replica's clock says
what; every later write of the session (heartbeats, its disconnection, and in the event and
command stores its batches and results) is conditional on that epoch and raises
:class:`~gateway.store.fencing.Fenced` once a newer claim took the row (:mod:`gateway.store.fencing`).
A supervisor that reconnects quickly may have its new session registered before the old stream's
teardown runs: the old one's disconnection then finds a newer epoch and writes nothing.

Exit information stays once written, also across later connections: an exited sandbox's
supervisor still connects to flush its journal.

An id names one sandbox at a time, not forever: ``create`` may take over the row of a sandbox
that is gone (which ones, its caller says: for the Kubernetes driver, those whose pod is deleted),
as the row's next generation. Everything the row says about the old sandbox is reset; its events
stay, under their generation, and its pending commands fail (they were meant for the old one).

Writes on behalf of one sandbox (a session's connection, the driver's create and what its watch
sees) can take the generation they are about: then they are conditional on it, so a write meant
for the sandbox that had the id before cannot land on the one that has it now.

Heartbeats are frequent (thousands of sandboxes), so the session layer collects them and writes
one batch per flush rather than one transaction per heartbeat.
"""

from __future__ import annotations

import builtins
import functools
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Dialect,
    Insert,
    Text,
    Update,
    and_,
    bindparam,
    case,
    column,
    delete,
    false,
    func,
    not_,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from gateway.store.commands import FAILED, PENDING
from gateway.store.db import Database, StoreError, store_errors, utcnow
from gateway.store.fencing import Fenced
from gateway.store.leadership import LeaderTerm
from gateway.store.schema import UTCDateTime
from gateway.store.schema import commands as commands_table
from gateway.store.schema import events as events_table
from gateway.store.schema import sandboxes as sandboxes_table

if TYPE_CHECKING:
    from gateway.store.fleet import FleetQueries


@dataclass(frozen=True, slots=True)
class Claim:
    """A recorded claim: its ``owner_epoch`` and, when asked for, the high-water mark of the
    session's journal epoch read after it (see :meth:`SandboxStore.claim`)."""

    owner_epoch: int
    high_water_mark: int
    #: The generation of the row claimed (the pinned one, or without a pin, the row's).
    generation: int = 1


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One hello's claim, as :meth:`SandboxStore.claim` takes it (see there); ``register``: a
    missing row is registered (as ``ensure`` does, driver ``external``) and claimed, rather than
    refused with :class:`NoSuchSandbox`."""

    sandbox_id: str
    instance_id: str
    session_id: str
    journal_epoch: str
    owner: str
    at: datetime
    generation: int | None = None
    owner_run: str | None = None
    connection_epoch: int = 0
    live_for_s: float | None = None
    read_high_water_mark: bool = False
    register: bool = False


class NoSuchSandbox(StoreError):
    """A claim of a sandbox that has no row (and was not to be registered): nothing was written."""


class ClaimBusy(Exception):
    """A batched claim (``claim_many(skip_locked=True)``) found its row locked by another
    transaction (a write of the session in flight, another replica's claim) and left it: nothing
    was written; claim it alone (:meth:`SandboxStore.claim_one`), which waits for the lock."""


@dataclass(frozen=True, slots=True)
class SandboxRow:
    id: str
    driver: str
    created_at: datetime
    instance_id: str | None
    session_id: str | None
    journal_epoch: str | None
    connected: bool
    connected_at: datetime | None
    disconnected_at: datetime | None
    last_heartbeat_at: datetime | None
    exit_code: int | None
    exited_at: datetime | None
    owner: str | None
    owner_epoch: int
    spec: dict[str, Any] | None = None
    driver_state: dict[str, Any] | None = None
    generation: int = 1
    #: Where the current run began (see ``schema.sandboxes``): None before the first STARTED.
    run_epoch: str | None = None
    run_sequence: int | None = None
    #: Who created this generation (a person's username) and its team; None without authentication.
    created_by: str | None = None
    team: str | None = None
    #: The Kubernetes pod's uid (its projected token must name it); None before the pod exists.
    pod_uid: str | None = None
    #: The run (``ReplicaIdentity.run``) of the owner process: a restarted replica is another run.
    owner_run: str | None = None


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    """The policy an upstream supervisor synced for its sandbox (UpdateConfig), as stored: the
    deterministic serialization of its ``SandboxPolicy`` (None until a sync), our version of it
    (0 until a sync, then 1, raised by each sync that changes it) and the SHA-256 hex of the bytes.
    Read on its own (``SandboxStore.policy``): no other read carries the policy's bytes."""

    policy: bytes | None
    version: int
    policy_hash: str | None
    generation: int


class StaleConnection(Exception):
    """A hello refused by ``mark_connected``: the supervisor instance holding the sandbox is still
    live on a connection of a higher (or the same) ``connection_epoch`` than this hello's, so this
    one is a late, stale connection of that same process. Nothing was written."""

    def __init__(self, sandbox_id: str, *, instance_id: str, connection_epoch: int, held_epoch: int) -> None:
        super().__init__(
            f"sandbox {sandbox_id} is held by a newer connection of supervisor instance "
            f"{instance_id!r} (connection epoch {held_epoch}); this hello's connection epoch "
            f"{connection_epoch} is not newer: a stale connection of the same supervisor"
        )
        self.instance_id = instance_id
        self.connection_epoch = connection_epoch
        self.held_epoch = held_epoch


def _held_live(
    instance_id: str, connection_epoch: int, *, at: datetime, live_for_s: float
) -> ColumnElement[bool]:
    """True (never NULL) when the row's claim is held by ``instance_id`` on a connection epoch of at
    least ``connection_epoch`` and that session is live (flagged connected, heard from within
    ``live_for_s`` of ``at``): a hello with that epoch is a late connection of the same supervisor.
    Heartbeat times are written on each replica's clock (see gateway.sandbox_state): the bound
    assumes clocks in step, as the API's liveness rule does."""
    return _held_live_since(instance_id, connection_epoch, since=at - timedelta(seconds=live_for_s))


def _held_live_since(
    instance_id: str | ColumnElement[Any],
    connection_epoch: int | ColumnElement[Any],
    *,
    since: datetime | ColumnElement[Any],
) -> ColumnElement[bool]:
    """:func:`_held_live` with its bound as a time (or, in a batched claim, each request's column)."""
    c = sandboxes_table.c
    heard = func.coalesce(c.last_heartbeat_at, c.connected_at)
    return and_(
        c.instance_id.is_not(None),
        c.instance_id == instance_id,
        c.connection_epoch >= connection_epoch,
        c.connected.is_(True),
        heard.is_not(None),
        heard >= since,
    )


#: The batched claim's requests as a table (``v``), from one JSON array parameter ``rows``: the
#: statement's text does not depend on the batch's size (compiled once), and SQLite refuses
#: SQLAlchemy's VALUES construct. Times are as the columns store them on the dialect.
_CLAIM_SOURCE = {
    "postgresql": "SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(id text, "
    "instance_id text, session_id text, journal_epoch text, owner text, owner_run text, "
    "at timestamptz, since timestamptz, generation bigint, connection_epoch bigint)",
    "sqlite": "SELECT value ->> '$.id' AS id, value ->> '$.instance_id' AS instance_id, "
    "value ->> '$.session_id' AS session_id, value ->> '$.journal_epoch' AS journal_epoch, "
    "value ->> '$.owner' AS owner, value ->> '$.owner_run' AS owner_run, value ->> '$.at' AS at, "
    "value ->> '$.since' AS since, value ->> '$.generation' AS generation, "
    "value ->> '$.connection_epoch' AS connection_epoch FROM json_each(:rows)",
}


#: The batched claim's lock of its rows and its read of the high-water marks, built once: their
#: ids go in as expanding parameters (a list of ids as literals was coerced one by one for every
#: batch, a few percent of the event loop in a burst of hellos).
_LOCK_ROWS = (
    select(sandboxes_table.c.id)
    .where(sandboxes_table.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(sandboxes_table.c.id)
)
_HIGH_WATER_MARKS = (
    select(events_table.c.sandbox_id, events_table.c.journal_epoch, func.max(events_table.c.sequence))
    .where(
        tuple_(events_table.c.sandbox_id, events_table.c.journal_epoch).in_(
            bindparam("pairs", expanding=True)
        )
    )
    .group_by(events_table.c.sandbox_id, events_table.c.journal_epoch)
)


@functools.cache
def _claim_statement(dialect: str) -> Update:
    """The batched claim's UPDATE (see ``SandboxStore.claim_many``): each request's row claimed
    with its own values, under its own generation pin and stale-connection rule."""
    c = sandboxes_table.c
    v = (
        text(_CLAIM_SOURCE[dialect])
        .columns(
            column("id", Text),
            column("instance_id", Text),
            column("session_id", Text),
            column("journal_epoch", Text),
            column("owner", Text),
            column("owner_run", Text),
            column("at", UTCDateTime()),
            column("since", UTCDateTime()),
            column("generation", BigInteger),
            column("connection_epoch", BigInteger),
        )
        .subquery("v")
    )
    stale = and_(
        v.c.since.is_not(None), _held_live_since(v.c.instance_id, v.c.connection_epoch, since=v.c.since)
    )
    return (
        update(sandboxes_table)
        .where(
            c.id == v.c.id,
            or_(v.c.generation.is_(None), c.generation == v.c.generation),
            not_(stale),
        )
        .values(
            owner_epoch=c.owner_epoch + 1,
            instance_id=v.c.instance_id,
            session_id=v.c.session_id,
            journal_epoch=v.c.journal_epoch,
            owner=v.c.owner,
            owner_run=v.c.owner_run,
            connection_epoch=v.c.connection_epoch,
            connected=True,
            connected_at=v.c.at,
            last_heartbeat_at=v.c.at,
            disconnected_at=None,
        )
        .returning(c.id, c.owner_epoch, c.generation)
    )


#: How many sandboxes' heartbeats a flush writes, and whose claims it checks, per statement (see
#: ``record_heartbeats``): SQLite's bound parameters per statement are limited, and the
#: parameters of each statement are processed on the event loop, so a flush of thousands in one
#: statement stalled every session's heartbeat answer for as long (issue 22).
HEARTBEAT_CHECK_CHUNK = 250


@dataclass(frozen=True, slots=True)
class Owners:
    """A filter of the sandbox list: those created by ``created_by`` or of one of ``teams`` (what a
    non-admin may see, gateway.auth.people)."""

    created_by: str | None
    teams: Sequence[str] = ()


def _sandbox(row: Row[Any]) -> SandboxRow:
    return SandboxRow(
        id=row.id,
        driver=row.driver,
        created_at=row.created_at,
        instance_id=row.instance_id,
        session_id=row.session_id,
        journal_epoch=row.journal_epoch,
        connected=bool(row.connected),
        connected_at=row.connected_at,
        disconnected_at=row.disconnected_at,
        last_heartbeat_at=row.last_heartbeat_at,
        exit_code=row.exit_code,
        exited_at=row.exited_at,
        owner=row.owner,
        owner_epoch=int(row.owner_epoch),
        spec=json.loads(row.spec) if row.spec is not None else None,
        driver_state=json.loads(row.driver_state) if row.driver_state is not None else None,
        generation=int(row.generation),
        run_epoch=row.run_epoch,
        run_sequence=row.run_sequence,
        created_by=row.created_by,
        team=row.team,
        pod_uid=row.pod_uid,
        owner_run=row.owner_run,
    )


@dataclass(frozen=True, slots=True)
class SandboxLiveness:
    """The columns the state rule (``gateway.sandbox_state``) reads, and nothing else: counting
    20,000 sandboxes by state must not read and decode their specs."""

    connected: bool
    connected_at: datetime | None
    disconnected_at: datetime | None
    last_heartbeat_at: datetime | None
    exit_code: int | None
    #: The replica holding the session (its lease decides whether ``connected`` still holds).
    owner: str | None = None
    #: The run of that replica's process that claimed the session (see ``SandboxRow.owner_run``).
    owner_run: str | None = None


def _of_generation(generation: int | None) -> tuple[ColumnElement[bool], ...]:
    """The WHERE clause that makes a write conditional on the row's generation, if one is given."""
    return () if generation is None else (sandboxes_table.c.generation == generation,)


class SandboxStore:
    """Reads and updates the ``sandboxes`` table; see the module docstring."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _insert(self) -> Insert:
        if self._db.dialect == "postgresql":
            return postgresql.insert(sandboxes_table).on_conflict_do_nothing(index_elements=["id"])
        return sqlite.insert(sandboxes_table).on_conflict_do_nothing(index_elements=["id"])

    async def ensure(
        self, sandbox_id: str, *, driver: str = "external", spec: dict[str, Any] | None = None
    ) -> SandboxRow:
        """Register the sandbox unless it exists (then its driver and spec are left as they are)."""
        values = {
            "id": sandbox_id,
            "driver": driver,
            "created_at": utcnow(),
            "spec": json.dumps(spec) if spec is not None else None,
        }
        with store_errors(f"cannot register sandbox {sandbox_id!r}"):
            async with self._db.begin() as conn:
                # Two hellos for a new sandbox may race: the loser's insert is a no-op, and both read
                # the one row.
                await conn.execute(self._insert().values(values))
                row = (
                    await conn.execute(select(sandboxes_table).where(sandboxes_table.c.id == sandbox_id))
                ).one()
        return _sandbox(row)

    async def create(
        self,
        sandbox_id: str,
        *,
        driver: str,
        spec: Mapping[str, Any] | None = None,
        driver_state: Mapping[str, Any] | None = None,
        replaces: Callable[[SandboxRow], bool | Awaitable[bool]] | None = None,
        may_replace: Callable[[SandboxRow], bool] | None = None,
        created_by: str | None = None,
        team: str | None = None,
    ) -> int | None:
        """Register a new sandbox and return its generation; None (and nothing changed) when the
        id is taken. Of two concurrent creates of one id exactly one gets a generation: the insert,
        or for an id in use the generation the update is conditional on, decides.

        ``replaces`` says whether the sandbox that has the id now is gone, so that the id may be
        created again: then the row is reset to the new sandbox under the next generation. It may
        be a coroutine function (to ask a driver, say); the row it judged is the one replaced, or
        none is: the update is conditional on the generation it read. ``may_replace``, asked
        first about that same row, says whether this creator may take the id over at all: the row
        keeps the earlier generations' events and commands, so whoever re-creates it may read
        them. ``created_by`` and ``team`` are the new generation's (a re-created id belongs to
        whoever created it again, its history included).
        """
        now = utcnow()
        values = {
            "driver": driver,
            "created_at": now,
            "spec": json.dumps(dict(spec), sort_keys=True) if spec is not None else None,
            "driver_state": json.dumps(dict(driver_state), sort_keys=True)
            if driver_state is not None
            else None,
            "created_by": created_by,
            "team": team,
            "pod_uid": None,  # the new generation's pod is not made yet
        }
        with store_errors(f"cannot register sandbox {sandbox_id!r}"):
            async with self._db.begin() as conn:
                inserted = await conn.execute(
                    self._insert().values(id=sandbox_id, **values).returning(sandboxes_table.c.id)
                )
                if inserted.first() is not None:
                    return 1
                if replaces is None:
                    return None
                row = (
                    await conn.execute(select(sandboxes_table).where(sandboxes_table.c.id == sandbox_id))
                ).first()
                if row is None:
                    return None
                if may_replace is not None and not may_replace(_sandbox(row)):
                    return None
                judged = replaces(_sandbox(row))
                if not (await judged if inspect.isawaitable(judged) else judged):
                    return None
                generation = int(row.generation) + 1
                updated = await conn.execute(
                    update(sandboxes_table)
                    .where(
                        sandboxes_table.c.id == sandbox_id,
                        sandboxes_table.c.generation == row.generation,
                    )
                    .values(
                        **values,
                        generation=generation,
                        instance_id=None,
                        session_id=None,
                        journal_epoch=None,
                        connected=False,
                        connected_at=None,
                        disconnected_at=None,
                        last_heartbeat_at=None,
                        exit_code=None,
                        exited_at=None,
                        run_epoch=None,
                        run_sequence=None,
                        owner=None,
                        owner_run=None,
                        # The earlier sandbox's supervisor synced its policy and claimed with its
                        # connection epoch: the new one starts without either.
                        connection_epoch=0,
                        policy=None,
                        policy_version=0,
                        policy_hash=None,
                    )
                )
                if updated.rowcount == 0:
                    return None  # another create took the id meanwhile
                await conn.execute(
                    update(commands_table)
                    .where(commands_table.c.sandbox_id == sandbox_id, commands_table.c.state == PENDING)
                    .values(
                        state=FAILED,
                        error=f"sandbox {sandbox_id!r} was deleted and created again "
                        f"(generation {generation})",
                        answered_at=now,
                    )
                )
                return generation

    async def get(self, sandbox_id: str) -> SandboxRow | None:
        with store_errors(f"cannot read sandbox {sandbox_id!r}"):
            async with self._db.engine.connect() as conn:
                row = (
                    await conn.execute(select(sandboxes_table).where(sandboxes_table.c.id == sandbox_id))
                ).first()
        return _sandbox(row) if row is not None else None

    async def policy(self, sandbox_id: str, *, generation: int | None = None) -> StoredPolicy | None:
        """The sandbox's synced policy (see :class:`StoredPolicy`); None when the sandbox is
        unknown, or with ``generation``, when the id has been created again since."""
        c = sandboxes_table.c
        with store_errors(f"cannot read the policy of sandbox {sandbox_id!r}"):
            async with self._db.engine.connect() as conn:
                row = (
                    await conn.execute(
                        select(c.policy, c.policy_version, c.policy_hash, c.generation).where(
                            c.id == sandbox_id, *_of_generation(generation)
                        )
                    )
                ).first()
        if row is None:
            return None
        blob = bytes(row.policy) if row.policy is not None else None
        return StoredPolicy(blob, int(row.policy_version), row.policy_hash, int(row.generation))

    async def set_policy(
        self, sandbox_id: str, policy: bytes, *, policy_hash: str, generation: int | None = None
    ) -> int | None:
        """Store the policy a sandbox's supervisor synced and return its version: the stored one
        when the same bytes come again (``policy_hash`` is their SHA-256), else one more. None, and
        nothing written, when the sandbox is unknown or (with ``generation``) created again since.

        One UPDATE decides the version from the row's own hash, so two syncs racing each other
        cannot both take the same number for different policies."""
        c = sandboxes_table.c
        with store_errors(f"cannot store the policy of sandbox {sandbox_id!r}"):
            async with self._db.begin() as conn:
                version = await conn.scalar(
                    update(sandboxes_table)
                    .where(c.id == sandbox_id, *_of_generation(generation))
                    .values(
                        policy=policy,
                        policy_hash=policy_hash,
                        # A NULL hash (no policy yet) compares unknown: the ELSE, version 1.
                        policy_version=case(
                            (c.policy_hash == policy_hash, c.policy_version), else_=c.policy_version + 1
                        ),
                    )
                    .returning(c.policy_version)
                )
        return int(version) if version is not None else None

    async def list(
        self, *, owners: Owners | None = None, limit: int | None = None, after: str | None = None
    ) -> builtins.list[SandboxRow]:
        """Sandboxes in id order: of ``owners`` only (filtered in the query, so a page of ``limit``
        is full whenever more visible rows exist), with ids after ``after`` (the last of the
        previous page)."""
        c = sandboxes_table.c
        query = select(sandboxes_table).order_by(c.id)
        if owners is not None:
            mine = [c.created_by == owners.created_by] if owners.created_by is not None else []
            theirs = [c.team.in_(list(owners.teams))] if owners.teams else []
            # Nobody named, no team: nothing is visible (an empty OR would match everything).
            query = query.where(or_(*mine, *theirs) if mine or theirs else false())
        if after is not None:
            query = query.where(c.id > after)
        if limit is not None:
            query = query.limit(limit)
        with store_errors("cannot list sandboxes"):
            async with self._db.engine.connect() as conn:
                result = await conn.execute(query)
                return [_sandbox(row) for row in result]

    def fleet(self) -> FleetQueries:
        """The fleet summary's counts and lists over this store's database (gateway.store.fleet)."""
        from gateway.store.fleet import FleetQueries  # noqa: PLC0415 (it imports this module)

        return FleetQueries(self._db)

    async def liveness(self) -> builtins.list[SandboxLiveness]:
        """What the state rule needs of every sandbox (for counting them by state)."""
        c = sandboxes_table.c
        columns = (
            c.connected,
            c.connected_at,
            c.disconnected_at,
            c.last_heartbeat_at,
            c.exit_code,
            c.owner,
            c.owner_run,
        )
        with store_errors("cannot read the sandboxes' liveness"):
            async with self._db.engine.connect() as conn:
                result = await conn.execute(select(*columns))
                return [SandboxLiveness(bool(r[0]), r[1], r[2], r[3], r[4], r[5], r[6]) for r in result]

    async def mark_connected(
        self,
        sandbox_id: str,
        *,
        instance_id: str,
        session_id: str,
        journal_epoch: str,
        owner: str,
        at: datetime,
        generation: int | None = None,
        owner_run: str | None = None,
        connection_epoch: int = 0,
        live_for_s: float | None = None,
    ) -> int | None:
        """The claim of :meth:`claim` without the high-water mark: its ``owner_epoch``, or None."""
        claimed = await self.claim(
            sandbox_id,
            instance_id=instance_id,
            session_id=session_id,
            journal_epoch=journal_epoch,
            owner=owner,
            at=at,
            generation=generation,
            owner_run=owner_run,
            connection_epoch=connection_epoch,
            live_for_s=live_for_s,
        )
        return claimed.owner_epoch if claimed is not None else None

    async def claim(
        self,
        sandbox_id: str,
        *,
        instance_id: str,
        session_id: str,
        journal_epoch: str,
        owner: str,
        at: datetime,
        generation: int | None = None,
        owner_run: str | None = None,
        connection_epoch: int = 0,
        live_for_s: float | None = None,
        read_high_water_mark: bool = False,
    ) -> Claim | None:
        """Claim the sandbox for a new session and return the claim's ``owner_epoch`` (at least
        1). Exit information is kept.

        ``connection_epoch`` is the hello's (``SupervisorHello.connection_epoch``, 0: none), stored
        with the claim. A hello of the instance holding the claim, with an epoch from 1 up to the
        claim's own, while that session is live (flagged connected, heard from within
        ``live_for_s`` of ``at``), is a late connection of the same supervisor: nothing is written
        and :class:`StaleConnection` is raised, so it can never take the sandbox from that
        supervisor's newer connection. The rule is part of the claiming UPDATE's condition, so it
        is checked and the claim made in one statement (atomic on both dialects); the row is read
        afterwards only to tell why nothing was claimed. ``connection_epoch`` must fit the signed
        64-bit column (the hello refuses larger ones).

        One statement raises the epoch and records the session, so of two claims the one that
        commits last owns the row and the other's later writes are fenced (its epoch is no longer
        the row's): the newest hello wins, and an owner that was paused cannot take it back. ``at``
        (when the session opened) is only recorded, never compared: replicas' clocks do not order
        claims. With ``generation`` (the one the session's hello found), nothing is written, and
        None returned, if the id has been created again since. A row that is missing altogether
        is an error.

        With ``read_high_water_mark``, the claim also carries the highest event sequence stored
        for (sandbox, ``journal_epoch``), read in the claim's transaction by a statement of its own
        AFTER the UPDATE (0 when there is none): the resume point must be read after the claim,
        so that the previous owner cannot raise it unseen. On PostgreSQL (READ COMMITTED) each
        statement takes its snapshot when it starts, and this one starts with the row lock held:
        every batch of the previous owner either committed before it (and is seen) or waits on
        the lock and is then fenced. It must not be folded into the UPDATE (a RETURNING subquery,
        a CTE): one statement has one snapshot, taken before it waited for the lock, and could
        miss a batch committed meanwhile. On SQLite the transaction holds the one writer."""
        return await self.claim_one(
            ClaimRequest(
                sandbox_id,
                instance_id=instance_id,
                session_id=session_id,
                journal_epoch=journal_epoch,
                owner=owner,
                at=at,
                generation=generation,
                owner_run=owner_run,
                connection_epoch=connection_epoch,
                live_for_s=live_for_s,
                read_high_water_mark=read_high_water_mark,
            )
        )

    async def claim_one(self, request: ClaimRequest) -> Claim | None:
        """:meth:`claim` of one :class:`ClaimRequest`."""
        (outcome,) = await self.claim_many([request])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def claim_many(
        self, requests: Sequence[ClaimRequest], *, skip_locked: bool = False
    ) -> builtins.list[Claim | Exception | None]:
        """Many hellos' claims (see :meth:`claim`, whose rules each one follows exactly) in ONE
        transaction of a constant number of statements, whatever their number (group commit: a
        burst of hellos was bound by the round trips of one transaction each, issue 22). Returns
        one outcome per request, in order: its :class:`Claim`, None (the pinned generation is
        gone), or the exception :meth:`claim` would raise for it alone (:class:`StaleConnection`,
        :class:`NoSuchSandbox`); the others are claimed all the same. A failure of the transaction
        raises StoreError: then nothing of any of them was written.

        The statements: the registering INSERT (only with ``register`` requests, ids in order;
        one statement run for their parameter sets); on PostgreSQL the rows locked FOR UPDATE in
        id order (two replicas' batches lock in the same order, so they cannot deadlock); one
        UPDATE .. FROM the requests' values (a JSON array: the statement text is the same whatever
        the batch's size) .. RETURNING the claimed rows, each with its own generation pin and
        stale-connection rule; one SELECT of the high-water marks, after the UPDATE as
        :meth:`claim` requires. Two requests of one sandbox are claimed in their
        order, one UPDATE each (the later owns the row, the earlier is fenced as if it came
        first). A request the UPDATE did not claim is explained by a read of its row.

        ``skip_locked`` (PostgreSQL; SQLite has one writer, nothing to skip): a row another
        transaction holds is left, its request answered :class:`ClaimBusy`, so that one sandbox's
        row held long (a replica frozen inside a write of it, see docs/high-availability.md)
        stalls that sandbox's hello alone, not the batch and every hello queued behind it. A row
        missing (and not registered) is answered ClaimBusy too on PostgreSQL (the lock's read
        cannot tell the two apart): the request claimed alone says which."""
        if not requests:
            return []
        ids = sorted({r.sandbox_id for r in requests})
        what = f"cannot mark {len(ids)} sandbox(es) connected ({ids[0]!r}...)"
        if len(ids) == 1:
            what = f"cannot mark sandbox {ids[0]!r} connected"
        # Rounds: the n-th request of each sandbox goes in the n-th UPDATE (one round, unless a
        # sandbox said hello twice in the batch: an UPDATE .. FROM joining a row twice would
        # apply one of the two, unpredictably, on PostgreSQL).
        rounds: builtins.list[builtins.list[int]] = []
        seen: dict[str, int] = {}
        for index, request in enumerate(requests):
            n = seen.get(request.sandbox_id, 0)
            seen[request.sandbox_id] = n + 1
            if n == len(rounds):
                rounds.append([])
            rounds[n].append(index)
        outcomes: builtins.list[Claim | Exception | None] = [None] * len(requests)
        claimed: dict[int, tuple[int, int]] = {}  # request index -> (owner_epoch, generation)
        with store_errors(what):
            async with self._db.begin() as conn:
                registering = sorted({r.sandbox_id for r in requests if r.register})
                if registering:
                    # Before any lock, in id order (like the locks below): two batches
                    # registering the same new ids wait on each other in one order.
                    # One statement run for many parameter sets (executemany), not a VALUES
                    # list: its compiled form is cached, where a VALUES list of each batch's
                    # length was compiled again for every batch (a third of the claim's CPU).
                    now = utcnow()
                    await conn.execute(
                        self._insert(),
                        [
                            {"id": i, "driver": "external", "created_at": now, "spec": None}
                            for i in registering
                        ],
                    )
                # FOR UPDATE first, on PostgreSQL: it conflicts with the KEY SHARE lock a fenced
                # write holds on the row (gateway/store/fencing.py), so the claim waits for writes
                # in flight, and they for it; the UPDATE alone would not. SQLite has no row locks
                # (its FOR UPDATE renders as a plain read, run by pysqlite outside the write
                # transaction, which begins at the first INSERT or UPDATE): this process's writer
                # lock (Database.begin) and the file's own already exclude every other writer,
                # and the read only cost the batch a statement's round trips through the driver.
                if conn.dialect.name == "postgresql":
                    if skip_locked:
                        locked = set(
                            await conn.scalars(_LOCK_ROWS.with_for_update(skip_locked=True), {"ids": ids})
                        )
                        for index, request in enumerate(requests):
                            if request.sandbox_id not in locked:
                                outcomes[index] = ClaimBusy(request.sandbox_id)
                        rounds = [[i for i in r if requests[i].sandbox_id in locked] for r in rounds]
                        rounds = [r for r in rounds if r]
                    else:
                        await conn.execute(_LOCK_ROWS.with_for_update(), {"ids": ids})
                for round_ in rounds:
                    # The stale-connection rule is in the claim's own WHERE, not in a read before
                    # it: one statement is atomic on both dialects.
                    rows = await conn.execute(
                        _claim_statement(conn.dialect.name),
                        {"rows": self._claim_rows(conn.dialect, requests, round_)},
                    )
                    by_id = {row.id: (int(row.owner_epoch), int(row.generation)) for row in rows}
                    for index in round_:
                        got = by_id.get(requests[index].sandbox_id)
                        if got is not None:
                            claimed[index] = got
                        else:
                            outcomes[index] = await self._unclaimed(conn, requests[index])
                marks: dict[tuple[str, str], int] = {}
                wanted = {
                    (requests[i].sandbox_id, requests[i].journal_epoch)
                    for i in claimed
                    if requests[i].read_high_water_mark
                }
                if wanted:
                    top = await conn.execute(_HIGH_WATER_MARKS, {"pairs": sorted(wanted)})
                    marks = {(row[0], row[1]): int(row[2]) for row in top if row[2] is not None}
        for index, (owner_epoch, generation) in claimed.items():
            request = requests[index]
            outcomes[index] = Claim(
                owner_epoch=owner_epoch,
                high_water_mark=marks.get((request.sandbox_id, request.journal_epoch), 0)
                if request.read_high_water_mark
                else 0,
                generation=generation,
            )
        return outcomes

    @staticmethod
    def _claim_rows(dialect: Dialect, requests: Sequence[ClaimRequest], round_: Sequence[int]) -> str:
        """The JSON array of a round's requests, the claim statement's one parameter; times as
        the column type binds them on this dialect (SQLite compares its stored text)."""
        # The dialect's own processing of the column (SQLite: its stored text, which the stale
        # rule compares as text); PostgreSQL's recordset parses ISO 8601.
        bind = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)

        def stamp(at: datetime) -> Any:
            if dialect.name == "postgresql" or bind is None:
                return at.astimezone(UTC).isoformat()
            return bind(at)

        rows = []
        for index in round_:
            r = requests[index]
            live = r.connection_epoch > 0 and r.live_for_s is not None
            rows.append(
                {
                    "id": r.sandbox_id,
                    "instance_id": r.instance_id,
                    "session_id": r.session_id,
                    "journal_epoch": r.journal_epoch,
                    "owner": r.owner,
                    "owner_run": r.owner_run,
                    "at": stamp(r.at),
                    # Heard from since then: the holder is live (None: no stale rule applies).
                    "since": stamp(r.at - timedelta(seconds=r.live_for_s or 0.0)) if live else None,
                    "generation": r.generation,
                    "connection_epoch": r.connection_epoch,
                }
            )
        return json.dumps(rows)

    async def _unclaimed(self, conn: AsyncConnection, request: ClaimRequest) -> Exception | None:
        """Why ``request`` was not claimed (read in the claim's transaction): the outcome of
        :meth:`claim` for it."""
        c = sandboxes_table.c
        what = f"cannot mark sandbox {request.sandbox_id!r} connected"
        stale: tuple[ColumnElement[bool], ...] = ()
        if request.connection_epoch > 0 and request.live_for_s is not None:
            stale = (
                _held_live(
                    request.instance_id,
                    request.connection_epoch,
                    at=request.at,
                    live_for_s=request.live_for_s,
                ),
            )
        row = (
            await conn.execute(
                select(c.generation, c.connection_epoch, *stale).where(c.id == request.sandbox_id)
            )
        ).first()
        if row is None:
            return NoSuchSandbox(f"{what}: no such sandbox (register it first)")
        if request.generation is not None and row.generation != request.generation:
            return None  # the id was created again
        if stale and row[2]:
            return StaleConnection(
                request.sandbox_id,
                instance_id=request.instance_id,
                connection_epoch=request.connection_epoch,
                held_epoch=int(row.connection_epoch),
            )
        return StoreError(f"{what}: the claim matched no row, for no reason it can tell")

    async def mark_disconnected(
        self,
        sandbox_id: str,
        *,
        session_id: str,
        at: datetime,
        generation: int | None = None,
        owner_epoch: int | None = None,
    ) -> bool:
        """Mark the sandbox disconnected if ``session_id`` is still its current, connected session
        (and with ``owner_epoch``, its claim is still the row's).

        Returns whether the row changed; False means this session was already marked, or (without
        ``owner_epoch``) a newer session has taken over, and nothing was written. With
        ``owner_epoch``, a newer claim raises :class:`Fenced` (nothing written either): the caller
        learns that the sandbox is another session's, not merely that this one was marked.
        """
        c = sandboxes_table.c
        where = [c.id == sandbox_id, c.session_id == session_id, *_of_generation(generation)]
        if owner_epoch is not None:
            where.append(c.owner_epoch == owner_epoch)
        with store_errors(f"cannot mark sandbox {sandbox_id!r} disconnected"):
            async with self._db.begin() as conn:
                result = await conn.execute(
                    update(sandboxes_table)
                    .where(*where, c.connected.is_(True))
                    .values(connected=False, disconnected_at=at)
                )
                if result.rowcount > 0:
                    return True
                if owner_epoch is not None:
                    row = (
                        await conn.execute(select(c.owner_epoch, c.owner).where(c.id == sandbox_id))
                    ).first()
                    if row is None or int(row.owner_epoch) != owner_epoch:
                        raise Fenced(
                            sandbox_id,
                            kind="disconnect_superseded",
                            epoch=owner_epoch,
                            current_epoch=None if row is None else int(row.owner_epoch),
                            owner=None if row is None else row.owner,
                        )
                return False

    async def record_heartbeats(
        self,
        beats: Mapping[str, datetime],
        *,
        sessions: Mapping[str, str] | None = None,
        epochs: Mapping[str, int] | None = None,
    ) -> set[str]:
        """Write many sandboxes' last heartbeat times in one transaction. With ``sessions`` (the
        session each beat came from, for every sandbox in ``beats``), a beat is written only
        while the row still names its session: a session replaced elsewhere (its supervisor
        reconnected to another gateway) cannot refresh a row that is another session's now.
        With ``epochs`` (each beat's session's claim), only while the row still carries that
        claim: the ids whose claim was taken by a newer one (fenced: their beat was not written)
        are returned, read in the same transaction, so their sessions can be ended."""
        if not beats:
            return set()
        # bindparam names must differ from the column names, or SQLAlchemy takes them for the SET.
        c = sandboxes_table.c
        where = [c.id == bindparam("b_id")]
        if sessions is not None:
            where.append(c.session_id == bindparam("b_session"))
        if epochs is not None:
            where.append(c.owner_epoch == bindparam("b_epoch"))
        statement = update(sandboxes_table).where(*where).values(last_heartbeat_at=bindparam("b_at"))
        ids = list(beats)
        fenced: set[str] = set()
        with store_errors(f"cannot record the heartbeats of {len(ids)} sandboxes"):
            async with self._db.begin() as conn:
                # One transaction, written in chunks: between two statements the event loop
                # answers heartbeats while the database works, instead of waiting for the
                # parameters of thousands of rows to be built and processed at once.
                for first in range(0, len(ids), HEARTBEAT_CHECK_CHUNK):
                    chunk = ids[first : first + HEARTBEAT_CHECK_CHUNK]
                    params: list[dict[str, object]] = []
                    for sandbox_id in chunk:
                        param: dict[str, object] = {"b_id": sandbox_id, "b_at": beats[sandbox_id]}
                        if sessions is not None:
                            param["b_session"] = sessions[sandbox_id]
                        if epochs is not None:
                            param["b_epoch"] = epochs[sandbox_id]
                        params.append(param)
                    written = await conn.execute(statement, params)
                    # Every row written (a count the driver reports for many rows: SQLite's):
                    # nothing of this chunk is fenced, and the claims need no read (its IN list
                    # of ids is built on the event loop too, the flush's largest cost).
                    if conn.dialect.supports_sane_multi_rowcount and written.rowcount == len(chunk):
                        continue
                    if epochs is not None:
                        rows = await conn.execute(select(c.id, c.owner_epoch).where(c.id.in_(chunk)))
                        found = {row.id: int(row.owner_epoch) for row in rows}
                        fenced.update(sid for sid in chunk if found.get(sid) != epochs[sid])
        return fenced

    async def set_spec(
        self,
        sandbox_id: str,
        spec: Mapping[str, Any],
        *,
        generation: int | None = None,
        pod_uid: str | None = None,
    ) -> bool:
        """Record the sandbox's spec (and the uid of the pod its create made); False when it is
        unknown (or of another ``generation``)."""
        values: dict[str, Any] = {"spec": json.dumps(dict(spec), sort_keys=True)}
        if pod_uid is not None:
            values["pod_uid"] = pod_uid
        with store_errors(f"cannot record the spec of sandbox {sandbox_id!r}"):
            async with self._db.begin() as conn:
                result = await conn.execute(
                    update(sandboxes_table)
                    .where(sandboxes_table.c.id == sandbox_id, *_of_generation(generation))
                    .values(**values)
                )
        return bool(result.rowcount)

    async def set_driver_state(
        self,
        sandbox_id: str,
        state: Mapping[str, Any],
        *,
        generation: int | None = None,
        pod_uid: str | None = None,
        leader: LeaderTerm | None = None,
    ) -> bool:
        """Record what the driver saw (a pod's phase...); False when the sandbox is unknown (or
        of another ``generation``). ``pod_uid`` fills in the pod's uid only where the row has
        none (a create that stopped before recording it): the create's own record always wins,
        so a late event of an earlier pod cannot bind the row to that pod. With ``leader`` (the
        pod watch's writes) the write is made only while that leader's term holds, checked in the
        same transaction; else it raises NotLeader (gateway/store/leadership.py)."""
        values: dict[str, Any] = {"driver_state": json.dumps(dict(state), sort_keys=True)}
        if pod_uid is not None:
            values["pod_uid"] = func.coalesce(sandboxes_table.c.pod_uid, pod_uid)
        fence = () if leader is None else (leader.holds(),)
        with store_errors(f"cannot record the driver state of sandbox {sandbox_id!r}"):
            async with self._db.begin() as conn:
                if leader is not None:
                    await leader.hold(conn)
                result = await conn.execute(
                    update(sandboxes_table)
                    .where(sandboxes_table.c.id == sandbox_id, *_of_generation(generation), *fence)
                    .values(**values)
                )
                if leader is not None and not result.rowcount:
                    await leader.check(conn)
        return bool(result.rowcount)

    async def delete(self, sandbox_id: str, *, generation: int | None = None) -> bool:
        """Forget the sandbox and (by ON DELETE CASCADE) all of its events; with ``generation``,
        only if the row is still of that generation. Returns whether a row was deleted."""
        with store_errors(f"cannot delete sandbox {sandbox_id!r}"):
            async with self._db.begin() as conn:
                result = await conn.execute(
                    delete(sandboxes_table).where(
                        sandboxes_table.c.id == sandbox_id, *_of_generation(generation)
                    )
                )
        return bool(result.rowcount)
