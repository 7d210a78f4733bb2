"""The keys the gateway signs sandbox tokens with (table ``signing_keys``), shared by every replica.

A key signs until ``sign_until`` and verifies until ``verify_until`` (by then every token it signed
has expired); past that it is deleted. Replicas make keys independently: each insert has a fresh
random kid, so two replicas that rotate at the same moment both succeed, and whichever key is
newest signs (see :mod:`gateway.auth.sandbox_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Row

from gateway.store.db import Database, store_errors
from gateway.store.schema import signing_keys as keys_table


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    algorithm: str
    private_pem: str
    public_pem: str
    created_at: datetime
    sign_until: datetime
    verify_until: datetime


def _key(row: Row[Any]) -> SigningKey:
    return SigningKey(
        kid=row.kid,
        algorithm=row.algorithm,
        private_pem=row.private_pem,
        public_pem=row.public_pem,
        created_at=row.created_at,
        sign_until=row.sign_until,
        verify_until=row.verify_until,
    )


class SigningKeyStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def usable(self, *, now: datetime) -> list[SigningKey]:
        """Every key that still verifies at ``now``, newest first."""
        with store_errors("cannot read the signing keys"):
            async with self._db.engine.connect() as conn:
                rows = (
                    await conn.execute(
                        select(keys_table)
                        .where(keys_table.c.verify_until > now)
                        .order_by(keys_table.c.created_at.desc(), keys_table.c.kid.desc())
                    )
                ).all()
        return [_key(row) for row in rows]

    async def get(self, kid: str) -> SigningKey | None:
        """The key ``kid``, or None (a primary-key read: what a token
        naming a kid the cached ring lacks costs)."""
        with store_errors("cannot read a signing key"):
            async with self._db.engine.connect() as conn:
                row = (await conn.execute(select(keys_table).where(keys_table.c.kid == kid))).first()
        if row is None:
            return None
        return _key(row)

    async def add(self, key: SigningKey) -> None:
        with store_errors("cannot store a new signing key"):
            async with self._db.begin() as conn:
                await conn.execute(
                    insert(keys_table).values(
                        kid=key.kid,
                        algorithm=key.algorithm,
                        private_pem=key.private_pem,
                        public_pem=key.public_pem,
                        created_at=key.created_at,
                        sign_until=key.sign_until,
                        verify_until=key.verify_until,
                    )
                )

    async def delete_expired(self, *, now: datetime) -> int:
        """Delete the keys that verify nothing any more; returns how many."""
        with store_errors("cannot delete expired signing keys"):
            async with self._db.begin() as conn:
                result = await conn.execute(delete(keys_table).where(keys_table.c.verify_until <= now))
        return int(result.rowcount or 0)
