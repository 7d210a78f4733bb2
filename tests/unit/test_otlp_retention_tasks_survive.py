"""Background tasks outlive an unexpected error (issue 23 point 3, review item 6): the retention
task (gateway.retention) logs it with its traceback and runs again an interval later; before, any
error but a StoreError ended the task for the life of the process. (The OTLP export's loop:
tests/integration/test_otlp_logs.py::test_the_export_survives_an_unexpected_error.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.config import RetentionSettings
from gateway.metrics import GatewayMetrics
from gateway.retention import Retention
from gateway.sessions import SessionRegistry
from gateway.store import Database
from gateway.store.retention import EventRetention, Totals
from tests.support.waiting import until


class FailsOnce(EventRetention):
    """The real store, whose first measurement fails with an error no one planned for."""

    calls = 0

    async def totals(self, *, with_bytes: bool) -> Totals:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("injected")
        return await super().totals(with_bytes=with_bytes)


async def test_retention_runs_again_after_an_unexpected_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = await Database.open(f"sqlite:///{tmp_path}/g.db")
    metrics = GatewayMetrics(SessionRegistry())
    store = FailsOnce(db)
    task = asyncio.create_task(Retention(RetentionSettings(interval_s=0.2), store, metrics=metrics).run())
    try:
        await until(
            lambda: (
                (
                    metrics.registry.get_sample_value(
                        "openshell_gateway_retention_last_run_timestamp_seconds"
                    )
                    or 0
                )
                > 0
            ),
            within=10,
            what="a retention run after the failed one",
        )
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await db.close()
    failed = [r for r in caplog.records if r.name == "gateway.retention" and r.exc_info]
    assert failed and "injected" in str(failed[0].exc_info[1])
