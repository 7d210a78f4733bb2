"""The gateway's storage layer: SQLAlchemy Core over SQLite (default) or PostgreSQL.

``Database`` owns the async engine and applies the Alembic migrations; ``SandboxStore`` keeps the
registry of sandboxes and their sessions; ``EventStore`` keeps their journaled events, stored
exactly once in effect. Everything that fails inside comes out as ``StoreError``.
"""

from gateway.store.commands import CommandRow, CommandStore
from gateway.store.db import Database, StoreError, migrate, utcnow
from gateway.store.events import EventNotifier, EventStore, StoredEvent
from gateway.store.sandboxes import SandboxRow, SandboxStore
from gateway.store.schema import UNSEQUENCED_EPOCH

__all__ = [
    "UNSEQUENCED_EPOCH",
    "CommandRow",
    "CommandStore",
    "Database",
    "EventNotifier",
    "EventStore",
    "SandboxRow",
    "SandboxStore",
    "StoreError",
    "StoredEvent",
    "migrate",
    "utcnow",
]
