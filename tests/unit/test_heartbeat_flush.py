"""The heartbeat flush's write (``SandboxStore.record_heartbeats``) on a real SQLite store: one
transaction, in statements of at most ``HEARTBEAT_CHECK_CHUNK`` rows (each statement's parameters
are processed on the event loop: one statement for thousands of rows stalled every session's
heartbeat answer for as long, issue 22), with the same rules across chunk boundaries: a beat is
written only while the row names its session and claim, and the fenced ones are returned."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event

from gateway.store import Database, SandboxStore
from gateway.store.sandboxes import HEARTBEAT_CHECK_CHUNK
from tests.support.gateway import gateway_config

SANDBOXES = 2 * HEARTBEAT_CHECK_CHUNK + 57


async def test_a_flush_of_many_is_one_transaction_of_bounded_statements(tmp_path: Path) -> None:
    db = await Database.open(gateway_config(tmp_path).database.url)
    try:
        sandboxes = SandboxStore(db)
        opened = datetime.now(UTC) - timedelta(minutes=1)
        ids = [f"sb-{i:04d}" for i in range(SANDBOXES)]
        epochs: dict[str, int] = {}
        for sandbox_id in ids:
            await sandboxes.ensure(sandbox_id)
            epoch = await sandboxes.mark_connected(
                sandbox_id,
                instance_id="i",
                session_id=f"s-{sandbox_id}",
                journal_epoch="e",
                owner="here",
                at=opened,
            )
            assert epoch is not None
            epochs[sandbox_id] = epoch
        # Claimed since by newer sessions, one in each chunk and one on a chunk's edge: fenced.
        taken = {ids[0], ids[HEARTBEAT_CHECK_CHUNK - 1], ids[HEARTBEAT_CHECK_CHUNK], ids[-1]}
        for sandbox_id in taken:
            await sandboxes.mark_connected(
                sandbox_id,
                instance_id="i",
                session_id="elsewhere",
                journal_epoch="e",
                owner="there",
                at=opened,
            )
        at = datetime.now(UTC).replace(microsecond=0)
        beats = {sandbox_id: at + timedelta(seconds=i % 7) for i, sandbox_id in enumerate(ids)}
        statements: list[tuple[str, int]] = []
        commits: list[int] = []

        def executed(*args: Any) -> None:
            # (conn, cursor, statement, parameters, context, executemany)
            statement, parameters, many = args[2], args[3], args[5]
            statements.append((statement.split(maxsplit=1)[0].upper(), len(parameters) if many else 1))

        sync_engine = db.engine.sync_engine
        event.listen(sync_engine, "before_cursor_execute", executed)
        event.listen(sync_engine, "commit", lambda conn: commits.append(1))
        try:
            fenced = await sandboxes.record_heartbeats(
                beats, sessions={sid: f"s-{sid}" for sid in ids}, epochs=epochs
            )
        finally:
            event.remove(sync_engine, "before_cursor_execute", executed)
        assert fenced == taken
        assert len(commits) == 1, "one transaction"
        updates = [rows for kind, rows in statements if kind == "UPDATE"]
        assert sum(updates) == SANDBOXES
        assert max(updates) <= HEARTBEAT_CHECK_CHUNK, f"statements of {updates} rows"
        for sandbox_id in ids:
            row = await sandboxes.get(sandbox_id)
            assert row is not None
            if sandbox_id in taken:
                assert row.last_heartbeat_at == opened, f"{sandbox_id}: another session's row was written"
            else:
                assert row.last_heartbeat_at == beats[sandbox_id], sandbox_id
        # Nothing fenced (every row written, a count SQLite reports): no claim is read back.
        statements.clear()
        event.listen(sync_engine, "before_cursor_execute", executed)
        try:
            kept = [sid for sid in ids if sid not in taken]
            fenced = await sandboxes.record_heartbeats(
                {sid: at for sid in kept}, sessions={sid: f"s-{sid}" for sid in kept}, epochs=epochs
            )
        finally:
            event.remove(sync_engine, "before_cursor_execute", executed)
        assert fenced == set()
        assert [kind for kind, _ in statements if kind != "UPDATE"] == [], statements
    finally:
        await db.close()
