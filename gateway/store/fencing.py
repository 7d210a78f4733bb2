"""Fencing: a session's writes land only while its claim on the sandbox is the newest.

A hello claims the sandbox row in one statement (``SandboxStore.mark_connected``): it raises
``owner_epoch`` by one and names this replica (and its run) as the owner. Every later write made
on behalf of that session (its event batches, its heartbeat flushes, its disconnection, its
command results) checks, in its own transaction, that the row's ``owner_epoch`` is still the one
its claim returned. A replica that was paused (SIGSTOP, a long GC, a partition) while the
supervisor reconnected to another replica therefore cannot write over the newer session when it
wakes: its write finds a higher epoch, raises :class:`Fenced`, and nothing of it is committed.

The epoch is the database's, not a clock's: two replicas' wall clocks never decide who owns a
sandbox.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store.schema import sandboxes as sandboxes_table

#: What was refused (the ``kind`` label of ``openshell_gateway_fenced_writes_total``).
#: ``disconnect_superseded`` stands apart: the old session's disconnection refused because its
#: supervisor already reconnected elsewhere, the normal end of a session that moved (every rollout,
#: every replica lost), not a paused owner writing over a newer one; the others are worth an alert.
FencedKind = Literal["events", "heartbeats", "disconnect_superseded", "command_result", "delivery"]


class Fenced(Exception):
    """A write on behalf of a session whose claim on the sandbox is no longer the newest: nothing
    of it was committed. Not a :class:`~gateway.store.db.StoreError`: retrying cannot help, and
    the database is fine; the session must end (the supervisor reconnects to the owner's
    replica or claims the sandbox anew)."""

    def __init__(
        self,
        sandbox_id: str,
        *,
        kind: FencedKind,
        epoch: int,
        current_epoch: int | None,
        owner: str | None,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.kind = kind
        self.epoch = epoch
        self.current_epoch = current_epoch
        self.owner = owner
        if current_epoch is None:
            detail = f"sandbox {sandbox_id} no longer exists"
        else:
            detail = (
                f"sandbox {sandbox_id} is owned by a newer session (epoch {current_epoch}) "
                f"on replica {owner or 'unknown'}"
            )
        super().__init__(f"{detail}; this session's claim (epoch {epoch}) may not write its {kind}")


async def check_owner(conn: AsyncConnection, sandbox_id: str, owner_epoch: int, *, kind: FencedKind) -> None:
    """Raise :class:`Fenced` unless the sandbox's row still carries ``owner_epoch``.

    On PostgreSQL the row is locked FOR KEY SHARE until the transaction ends. A claim takes the
    row FOR UPDATE before raising the epoch (``SandboxStore.mark_connected``), which conflicts with
    KEY SHARE: a newer claim waits for this transaction to commit, and this read waits for an
    uncommitted claim and then reads its epoch, so this write either lands before the claim or is
    refused. KEY SHARE, not a stronger lock: the heartbeat flush updates every held sandbox's row
    in one transaction (FOR NO KEY UPDATE on each), and a fence that conflicted with it made every
    batch wait for the whole flush; KEY SHARE does not conflict with it, nor with another batch's.
    SQLite has one writer at a time: call this after the transaction's first write, which took
    the lock."""
    c = sandboxes_table.c
    row = (
        await conn.execute(
            select(c.owner_epoch, c.owner)
            .where(c.id == sandbox_id)
            .with_for_update(read=True, key_share=True)
        )
    ).first()
    if row is None or int(row.owner_epoch) != owner_epoch:
        raise Fenced(
            sandbox_id,
            kind=kind,
            epoch=owner_epoch,
            current_epoch=None if row is None else int(row.owner_epoch),
            owner=None if row is None else row.owner,
        )


__all__ = ["Fenced", "FencedKind", "check_owner"]
