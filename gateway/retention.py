"""The retention task: every ``retention.interval_s``, old events go, in small batches.

One run measures the table (rows, and the size the ``max_bytes`` bound counts), works out the
cutoffs (an age for log and health rows, an optional longer one for lifecycle and gap records, and
the newest id that does not fit in ``max_bytes``), then deletes what is due batch by batch
(:class:`gateway.store.retention.EventRetention`: at most ``batch_size`` rows a statement, each its
own transaction, ``pause_s`` between two), and logs what it did at info level with its counts.

It runs on every replica that has it enabled, not on a leader: there is a leader only with the
Kubernetes driver, and retention must run without it too. Running on several replicas is safe: a
batch deletes by primary key rows that are due whoever deletes them, the newest row of each journal
is kept by all of them, and two replicas racing over the same batch cost each other one batch's row
locks at most. To spare the duplicate work, set ``retention.enabled: false`` on all replicas but
some.

A failed run (the database away, or an unexpected error: logged with its traceback) is logged and
counted; the next one comes an interval later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

from gateway.config import RetentionSettings
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimitedLog
from gateway.store.db import StoreError, utcnow
from gateway.store.retention import Cutoffs, EventRetention

log = logging.getLogger(__name__)

#: The first run comes this long after the start at most (a restart should not delay retention by
#: a whole interval, nor run it in the middle of the start's reconnect storm).
FIRST_RUN_DELAY_S = 30.0


@dataclass(slots=True)
class RunResult:
    deleted: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    #: The longest one batch's delete held the database (its transaction), in seconds.
    longest_batch_s: float = 0.0
    rows_before: int = 0
    #: None: not measured (no ``max_bytes``).
    bulk_bytes_before: int | None = None

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


class Retention:
    """Owns nothing but its loop (:meth:`run`, started by the gateway's task set); :meth:`run_once`
    is one run, for tests and for the loop."""

    def __init__(
        self, settings: RetentionSettings, store: EventRetention, *, metrics: GatewayMetrics | None = None
    ) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics

    async def run(self) -> None:
        await asyncio.sleep(min(self._settings.interval_s, FIRST_RUN_DELAY_S))
        # An unexpected error, with its traceback: once a minute per type (the interval may be short).
        crashes = RateLimitedLog(log, concern="retention-error")
        try:
            while True:
                try:
                    await self.run_once()
                except StoreError as exc:
                    log.warning("retention run failed, the next in %.0fs: %s", self._settings.interval_s, exc)
                    self._count_failure()
                except Exception as exc:  # a defect must not end retention for the process's life
                    crashes.log(
                        logging.ERROR,
                        type(exc).__qualname__,
                        f"retention run failed unexpectedly, the next in {self._settings.interval_s:.0f}s",
                        exc_info=exc,
                    )
                    self._count_failure()
                await asyncio.sleep(self._settings.interval_s)
        finally:
            crashes.close()

    def _count_failure(self) -> None:
        if self._metrics is not None:
            self._metrics.background_write_failures.labels("retention").inc()

    async def cutoffs(self, bulk_bytes: int | None) -> Cutoffs:
        s = self._settings
        now = utcnow()
        through = None
        if s.max_bytes is not None and bulk_bytes is not None and bulk_bytes > s.max_bytes:
            through = await self._store.size_cutoff(s.max_bytes)
        return Cutoffs(
            bulk_before=now - timedelta(seconds=s.max_age_s) if s.max_age_s is not None else None,
            bulk_through_id=through,
            records_before=(
                now - timedelta(seconds=s.lifecycle_max_age_s) if s.lifecycle_max_age_s is not None else None
            ),
        )

    async def run_once(self) -> RunResult:
        s = self._settings
        started = time.monotonic()
        result = RunResult()
        totals = await self._store.totals(with_bytes=s.max_bytes is not None)
        result.rows_before, result.bulk_bytes_before = totals.rows, totals.bulk_bytes
        cutoffs = await self.cutoffs(totals.bulk_bytes)
        after = 0
        while True:
            batch = await self._store.next_batch(after, cutoffs, batch_size=s.batch_size)
            after = batch.next_after
            if batch.ids:
                began = time.monotonic()
                deleted = await self._store.delete(batch.ids)
                held = time.monotonic() - began
                result.deleted.update(deleted)
                result.batches += 1
                result.longest_batch_s = max(result.longest_batch_s, held)
                if self._metrics is not None:
                    self._metrics.retention_batch_seconds.observe(held)
                    for kind, n in deleted.items():
                        self._metrics.retention_deleted.labels(kind).inc(n)
            if batch.done:
                break
            # Writers (SQLite's one write lock; PostgreSQL's I/O) get the database in between.
            await asyncio.sleep(s.pause_s)
        elapsed = time.monotonic() - started
        if self._metrics is not None:
            self._metrics.retention_run_seconds.set(elapsed)
            self._metrics.retention_last_run.set(time.time())
            # An estimate (PostgreSQL without max_bytes) may be below the rows this run deleted.
            self._metrics.retained_events.set(max(0, totals.rows - result.total))
            if totals.bulk_bytes is not None:
                self._metrics.retained_bytes.set(totals.bulk_bytes)
        log.info(
            "retention run: %d events deleted in %d batches (%.2fs, longest batch %.3fs), %s%d were stored",
            result.total,
            result.batches,
            elapsed,
            result.longest_batch_s,
            "" if totals.exact else "about ",
            totals.rows,
            extra={
                "deleted": dict(result.deleted),
                "batches": result.batches,
                "seconds": round(elapsed, 3),
                "longest_batch_s": round(result.longest_batch_s, 4),
                "rows_before": totals.rows,
                "bulk_bytes_before": totals.bulk_bytes,
            },
        )
        return result


__all__ = ["FIRST_RUN_DELAY_S", "Retention", "RunResult"]
