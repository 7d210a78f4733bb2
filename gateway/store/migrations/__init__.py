"""Alembic migrations of the gateway's database.

This directory is Alembic's script location. It is a package (as is ``versions``) so that a
normal, non-editable install ships the migration scripts with the gateway; Alembic itself loads
them by path, not by import. ``gateway.store.db.migrate`` drives them programmatically.
"""
