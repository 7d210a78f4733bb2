"""Alembic environment for the gateway's store.

Two ways in. The gateway migrates programmatically: ``gateway.store.db`` opens an async engine,
and inside ``AsyncConnection.run_sync`` hands the synchronous facade of that connection over in
``config.attributes["connection"]``; we then migrate on it, inside the caller's transaction, so
that aiosqlite and asyncpg work without a second, synchronous driver. From the ``alembic`` command
line (``alembic -c gateway/store/migrations/alembic.ini [-x url=...] ...``) there is no connection,
so we open the URL (``-x url=`` or else ``sqlalchemy.url``) the way the gateway does and run the same
steps on it.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from gateway.store.db import create_engine, migration_transaction
from gateway.store.schema import metadata

config = context.config

if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode lets later revisions copy tables.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone(url: str) -> None:
    engine = create_engine(url)
    try:
        # Under the gateway's migration lock: a hand-run upgrade and a replica's start wait for
        # each other instead of racing on the same revision.
        async with migration_transaction(engine) as conn:
            await conn.run_sync(_run_on)
    finally:
        await engine.dispose()


def _run_offline(url: str) -> None:
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: set sqlalchemy.url in the Alembic config or pass a connection")
    if context.is_offline_mode():
        _run_offline(url)
    else:
        asyncio.run(_run_standalone(url))


_main()
