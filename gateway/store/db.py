"""Opening the gateway's database: URL handling, engine setup, migrations, readable errors.

One async engine serves the whole gateway. SQLite (through aiosqlite) is the zero-setup default
for a single replica; PostgreSQL (through asyncpg) is what several replicas share. URLs without an
explicit driver are given the async one (``sqlite:///x.db`` becomes ``sqlite+aiosqlite:///x.db``,
``postgresql://`` becomes ``postgresql+asyncpg://``), so an operator writes the plain form.

For SQLite every new connection is switched to WAL (readers such as the HTTP API never block the
writer), ``synchronous=NORMAL`` (a commit survives a crash of the gateway process; an OS crash or
power loss may roll back the last few commits, events already acknowledged to supervisors among
them: that is the price of the log throughput, and PostgreSQL is the store for when it matters),
a busy timeout (the API and the writers share one file) and enforced foreign keys (SQLite leaves
them off otherwise, which would break the ON DELETE CASCADE from sandboxes to events).

Migrations are Alembic revisions run programmatically on a connection of this same async engine
(``run_sync``), so no synchronous driver is needed, in one transaction that first takes the
database's own lock: a transaction-level advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` (the
file's write lock) on SQLite. Replicas or ``migrate`` jobs that start together therefore migrate one
after the other, and those that come second find the schema at head and do nothing. A schema at a
revision this code does not know (migrated by a newer gateway) is never touched: opening it raises
:class:`SchemaError`, with or without migrating. Whatever goes wrong while opening comes out as a
:class:`StoreError` naming the database (password masked) and the reason, never as a driver
traceback.

PostgreSQL connections come from a pool sized by ``database.pool_size`` / ``max_overflow``, checked
with a ping before use (``pool_pre_ping``: a connection the server or a failover ended is replaced
rather than failing its next query) and replaced after ``pool_recycle_s``. A URL may name several
hosts (``postgresql://u:p@/db?host=h1:5432&host=h2:5432&target_session_attrs=read-write``): they
are tried in order, one asyncpg connect each with its own ``connect_timeout_s`` (asyncpg's own
multi-host connect spends one timeout on all of them, so a first host that drops packets used it up
and the second was never tried), and with ``target_session_attrs=read-write`` only the primary is
kept, so after a failover new connections go to the promoted one. A new connection that cannot be
made (the server restarting, no primary yet) is tried again with backoff for up to
``pool_timeout_s`` before its caller sees the error: a short outage makes writes wait, not fail
(their callers' own deadlines still bound them).

Every statement, the pool's ping included, waits at most ``statement_timeout_s`` for the server
(asyncpg's ``command_timeout``), and a connection whose statement timed out is dropped, never
reused: a primary that froze or was cut off would otherwise keep each pooled connection, and the
call on it, waiting forever after its replica was promoted. Migrations are not bounded this way.
``idle_in_transaction_session_timeout`` is set with ``SET`` once connected, not as a startup
parameter, which PgBouncer refuses.

On PostgreSQL the migration transaction runs with ``SET LOCAL lock_timeout``
(``MIGRATION_LOCK_TIMEOUT_S``): DDL that would queue behind a long transaction (and make every query
on that table queue behind it) gives up instead, is logged with what it waited for, and the whole
migration is retried with backoff. Waiting for another migration's advisory lock is logged too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from gateway.config import DatabaseSettings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
SUPPORTED_DIALECTS = ("sqlite", "postgresql")
SQLITE_BUSY_TIMEOUT_MS = 10_000
#: The first and the largest pause between attempts to open a PostgreSQL connection.
CONNECT_RETRY_INITIAL_S, CONNECT_RETRY_MAX_S = 0.1, 1.0
#: PostgreSQL: the DDL of a migration waits at most this long for a table's lock before the whole
#: migration is rolled back and tried again (see the module docstring).
MIGRATION_LOCK_TIMEOUT_S = 5.0
#: How many times a migration that timed out on a lock is tried in all, and the pause before the
#: first retry (doubled each time, with jitter).
MIGRATION_ATTEMPTS, MIGRATION_RETRY_INITIAL_S = 6, 1.0
#: How often the wait for another migration's advisory lock is logged.
MIGRATION_WAIT_LOG_S = 5.0
# Replicas that start together must not run the same migration twice at once; a transaction-level
# advisory lock serialises them and is released by the commit. The number is arbitrary but fixed.
_PG_MIGRATION_LOCK_KEY = 0x6F70_656E_7368  # "opensh"
#: How long a migration waits for SQLite's write lock (another process migrating, or writing). The
#: PostgreSQL advisory lock is waited for without a bound, as a second ``migrate`` must never run
#: before the first finished; on SQLite a generous bound stands in for that.
SQLITE_MIGRATION_LOCK_WAIT_MS = 600_000

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
_PASSWORD_IN_URL = re.compile(r"(://[^:/@]*:)[^@]*@")


class StoreError(Exception):
    """The database cannot do what was asked; the message says what, where and why."""


class SchemaError(StoreError):
    """The database's schema is at a revision this code does not know (a newer gateway migrated it):
    nothing may read, write or migrate it. Not a passing outage: retrying does not help."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def mask_url(url: str | URL) -> str:
    """The URL as it is safe to log: the password replaced by ``***``."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    return _PASSWORD_IN_URL.sub(r"\1***@", url)


def describe_error(exc: BaseException) -> str:
    """A one-line reason: the driver's own message, without SQLAlchemy's SQL echo and links."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def normalise_url(url: str | URL) -> URL:
    """Parse ``url`` and give it the async driver of its dialect; StoreError if unusable."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"invalid database URL {mask_url(url)!r}: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    if backend not in SUPPORTED_DIALECTS:
        raise StoreError(
            f"unsupported database URL {mask_url(parsed)!r}: "
            f"expected one of {', '.join(SUPPORTED_DIALECTS)} (e.g. sqlite:///var/gateway.db)"
        )
    if "+" not in parsed.drivername:
        parsed = parsed.set(drivername=_ASYNC_DRIVERS[backend])
    return parsed


def cancels_safely(url: str | URL) -> bool:
    """Whether a store call on ``url``'s database may be cancelled mid-transaction (by a caller that
    stopped waiting for it) without leaving the database locked: not on SQLite.

    There, a cancellation thrown into the call while its connection is inside a write transaction
    makes SQLAlchemy's cleanup (the rollback) fail with the CancelledError, so the pool invalidates
    the connection and closes it. But the cancelled statement's sqlite3 cursor is still alive (the
    CancelledError's traceback holds its frame, in a reference cycle), so ``sqlite3_close_v2``
    only makes the connection a zombie: it keeps its transaction, and the file's write lock, until
    the garbage collector frees that cursor, which an idle gateway may not do for minutes. Every
    other writer meanwhile waits out its busy timeout with a pooled connection held, and the pool
    runs dry. A SQLite store call is therefore let run to its end (it is bounded by the busy
    timeout) rather than cancelled. A PostgreSQL connection closed mid-transaction is rolled back by
    the server at once, and the cancellation is what ends a call a hung server holds."""
    try:
        return normalise_url(url).get_backend_name() != "sqlite"
    except StoreError:
        return True


def _roll_back_before_closing(dbapi_connection: Any, _record: Any, _exc: BaseException | None) -> None:
    """SQLite: a connection the pool invalidates (its cleanup interrupted, typically by a
    cancellation: see :func:`cancels_safely`) is rolled back on its aiosqlite thread before the
    pool closes it. Closed with the cancelled statement's cursor still alive, it would otherwise be
    a zombie that keeps its transaction, and the file's write lock, until the garbage collector
    frees that cursor. Queued, not awaited: this runs inside the pool's synchronous cleanup, and
    the thread takes its work in order, so the rollback lands before the close."""
    driver = getattr(dbapi_connection, "driver_connection", None)
    # aiosqlite keeps its work queue and sqlite3 connection private; another version without them
    # is left as it was (no worse than without this listener).
    work = getattr(driver, "_tx", None)
    raw = getattr(driver, "_connection", None)
    if work is not None and raw is not None:
        work.put_nowait((None, raw.rollback))


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching to WAL itself needs the lock when another process has it.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


#: SQLSTATEs of a server that is not there for now: connection failures (class 08), and a server
#: shutting down, crashed or still starting (57P01-57P03), which a replica's promotion also answers.
_TRANSIENT_SQLSTATES = ("08", "57P01", "57P02", "57P03")
#: Of class 08, a protocol violation (08P01) is a refusal, not an outage: a pooler refusing a startup
#: parameter answers it, and would answer it again.
_REFUSAL_SQLSTATES = ("08P01",)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says the database is unreachable for now, as opposed to a
    refusal that retrying would only repeat (bad credentials, a missing database, a constraint)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, (OSError, TimeoutError)):
            return True
        sqlstate = getattr(current, "sqlstate", None)
        if (
            isinstance(sqlstate, str)
            and sqlstate.startswith(_TRANSIENT_SQLSTATES)
            and sqlstate not in _REFUSAL_SQLSTATES
        ):
            return True
        # asyncpg, when no host of a multi-host URL is the primary (target_session_attrs) yet.
        if type(current).__name__ == "TargetServerAttributeNotMatched":
            return True
        current = current.__cause__ or current.__context__
    return False


class _Outage:
    """A database's reachability as this process's new connections see it: one WARNING when they
    start failing and one INFO when they work again, however many callers wait meanwhile."""

    def __init__(self, display_url: str) -> None:
        self._display = display_url
        self._since: float | None = None
        #: Why new connections fail, while they do ('' otherwise): for /readyz's reason.
        self.reason = ""

    def failed(self, exc: BaseException, *, retrying_for_s: float) -> None:
        self.reason = describe_error(exc)
        if self._since is None:
            self._since = time.monotonic()
            log.warning(
                "database %s unreachable (%s): new connections are retried for up to %gs each",
                self._display,
                describe_error(exc),
                retrying_for_s,
            )

    def succeeded(self) -> None:
        self.reason = ""
        if self._since is not None:
            down_s, self._since = time.monotonic() - self._since, None
            log.info("database %s reachable again after %.1fs", self._display, down_s)


#: Each PostgreSQL engine's outage state (see unreachable_reason).
_OUTAGES: weakref.WeakKeyDictionary[Any, _Outage] = weakref.WeakKeyDictionary()


def unreachable_reason(engine: AsyncEngine) -> str:
    """Why ``engine``'s new connections are failing right now ('' when they are not, or SQLite):
    a caller that gave up waiting for one (a readiness probe) can still say why."""
    outage = _OUTAGES.get(engine.sync_engine)
    return outage.reason if outage is not None else ""


async def connect_each_host(kwargs: dict[str, Any], *, timeout_s: float) -> Any:
    """``asyncpg.connect(**kwargs)``, but the hosts of a multi-host URL are tried one after the other,
    each with its own ``timeout_s``: asyncpg's own walk gives one timeout to all of them, so a first
    host that drops packets (a dead node, a partition) used it all and the next was never tried.
    A host that is unreachable or not what ``target_session_attrs`` asks for passes to the next; any
    other refusal (credentials, a missing database) is raised at once. The last host's error is
    raised when none would do."""
    import asyncpg  # type: ignore[import-untyped]  # noqa: PLC0415 - PostgreSQL only

    hosts = kwargs.get("host")
    if not isinstance(hosts, list):
        return await asyncpg.connect(**kwargs, timeout=timeout_s)
    ports = kwargs.get("port")
    port_of = ports if isinstance(ports, list) else [ports] * len(hosts)
    failure: BaseException | None = None
    for host, port in zip(hosts, port_of, strict=True):
        try:
            return await asyncpg.connect(**{**kwargs, "host": host, "port": port}, timeout=timeout_s)
        except Exception as exc:
            if not is_transient(exc):
                raise
            failure = exc
    assert failure is not None  # a list of hosts is never empty (the dialect refuses that URL)
    raise failure


def _retrying_connect(settings: DatabaseSettings, outage: _Outage) -> Any:
    """A new pool connection: :func:`connect_each_host`, tried again with backoff for up to
    ``pool_timeout_s`` while the failure is transient (see the module docstring)."""

    async def connect(*args: Any, **kwargs: Any) -> Any:
        # Every statement's wait for the server is bounded (see the module docstring).
        kwargs["command_timeout"] = settings.statement_timeout_s
        idle_ms = round(settings.idle_in_transaction_timeout_s * 1000)
        deadline = time.monotonic() + settings.pool_timeout_s
        pause = CONNECT_RETRY_INITIAL_S
        while True:
            try:
                conn = await connect_each_host(kwargs, timeout_s=settings.connect_timeout_s)
                try:
                    if idle_ms > 0:
                        # A transaction whose client froze (SIGSTOP, a paused VM, a cut) would
                        # otherwise hold the sandbox rows it locked for as long as it stays frozen:
                        # the owner fence's row lock and a newer owner's claim would wait on it. The
                        # server ends it instead (its writes roll back, nothing of them was
                        # acknowledged). A SET, not a startup parameter: PgBouncer refuses unknown
                        # startup parameters (or drops them, with ignore_startup_parameters), while
                        # a session-mode pooler passes a SET on to the server connection it pins.
                        await conn.execute(f"SET idle_in_transaction_session_timeout = {idle_ms}")
                except BaseException:
                    conn.terminate()
                    raise
            except Exception as exc:
                left = deadline - time.monotonic()
                if not is_transient(exc) or left <= 0:
                    raise
                outage.failed(exc, retrying_for_s=settings.pool_timeout_s)
                await asyncio.sleep(min(pause * random.uniform(0.5, 1.0), left))
                pause = min(pause * 2, CONNECT_RETRY_MAX_S)
                continue
            outage.succeeded()
            return conn

    return connect


@dataclass(frozen=True, slots=True)
class _StatementObserver:
    done: Callable[[str, float], None]
    failed: Callable[[str], None]


#: Told of every statement of this process's engines (the gateway's metrics): one for the process.
_statement_observer: _StatementObserver | None = None
#: Where a connection keeps the start time of its statement in flight (``Connection.info``; a
#: connection runs one statement at a time: the entry is taken when the statement ends, and after a
#: failure the next statement's start overwrites it, so a connection holds one entry at most).
_STARTED = "openshell_statement_started"


def observe_statements(*, done: Callable[[str, float], None], failed: Callable[[str], None]) -> None:
    """Have every database statement of this process reported: ``done(sql, seconds)`` when it
    returns, ``failed(error class)`` when it raises (SQLAlchemy's class, e.g. ``OperationalError``,
    or ``TimeoutError`` for one timed out). One observer per process; a later call replaces it."""
    global _statement_observer  # noqa: PLW0603 - the engines' listeners read it at each statement
    _statement_observer = _StatementObserver(done, failed)


def _statement_started(
    conn: Connection, _cursor: Any, _sql: str, _params: Any, _ctx: Any, _many: bool
) -> None:
    conn.info[_STARTED] = time.perf_counter()


def _statement_ended(conn: Connection, _cursor: Any, sql: str, _params: Any, _ctx: Any, _many: bool) -> None:
    started = conn.info.pop(_STARTED, None)
    if started is not None and _statement_observer is not None:
        _statement_observer.done(sql, time.perf_counter() - started)


def _statement_failed(context: ExceptionContext) -> None:
    # The connection's start time is left in place (the next statement's start overwrites it):
    # ``context.connection.info`` would revalidate an invalidated connection, that is, connect again
    # from inside the error handling, and a failure there would come back here.
    if _statement_observer is None:
        return
    if isinstance(context.original_exception, asyncio.CancelledError):
        return  # the caller went away (a follow closed, a session ended): not the database's failure
    if isinstance(context.original_exception, TimeoutError):
        _statement_observer.failed("TimeoutError")
    elif context.sqlalchemy_exception is not None:
        _statement_observer.failed(type(context.sqlalchemy_exception).__name__)
    else:
        _statement_observer.failed("other")


def _drop_timed_out(context: ExceptionContext) -> None:
    """A statement that ran out of ``statement_timeout_s`` leaves its connection waiting on a server
    that did not answer (asyncpg still cancelling it): it is treated as a disconnect, so the pool
    drops it instead of handing it to the next caller."""
    if isinstance(context.original_exception, TimeoutError):
        context.is_disconnect = True


def create_engine(
    url: str | URL, *, echo: bool = False, settings: DatabaseSettings | None = None
) -> AsyncEngine:
    """An async engine for ``url``, set up for its dialect (see the module docstring); ``settings``
    gives a PostgreSQL engine its pool and timeouts (the defaults of ``database`` without)."""
    settings = settings if settings is not None else DatabaseSettings()
    parsed = normalise_url(url)
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {"echo": echo}
    if backend == "sqlite":
        path = _sqlite_file(parsed)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot open database {mask_url(parsed)}: cannot create directory "
                    f"{path.parent}: {describe_error(exc)}"
                ) from exc
            # A new file is made 0600 before SQLite makes it (its WAL and shm files take the same
            # mode): it holds the sandbox token signing keys. An existing file keeps its mode; any
            # other failure is left to SQLite to report when it opens the file.
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    else:
        kwargs.update(
            pool_pre_ping=True,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            # The pool's own wait for a free connection; a new one's wait for the server is the
            # retrying connect's (the same bound).
            pool_timeout=settings.pool_timeout_s,
            pool_recycle=settings.pool_recycle_s,
        )
    try:
        engine = create_async_engine(parsed, **kwargs)
    except Exception as exc:  # a missing driver module, a sync-only driver, bad options
        raise StoreError(f"cannot open database {mask_url(parsed)}: {describe_error(exc)}") from exc
    # Every statement's time and failure, for the metrics (observe_statements).
    event.listen(engine.sync_engine, "before_cursor_execute", _statement_started)
    event.listen(engine.sync_engine, "after_cursor_execute", _statement_ended)
    if backend == "sqlite":
        event.listen(engine.sync_engine, "connect", _on_sqlite_connect)
        event.listen(engine.sync_engine.pool, "invalidate", _roll_back_before_closing)
    else:
        outage = _OUTAGES[engine.sync_engine] = _Outage(mask_url(parsed))
        connect = _retrying_connect(settings, outage)

        def use_retrying_connect(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
            # The dialect has parsed the URL (hosts, ports, target_session_attrs) into cparams; only
            # the function that connects with them is ours.
            cparams["async_creator_fn"] = connect

        event.listen(engine.sync_engine, "do_connect", use_retrying_connect)
        event.listen(engine.sync_engine, "handle_error", _drop_timed_out)
    # After _drop_timed_out: a listener that raised would keep the ones after it from running.
    event.listen(engine.sync_engine, "handle_error", _statement_failed)
    return engine


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the packaged migrations, optionally bound to ``connection``."""
    cfg = Config()
    # ConfigParser interpolation would choke on a '%' in the install path.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@dataclass(frozen=True)
class _Scripts:
    known: frozenset[str]
    heads: frozenset[str]


@cache
def _scripts() -> _Scripts:
    # Read once per process: the packaged revisions do not change while it runs.
    script = ScriptDirectory.from_config(alembic_config())
    return _Scripts(
        known=frozenset(rev.revision for rev in script.walk_revisions()),
        heads=frozenset(script.get_heads()),
    )


def packaged_heads() -> frozenset[str]:
    """The packaged migrations' head revisions (what ``alembic_version`` holds once migrated)."""
    return _scripts().heads


@dataclass(frozen=True)
class SchemaState:
    """Where a database's schema stands against the migrations packaged with this code."""

    #: The revisions in ``alembic_version``; empty when there is no schema (never migrated).
    current: frozenset[str]
    #: The packaged heads: what ``current`` is once migrated.
    heads: frozenset[str]
    #: Those of ``current`` no packaged script has: a newer gateway migrated the database.
    unknown: frozenset[str]

    @property
    def at_head(self) -> bool:
        return self.current == self.heads

    def describe(self) -> str:
        """Why the schema is not usable as it stands, said for an operator ('' when at head)."""
        found, needed = ", ".join(sorted(self.current)), ", ".join(sorted(self.heads))
        if self.unknown:
            return (
                f"database schema is at revision {found}, newer than this gateway knows (its newest is "
                f"{needed}): a newer gateway migrated it; run that version or a later one"
            )
        if not self.current:
            return f"database schema missing (no revision recorded; this gateway needs {needed}): " + (
                "run openshell-gateway migrate"
            )
        if not self.at_head:
            return (
                f"database schema at revision {found}, older than this gateway's {needed}: "
                "run openshell-gateway migrate"
            )
        return ""


def schema_state(connection: Connection) -> SchemaState:
    """The schema's standing, read on ``connection`` (for ``AsyncConnection.run_sync``)."""
    scripts = _scripts()
    current = frozenset(MigrationContext.configure(connection).get_current_heads())
    return SchemaState(current=current, heads=scripts.heads, unknown=current - scripts.known)


def _upgrade_sync(connection: Connection, revision: str) -> None:
    # Read under the migration lock: what a replica that migrated first left is what counts.
    state = schema_state(connection)
    if state.unknown:
        # Alembic would stop with "Can't locate revision"; say what it means instead, and change
        # nothing (a downgrade is never this code's to guess).
        raise SchemaError(state.describe())
    command.upgrade(alembic_config(connection), revision)


async def _migration_lock_holders(engine: AsyncEngine) -> str:
    """Who holds the migration lock, read on another connection (best effort: for the log only)."""
    try:
        async with engine.connect() as other:
            rows = (
                await other.execute(
                    text(
                        "SELECT a.pid, coalesce(a.application_name, ''),"
                        " coalesce(host(a.client_addr), 'local'), a.xact_start"
                        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                        " WHERE l.locktype = 'advisory' AND l.granted"
                        " AND l.classid = :hi AND l.objid = :lo AND l.objsubid = 1"
                    ),
                    {"hi": _PG_MIGRATION_LOCK_KEY >> 32, "lo": _PG_MIGRATION_LOCK_KEY & 0xFFFF_FFFF},
                )
            ).all()
    except Exception as exc:  # the log line must not fail the migration
        return f"holder not read: {describe_error(exc)}"
    return ", ".join(
        f"pid {pid} {app or 'unnamed'} from {addr} since {since}" for pid, app, addr, since in rows
    ) or ("holder not visible")


async def _take_pg_migration_lock(conn: AsyncConnection) -> None:
    """Take the transaction-level advisory lock, waited for without a bound (a second migration must
    never run before the first ended), saying every ``MIGRATION_WAIT_LOG_S`` who holds it."""
    began = time.monotonic()
    taking = asyncio.create_task(
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_KEY}),
        name="migration lock",
    )
    try:
        while True:
            done, _ = await asyncio.wait({taking}, timeout=MIGRATION_WAIT_LOG_S)
            if done:
                taking.result()
                return
            log.warning(
                "waiting %.0fs for the migration lock, held by another migration (%s)",
                time.monotonic() - began,
                await _migration_lock_holders(conn.engine),
            )
    finally:
        if not taking.done():
            taking.cancel()
            with contextlib.suppress(BaseException):
                await taking


async def _unbounded_statements(conn: AsyncConnection) -> Any:
    """Lift asyncpg's statement bound on ``conn`` and return what restores it: the advisory lock is
    waited for without a bound, and a revision's DDL may take longer than statement_timeout_s on a
    large table. (asyncpg keeps the bound in the connection's private config; no setter exists.)"""
    raw: Any = (await conn.get_raw_connection()).driver_connection
    bounded = getattr(raw, "_config", None)
    if bounded is None or not hasattr(bounded, "_replace"):
        # Another asyncpg keeps it elsewhere: migrate with the bound rather than not at all (a
        # revision slower than statement_timeout_s then fails, saying so, and is retried).
        log.warning(
            "cannot lift the statement timeout for the migration on this asyncpg version; "
            "it runs bounded by database.statement_timeout_s"
        )
        return lambda: None
    raw._config = bounded._replace(command_timeout=None)

    def restore() -> None:
        raw._config = bounded

    return restore


@contextlib.asynccontextmanager
async def migration_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection in one transaction that holds the database's migration lock (see the module
    docstring), committed when the block ends without an exception. The gateway's migrations and
    the ``alembic`` command line (``migrations/env.py``) both run in one, so they wait for each
    other."""
    async with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        restore_bound: Any = None
        try:
            if sqlite:
                # pysqlite runs DDL outside any transaction unless one is begun by hand: without
                # this, two processes would both see no schema and both create it (the second
                # failing on "table already exists"), and a crash could leave half a revision.
                await conn.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_MIGRATION_LOCK_WAIT_MS}")
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                restore_bound = await _unbounded_statements(conn)
                await _take_pg_migration_lock(conn)
                # Taken only now: the advisory lock above is waited for without a bound.
                await conn.exec_driver_sql(
                    f"SET LOCAL lock_timeout = '{int(MIGRATION_LOCK_TIMEOUT_S * 1000)}ms'"
                )
            yield conn
            await conn.commit()
        finally:
            if restore_bound is not None:
                restore_bound()
            if sqlite:
                # Back to the ordinary wait for the connection's next user (the pool keeps it); a
                # failure here must not hide the migration's own.
                with contextlib.suppress(SQLAlchemyError):
                    await conn.rollback()
                    await conn.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


def _lock_timed_out(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) == "55P03"


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema behind ``engine`` to ``revision`` in one transaction, holding the database's
    migration lock; SchemaError when the schema is newer than this code. On PostgreSQL a statement
    that waited ``MIGRATION_LOCK_TIMEOUT_S`` for a table's lock rolls the whole migration back, and
    it is tried again with backoff (``MIGRATION_ATTEMPTS`` in all), each wait logged."""
    pause = MIGRATION_RETRY_INITIAL_S
    for attempt in range(1, MIGRATION_ATTEMPTS + 1):
        try:
            async with migration_transaction(engine) as conn:
                await conn.run_sync(_upgrade_sync, revision)
            return
        except DBAPIError as exc:
            if not _lock_timed_out(exc) or attempt == MIGRATION_ATTEMPTS:
                raise
            statement = " ".join((exc.statement or "").split())[:200]
            log.warning(
                "migration attempt %d/%d waited %gs for a lock (another transaction holds the table: %s); "
                "rolled back, trying again in %.1fs",
                attempt,
                MIGRATION_ATTEMPTS,
                MIGRATION_LOCK_TIMEOUT_S,
                statement or describe_error(exc),
                pause,
            )
            await asyncio.sleep(pause * random.uniform(1.0, 1.5))
            pause *= 2


async def migrate(url: str) -> None:
    """Run every pending migration against ``url`` (``alembic upgrade head``, programmatically)."""
    engine = create_engine(url)
    try:
        await upgrade(engine)
    except SchemaError as exc:
        raise SchemaError(f"cannot migrate database {mask_url(engine.url)}: {exc}") from None
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"cannot migrate database {mask_url(engine.url)}: {describe_error(exc)}") from exc
    finally:
        await engine.dispose()


class Database:
    """Owns the gateway's async engine; the stores borrow it."""

    def __init__(self, engine: AsyncEngine, *, schema_ready: bool = True) -> None:
        self.engine = engine
        self.dialect: str = engine.dialect.name
        self.display_url = mask_url(engine.url)
        #: Whether the schema was at (or past) this code's head when opened: False when it was
        #: missing or older and not migrated here (a migration job is expected to run meanwhile).
        self.schema_ready_at_open = schema_ready
        # SQLite has one writer per file, and a pooled connection that finds the lock taken waits
        # in SQLite's busy handler, which sleeps in growing steps (up to 100 ms) instead of being
        # woken when the lock frees: under many concurrent writers (a burst of hellos) the file's
        # lock stood idle between holders and 72 % of the gateway's samples were those sleeps
        # (issue 22). This process's writers therefore queue here, woken in turn (through begin(),
        # or writing() for the event inserts on the driver itself); the busy timeout still covers
        # other processes on the same file.
        self._sqlite_writer: asyncio.Lock | None = asyncio.Lock() if self.dialect == "sqlite" else None

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """This process's turn to write, on SQLite (nothing on PostgreSQL): for a writer that
        commits on the driver connection itself instead of through :meth:`begin` (the event
        inserts), so that it, too, queues here rather than in SQLite's busy handler."""
        if self._sqlite_writer is None:
            yield
            return
        async with self._sqlite_writer:
            yield

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction, committed when the block ends without an exception
        (``engine.begin()``); on SQLite, taken in turn with this process's other writers. Every
        store write goes through here; a block must not open another inside it (the lock is not
        reentrant)."""
        if self._sqlite_writer is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._sqlite_writer, self.engine.begin() as conn:
            yield conn

    @classmethod
    async def open(
        cls, url: str, *, migrate: bool = True, settings: DatabaseSettings | None = None
    ) -> Database:
        """Connect to ``url`` (and migrate it to the newest schema unless told not to); ``settings``
        size the pool and bound its waits (see :func:`create_engine`)."""
        engine = create_engine(url, settings=settings)
        display = mask_url(engine.url)
        what = "open"
        try:
            # Connect first on its own, so that "cannot reach it" and "cannot migrate it" read
            # differently.
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
                # Read before migrating too, so that a newer schema is refused in the same words
                # whether this gateway migrates or not.
                state = await conn.run_sync(schema_state)
            if state.unknown:
                raise SchemaError(state.describe())
            if migrate:
                what = "migrate"
                await upgrade(engine)
            elif not state.at_head:
                # Served anyway (a migration job may be on its way); /readyz says not ready meanwhile.
                log.warning("%s; /readyz answers not ready until then", state.describe())
        except SchemaError as exc:
            await engine.dispose()
            raise SchemaError(f"cannot use database {display}: {exc}") from None
        except Exception as exc:
            await engine.dispose()
            raise StoreError(f"cannot {what} database {display}: {describe_error(exc)}") from exc
        log.info("database %s open (%s)", display, engine.dialect.name)
        return cls(engine, schema_ready=migrate or state.at_head)

    async def close(self) -> None:
        await self.engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


@contextlib.contextmanager
def store_errors(what: str) -> Iterator[None]:
    """Turn a database failure inside the block into a StoreError that starts with ``what``."""
    try:
        yield
    except (SQLAlchemyError, OSError) as exc:
        raise StoreError(f"{what}: {describe_error(exc)}") from exc
