"""Export of stored events as OTLP log records (issue 23 point 3, ``otlp_logs:``).

The source is the ``events`` table itself, tailed by id: what the gateway exports is what it
stored (and acknowledged), from every replica's sessions and the upstream paths alike, and a
position in the table survives a restart. One replica at a time exports, the holder of the
export's row (:mod:`gateway.store.export_cursor`), which is also where the position is stored;
another replica takes over from that position when the holder's lease lapses.

Each round reads at most ``batch_size`` events above the highest id read so far, converts those of
``kinds`` into the OpenTelemetry SDK's log records (:func:`log_record`) and hands them to the SDK's
OTLP/gRPC exporter, in a thread (the exporter blocks). Only after the receiver accepted them does
the position move; a failed export is tried again with exponential backoff and jitter
(tenacity), the lease renewed at each attempt (at the position from before the page: never past
a record the receiver has not accepted), so a receiver down for an hour loses nothing: the events
wait in the table (retention permitting: see docs/otlp-logs.md), and the lag gauge counts them
through the outage. The warning about a failed export gives the SDK exporter's reason (its own log
lines, one per attempt, are taken in the exporting thread: :class:`_SdkErrors`). An unexpected
error does not end the task: it is logged with its traceback (rate-limited) and the loop goes on.

**Ids are not committed in order on PostgreSQL**: a batch's transaction draws its ids, then may
commit after a later batch's. An id missing between two ids read is kept as a *hole* and looked
for again at every round for ``settle_s``; found, it is exported then; still missing after that,
it is taken for a rolled-back insert or a refused duplicate (``ON CONFLICT DO NOTHING`` spends ids
too) and forgotten. The stored position is the id below the oldest hole, so a restart reads the
holes' range again, and a tail that starts from the stored position (a restart, a takeover, a
database error) takes the ids between it and the first id it reads for holes too: a transaction
still open at the handover is found when it commits. Delivery is **at least once** (a record can
arrive twice after a restart, a takeover or an export whose answer was lost). Every record carries
``openshell.sandbox_id``, ``openshell.journal_epoch`` and ``openshell.sequence``, which identify
it: a receiver that must not see repeats drops them on that key. Memory is bounded by
``batch_size`` records and ``max_pending_ids`` holes: of a gap wider than that only the newest
``max_pending_ids`` ids are registered, and past it the oldest holes are given up at once, with a
warning and the count.

Gap records are exported as records of their own (``event.name`` ``openshell.gap``, severity WARN)
with the gap's reason and its range (``openshell.gap.first_sequence``/``last_sequence``, the
records and bytes dropped): a receiver tells lost lines (a gap record covering their sequences)
from silence (no record, no gap), as long as every kind is exported: a kind left out of
``kinds`` (``health`` by default) leaves sequence holes no gap record covers (docs/otlp-logs.md,
"Loss or silence"). The SDK's log record carries everything needed (body, times,
severity, attributes, event name), so the protobuf encoding is the SDK exporter's, not ours.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, select
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from gateway.config import OtlpLogsSettings
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimitedLog
from gateway.store.db import Database, StoreError, store_errors
from gateway.store.export_cursor import ExportCursorStore
from gateway.store.schema import events as events_table
from openshell_wire import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk._logs import ReadableLogRecord
    from opentelemetry.sdk._logs.export import LogRecordExporter

log = logging.getLogger(__name__)

SCOPE = "openshell.gateway.events"
#: Missing ids looked for in one statement (well under both drivers' bound on parameters).
HOLES_PER_QUERY = 5000
#: The SDK exporter's logger: one line per failed attempt, which the export takes for its reason.
SDK_LOGGER = "opentelemetry.exporter.otlp.proto.grpc.exporter"


@dataclass(frozen=True, slots=True)
class Row:
    """One stored event as the export reads it."""

    id: int
    sandbox_id: str
    generation: int
    journal_epoch: str
    sequence: int
    timestamp_ms: int
    kind: str
    stream: str | None
    message: str
    data: dict[str, Any] | None
    received_at: datetime


_COLUMNS = (
    events_table.c.id,
    events_table.c.sandbox_id,
    events_table.c.generation,
    events_table.c.journal_epoch,
    events_table.c.sequence,
    events_table.c.timestamp_ms,
    events_table.c.kind,
    events_table.c.stream,
    events_table.c.message,
    events_table.c.data,
    events_table.c.received_at,
)


def _row(r: Any) -> Row:
    return Row(
        id=int(r.id),
        sandbox_id=r.sandbox_id,
        generation=int(r.generation),
        journal_epoch=r.journal_epoch,
        sequence=int(r.sequence),
        timestamp_ms=int(r.timestamp_ms),
        kind=r.kind,
        stream=r.stream,
        message=r.message,
        data=json.loads(r.data) if r.data is not None else None,
        received_at=r.received_at,
    )


class LostExport(Exception):
    """Another replica holds the export now."""


class ExportFailed(Exception):
    """The receiver did not accept a batch (retried)."""


# -- conversion --------------------------------------------------------------------------------

#: A structured line's level -> (SeverityNumber name, severity text).
_LEVELS = {
    "trace": ("TRACE", "TRACE"),
    "debug": ("DEBUG", "DEBUG"),
    "info": ("INFO", "INFO"),
    "ocsf": ("INFO", "INFO"),
    "warn": ("WARN", "WARN"),
    "error": ("ERROR", "ERROR"),
}


def _severity(row: Row) -> tuple[str, str]:
    data = row.data or {}
    if row.kind == "log":
        level = data.get("level")
        if isinstance(level, str) and level in _LEVELS:
            return _LEVELS[level]
        # As the supervisor's own OTLP export ranks captured lines (supervisor/telemetry.py).
        return ("WARN", "WARN") if row.stream == "stderr" else ("INFO", "INFO")
    if row.kind == "gap":
        return ("WARN", "WARN")
    if row.kind == "health" and data.get("state") != "healthy":
        return ("WARN", "WARN")
    return ("INFO", "INFO")


def attributes(row: Row) -> dict[str, str | int | bool]:
    """The record's attributes: what identifies it and what a receiver filters on."""
    out: dict[str, str | int | bool] = {
        "openshell.sandbox_id": row.sandbox_id,
        "openshell.generation": row.generation,
        "openshell.journal_epoch": row.journal_epoch,
        "openshell.sequence": row.sequence,
        "openshell.kind": row.kind,
        "openshell.event_id": row.id,
    }
    data = row.data or {}
    if row.kind == "log":
        if row.stream:
            out["log.iostream"] = row.stream
        if data.get("continued"):
            out["openshell.continued"] = True
        for key in ("level", "target"):
            if isinstance(data.get(key), str):
                out[f"openshell.{key}"] = data[key]
        fields = data.get("fields")
        if isinstance(fields, dict):
            for key, value in fields.items():
                out[f"openshell.field.{key}"] = str(value)
    elif row.kind == "gap":
        out["openshell.gap.reason"] = str(data.get("reason", ""))
        for key in ("first_sequence", "last_sequence", "dropped_records", "dropped_bytes"):
            value = data.get(key)
            if isinstance(value, int):
                out[f"openshell.gap.{key}"] = value
        if data.get("detail"):
            out["openshell.gap.detail"] = str(data["detail"])
    elif row.kind == "lifecycle":
        out["openshell.lifecycle.kind"] = str(data.get("kind", ""))
        for key in ("pid", "exit_code", "signal", "duration_ms"):
            value = data.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                out[f"openshell.lifecycle.{key}"] = value
        if data.get("instance_id"):
            out["openshell.instance_id"] = str(data["instance_id"])
    elif row.kind == "health":
        out["openshell.health.state"] = str(data.get("state", ""))
    return out


def log_record(row: Row, *, resource: Any, scope: Any) -> ReadableLogRecord:
    """The SDK's log record for one stored event."""
    from opentelemetry._logs import LogRecord, SeverityNumber  # noqa: PLC0415
    from opentelemetry.sdk._logs import ReadableLogRecord  # noqa: PLC0415

    received_ns = int(row.received_at.timestamp()) * 1_000_000_000 + row.received_at.microsecond * 1000
    number, text = _severity(row)
    record = LogRecord(
        # A record without its own time (0: the upstream path may send none) is placed at receipt.
        timestamp=row.timestamp_ms * 1_000_000 if row.timestamp_ms > 0 else received_ns,
        observed_timestamp=received_ns,
        severity_number=SeverityNumber[number],
        severity_text=text,
        body=row.message,
        attributes=attributes(row),
        event_name=f"openshell.{row.kind}",
    )
    return ReadableLogRecord(record, resource=resource, instrumentation_scope=scope)


# -- the exporter ------------------------------------------------------------------------------


@dataclass(slots=True)
class Tail:
    """Where the export stands in the table (see the module docstring)."""

    #: The highest id read so far.
    top: int
    #: Ids missing below ``top`` (not committed yet, or never), with when they were first missed.
    #: A tail starting from the stored position takes the ids between it and the first id read
    #: for holes too: a transaction still open when the export changed hands (a takeover, a
    #: restart, a database error) commits there.
    holes: dict[int, float]

    def settled(self) -> int:
        """Every id at or below this has been exported or given up: the position to store."""
        return min(self.holes) - 1 if self.holes else self.top


class _SdkErrors(logging.Filter):
    """Takes what the SDK exporter logs while it exports for us, in that thread: the last line is
    why the export failed (UNAVAILABLE, UNAUTHENTICATED, a TLS error...), which our own warning
    gives, rate-limited. The SDK's lines themselves are dropped (one per attempt); other threads'
    pass untouched."""

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(self._local, "capturing", False):
            return True
        args = record.args
        if isinstance(args, tuple) and len(args) == 4 and hasattr(args[2], "name"):
            # "Failed to export %s to %s, error code: %s, error details: %s"
            self._local.last = f"{args[2].name}: {args[3]}"
        else:
            self._local.last = record.getMessage()
        return False

    def export(self, exporter: LogRecordExporter, records: Sequence[ReadableLogRecord]) -> tuple[bool, str]:
        """Export (blocking: run in a thread); whether the receiver accepted, and why not."""
        self._local.capturing, self._local.last = True, None
        try:
            result = exporter.export(records)
        except Exception as exc:  # a failed export whatever the cause: retried
            return False, f"{type(exc).__name__}: {exc}"
        finally:
            self._local.capturing = False
        if getattr(result, "name", "") == "SUCCESS":
            return True, ""
        return False, self._local.last or "the exporter gave no reason"


_SDK_ERRORS = _SdkErrors()


def _capture_sdk_errors() -> None:
    logger = logging.getLogger(SDK_LOGGER)
    if _SDK_ERRORS not in logger.filters:
        # First: the SDK's own duplicate filter would otherwise hide a repeated reason.
        logger.filters.insert(0, _SDK_ERRORS)
    if not logger.isEnabledFor(logging.ERROR):
        logger.setLevel(logging.ERROR)


class OtlpLogExport:
    """The exporter task's loop (:meth:`run`); ``sender`` replaces the SDK's exporter in tests."""

    def __init__(
        self,
        settings: OtlpLogsSettings,
        db: Database,
        *,
        replica: str,
        metrics: GatewayMetrics | None = None,
        sender: LogRecordExporter | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._replica = replica
        self._metrics = metrics
        self._cursor = ExportCursorStore(db)
        self._sender = sender
        self._kinds = set(settings.kinds)
        self._resource: Any = None
        self._scope: Any = None
        #: An unexpected error of the loop, logged with its traceback (once a minute per type).
        self._crash_log = RateLimitedLog(log, concern="otlp-export-error")

    def _exporter(self) -> LogRecordExporter:
        if self._sender is None:
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (  # noqa: PLC0415
                OTLPLogExporter,
            )

            s = self._settings
            insecure = s.insecure if s.insecure is not None else s.endpoint.startswith("http://")
            self._sender = OTLPLogExporter(
                endpoint=s.endpoint, insecure=insecure, headers=dict(s.headers), timeout=s.timeout_s
            )
        return self._sender

    async def run(self) -> None:
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope  # noqa: PLC0415

        s = self._settings
        self._resource = Resource.create(
            {
                "service.name": s.service_name,
                "service.instance.id": self._replica,
                "service.version": __version__,
            }
        )
        self._scope = InstrumentationScope(SCOPE, __version__)
        # The SDK logs an ERROR at every failed attempt; ours (rate-limited, with the count and
        # the SDK's reason) and the failures metric replace it.
        _capture_sdk_errors()
        exporter = self._exporter()
        try:
            while True:
                try:
                    await self._claim_and_export(exporter)
                except Exception as exc:  # a defect must not end the export for good
                    self._crash_log.log(
                        logging.ERROR,
                        type(exc).__qualname__,
                        f"OTLP log export: unexpected error, going on in {s.max_backoff_s:g}s",
                        exc_info=exc,
                    )
                    # Within the lease (max_backoff_s is at most half of it): the row stays ours.
                    await asyncio.sleep(s.max_backoff_s)
        finally:
            self._crash_log.close()
            self._set_holding(False)
            # Interrupts a retry the SDK exporter may be sleeping in (its thread ends soon after).
            exporter.shutdown()  # type: ignore[no-untyped-call]

    async def _claim_and_export(self, exporter: LogRecordExporter) -> None:
        """One turn: claim the export, then export until it is lost or the database fails."""
        s = self._settings
        try:
            position = await self._cursor.claim(self._replica, lease_s=s.lease_s)
        except StoreError as exc:
            log.warning("OTLP log export: cannot claim the export: %s", exc)
            position = None
        self._set_holding(position is not None)
        if position is None:
            await asyncio.sleep(s.lease_s / 3)
            return
        log.info("OTLP log export: this replica exports, from event id %d", position)
        try:
            await self._export_from(Tail(top=position, holes={}), exporter)
        except LostExport:
            log.info("OTLP log export: another replica took the export over")
        except StoreError as exc:
            log.warning("OTLP log export paused: %s", exc)
            await asyncio.sleep(s.poll_interval_s)

    async def release(self) -> None:
        """At shutdown, after the task ended: let another replica take over at once (nothing
        happens unless this replica holds the export)."""
        await self._cursor.release(self._replica)

    def _set_holding(self, holding: bool) -> None:
        if self._metrics is not None:
            self._metrics.otlp_exporting.set(1 if holding else 0)
            if not holding:
                self._metrics.otlp_lag.set(0)

    def _set_lag(self, newest: int | None, position: int) -> None:
        if self._metrics is not None and newest is not None:
            self._metrics.otlp_lag.set(max(0, newest - position))

    async def _newest(self) -> int | None:
        with store_errors("cannot read the newest event id"):
            async with self._db.engine.connect() as conn:
                newest = await conn.scalar(select(func.max(events_table.c.id)))
        return None if newest is None else int(newest)

    async def _read(self, tail: Tail) -> tuple[list[Row], int | None]:
        """The next page above ``tail.top``, the holes that appeared since, and the newest id."""
        s = self._settings
        page = select(*_COLUMNS).where(events_table.c.id > tail.top).order_by(events_table.c.id)
        with store_errors("cannot read events to export"):
            async with self._db.engine.connect() as conn:
                rows = [_row(r) for r in await conn.execute(page.limit(s.batch_size))]
                found: list[Row] = []
                late = select(*_COLUMNS).where(events_table.c.id.in_(bindparam("ids", expanding=True)))
                holes = sorted(tail.holes)
                for at in range(0, len(holes), HOLES_PER_QUERY):
                    chunk = {"ids": holes[at : at + HOLES_PER_QUERY]}
                    found += [_row(r) for r in await conn.execute(late, chunk)]
                newest = await conn.scalar(select(func.max(events_table.c.id)))
        return found + rows, None if newest is None else int(newest)

    async def _export_from(self, tail: Tail, exporter: LogRecordExporter) -> None:
        s = self._settings
        while True:
            # Every id at or below this was accepted by the receiver or given up: taken before this
            # page touches the holes, it is what the lease is renewed at until the receiver accepted
            # the page (after, the holes this page adds or fills could put it inside the page).
            before = tail.settled()
            rows, newest = await self._read(tail)
            now = time.monotonic()
            for row in rows:
                tail.holes.pop(row.id, None)
            page_ids = [r.id for r in rows if r.id > tail.top]
            given_up = self._add_holes(tail, page_ids, now)
            if page_ids:
                tail.top = page_ids[-1]
            given_up += self._forget_old_holes(tail, now)
            if given_up:
                log.warning(
                    "OTLP log export: %d missing event ids given up early (more than max_pending_ids %d "
                    "missing below event id %d: rows deleted, or ids no transaction committed)",
                    given_up,
                    s.max_pending_ids,
                    tail.top,
                    extra={"given_up": given_up, "below_event_id": tail.top},
                )
            self._set_lag(newest, before)
            chosen = [r for r in rows if r.kind in self._kinds]
            if chosen:
                await self._send(chosen, exporter, renew_at=before)
            if not await self._cursor.advance(self._replica, tail.settled()):
                raise LostExport
            self._set_lag(newest, tail.settled())
            if len(page_ids) < s.batch_size:
                await asyncio.sleep(s.poll_interval_s)

    def _add_holes(self, tail: Tail, page_ids: list[int], now: float) -> int:
        """Takes the ids missing between ``tail.top`` and the page's ids for holes, the newest
        ``max_pending_ids`` of them at most (a gap of millions of ids, rows deleted by retention,
        costs no memory); returns how many were given up at once."""
        gaps: list[tuple[int, int]] = []
        expected = tail.top + 1
        for event_id in page_ids:
            if event_id > expected:
                gaps.append((expected, event_id))
            expected = event_id + 1
        room, given_up = self._settings.max_pending_ids, 0
        for low, high in reversed(gaps):
            taken = min(room, high - low)
            tail.holes.update(dict.fromkeys(range(high - taken, high), now))
            given_up += high - low - taken
            room -= taken
        return given_up

    def _forget_old_holes(self, tail: Tail, now: float) -> int:
        """Drops the holes looked for longer than ``settle_s``, then the oldest past
        ``max_pending_ids``; returns how many of the latter."""
        s = self._settings
        for hole, since in list(tail.holes.items()):
            if now - since > s.settle_s:
                del tail.holes[hole]
        excess = len(tail.holes) - s.max_pending_ids
        if excess > 0:
            for hole in sorted(tail.holes)[:excess]:
                del tail.holes[hole]
        return max(0, excess)

    async def _send(self, rows: Sequence[Row], exporter: LogRecordExporter, *, renew_at: int) -> None:
        s = self._settings
        records = [log_record(r, resource=self._resource, scope=self._scope) for r in rows]
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(ExportFailed),
            wait=wait_exponential_jitter(multiplier=0.5, max=s.max_backoff_s),
            reraise=True,
        )
        failures = 0
        async for attempt in retrying:
            with attempt:
                if failures:
                    # Renewed at each retry: a long outage of the receiver keeps the export here.
                    if not await self._cursor.advance(self._replica, renew_at):
                        raise LostExport
                    # What waits, kept current through the outage (the failing-export alert reads it).
                    self._set_lag(await self._newest(), renew_at)
                accepted, reason = await asyncio.to_thread(_SDK_ERRORS.export, exporter, records)
                if not accepted:
                    failures += 1
                    if self._metrics is not None:
                        self._metrics.otlp_failures.inc()
                    if failures == 1 or failures % 10 == 0:
                        log.warning(
                            "OTLP log export to %s failed (%d times in a row): %s; retrying with backoff",
                            s.endpoint,
                            failures,
                            reason,
                            extra={"endpoint": s.endpoint, "failures": failures, "reason": reason},
                        )
                    raise ExportFailed
        if failures:
            log.info("OTLP log export to %s works again after %d failures", s.endpoint, failures)
        if self._metrics is not None:
            for row in rows:
                self._metrics.otlp_exported.labels(row.kind).inc()


__all__ = ["OtlpLogExport", "Row", "attributes", "log_record"]
