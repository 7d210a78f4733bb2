"""Idempotent command POSTs (issue 20 follow-up): a POST cut while a replica stops may have stored
the command while the client never got its id; its retry with the same ``Idempotency-Key``
answers that command (200, same id) instead of storing and applying it twice. A different body
under the same key is refused (422) and stores nothing, and a bad key is refused (400). Through
the real HTTP API of an in-process gateway, on SQLite and on a real PostgreSQL, including two
retries racing (one command stored: the unique index settles it)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from gateway.app import Gateway
from tests.support.gateway import gateway_config


@contextlib.asynccontextmanager
async def _gateway(tmp_path: Path, database_url: str | None = None) -> AsyncIterator[Gateway]:
    overrides: dict[str, Any] = {} if database_url is None else {"database": {"url": database_url}}
    gateway = Gateway(gateway_config(tmp_path, overrides))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def test_idempotent_command_posts_on_sqlite(tmp_path: Path) -> None:
    async with _gateway(tmp_path) as gw:
        await _a_retried_command_post_with_its_key_is_stored_once(gw)
        await _racing_retries_with_one_key_store_one_command(gw)


async def test_idempotent_command_posts_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    async with _gateway(tmp_path, pg_url) as gw:
        await _a_retried_command_post_with_its_key_is_stored_once(gw)
        await _racing_retries_with_one_key_store_one_command(gw)


async def _post(
    gw: Gateway, sandbox_id: str, body: object, *, key: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {} if key is None else {"Idempotency-Key": key}
    async with aiohttp.ClientSession() as http:
        url = f"{gw.http_url}/api/v1/sandboxes/{sandbox_id}/commands"
        async with http.post(url, json=body, headers=headers) as resp:
            return resp.status, await resp.json()


async def _ids(gw: Gateway, sandbox_id: str) -> list[str]:
    url = f"{gw.http_url}/api/v1/sandboxes/{sandbox_id}/commands"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        return [c["id"] for c in (await resp.json())["commands"]]


async def _a_retried_command_post_with_its_key_is_stored_once(gw: Gateway) -> None:
    await gw.sandboxes.ensure("idem")
    await gw.sandboxes.ensure("idem-2")
    body = {"kind": "signal", "signal": "SIGUSR1", "expires_in_s": 60}

    status, first = await _post(gw, "idem", body, key="k-1")
    assert status == 201 and first["state"] == "pending"
    status, again = await _post(gw, "idem", dict(body, expires_in_s=60.0), key="k-1")
    assert status == 200, again
    assert again["id"] == first["id"] and again["kind"] == "signal"
    assert await _ids(gw, "idem") == [first["id"]], "stored once"

    # The same key with another request: refused, nothing stored.
    status, doc = await _post(gw, "idem", {"kind": "stop"}, key="k-1")
    assert status == 422 and "Idempotency-Key 'k-1' was already used" in doc["error"], doc
    assert first["id"] in doc["error"]
    assert await _ids(gw, "idem") == [first["id"]]

    # A key is per sandbox; no key stores each POST.
    status, other = await _post(gw, "idem-2", body, key="k-1")
    assert status == 201 and other["id"] != first["id"]
    assert (await _post(gw, "idem-2", body))[0] == 201
    assert (await _post(gw, "idem-2", body))[0] == 201
    assert len(await _ids(gw, "idem-2")) == 3

    # Bad keys: a clear 400, nothing stored.
    for bad in ("has space", "x" * 201, "ключ"):
        status, doc = await _post(gw, "idem", body, key=bad)
        assert status == 400 and "Idempotency-Key must be 1 to 200 visible ASCII" in doc["error"], doc
    assert await _ids(gw, "idem") == [first["id"]]


async def _racing_retries_with_one_key_store_one_command(gw: Gateway) -> None:
    await gw.sandboxes.ensure("race")
    answers = await asyncio.gather(
        *(_post(gw, "race", {"kind": "stop", "grace_ms": 100}, key="same") for _ in range(4))
    )
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200, 200, 200, 201], answers
    assert len({doc["id"] for _, doc in answers}) == 1
    assert await _ids(gw, "race") == [answers[0][1]["id"]]
