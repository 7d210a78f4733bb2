"""The labelled counters start at 0 for every label their owners use (gateway.metrics), so that
rate() and increase() see the first refusal, hint or record of a replica's life."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import tempfile
from pathlib import Path

from prometheus_client import generate_latest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from gateway import admission, drain, metrics, rebalance
from gateway.metrics import GatewayMetrics
from gateway.sessions import SessionRegistry
from gateway.store import db
from openshell_wire.records import HealthState, LifecycleKind
from openshell_wire.v1 import openshell_pb2 as pb


def test_the_label_lists_are_their_owners_values() -> None:
    assert set(metrics.ADMISSION_REFUSALS) == {r.value for r in admission.Refusal}
    assert set(metrics.HINT_REASONS) == {
        drain.DRAIN,
        drain.SHUTDOWN,
        rebalance.REASON_REBALANCE,
        rebalance.REASON_MAX_AGE,
    }
    assert "REJECT_CODE_OVERLOADED" in metrics.REJECT_CODES
    assert set(metrics.REJECT_CODES) | {"REJECT_CODE_UNSPECIFIED"} == set(pb.RejectCode.keys())


def test_every_known_series_is_exported_at_zero_before_anything_happened() -> None:
    text = generate_latest(GatewayMetrics(SessionRegistry()).registry).decode()
    expected = [
        *(f'sessions_rejected_total{{code="{c}"}} 0.0' for c in metrics.REJECT_CODES),
        *(f'store_failures_total{{method="{m}"}} 0.0' for m in ("ConnectSupervisor", "PushSandboxLogs")),
        *(f'admission_refusals_total{{reason="{r}"}} 0.0' for r in metrics.ADMISSION_REFUSALS),
        *(f'reconnect_hints_total{{reason="{r}"}} 0.0' for r in metrics.HINT_REASONS),
        *(f'supervisor_lifecycle_records_total{{kind="{k.value}"}} 0.0' for k in LifecycleKind),
        *(f'supervisor_health_changes_total{{state="{s.value}"}} 0.0' for s in HealthState),
    ]
    missing = [line for line in expected if f"openshell_gateway_{line}" not in text]
    assert missing == []


def test_the_database_error_classes_are_exported_at_zero() -> None:
    exposition = generate_latest(GatewayMetrics(SessionRegistry()).registry).decode()
    # Present (not necessarily 0: the counter is the process's, other tests may have raised errors).
    missing = [
        e
        for e in metrics.DB_ERROR_CLASSES
        if f'openshell_gateway_db_errors_total{{error="{e}"}}' not in exposition
    ]
    assert missing == []


def test_each_pre_exported_database_error_class_is_one_the_statement_hook_reports() -> None:
    """The hook reports ``type(context.sqlalchemy_exception).__name__``: SQLAlchemy's wrapper of the
    driver's PEP 249 exception (the one of the same name), or TimeoutError for a statement timed out.
    Each name is checked by wrapping that driver exception (sqlite3's) as SQLAlchemy does, and two of
    them by failing real statements through the hook."""
    wrapped_classes = [name for name in metrics.DB_ERROR_CLASSES if name != "TimeoutError"]
    for name in wrapped_classes:
        wrapped = DBAPIError.instance("SELECT 1", None, getattr(sqlite3, name)("x"), sqlite3.Error)
        assert type(wrapped).__name__ == name
    assert "TimeoutError" in metrics.DB_ERROR_CLASSES  # the hook's own name for a timed-out statement

    reported: list[str] = []

    async def fail_statements(url: str) -> None:
        engine = db.create_engine(url)
        try:
            async with engine.connect() as conn:
                with contextlib.suppress(OperationalError):
                    await conn.execute(text("SELECT * FROM no_such_table"))
            async with engine.begin() as conn:
                await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
                await conn.execute(text("INSERT INTO t VALUES (1)"))
                with contextlib.suppress(IntegrityError):
                    await conn.execute(text("INSERT INTO t VALUES (1)"))
        finally:
            await engine.dispose()

    db.observe_statements(done=lambda _sql, _s: None, failed=reported.append)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(fail_statements(f"sqlite+aiosqlite:///{Path(tmp) / 'errors.db'}"))
    finally:
        GatewayMetrics(SessionRegistry())  # the metrics' observer back for the tests after this one
    assert reported == ["OperationalError", "IntegrityError"]
    assert set(reported) <= set(metrics.DB_ERROR_CLASSES)
