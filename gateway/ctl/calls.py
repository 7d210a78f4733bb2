"""The HTTP API's requests, as the CLI sends them: one :class:`Api` per command run.

Every answer is the API's own JSON document; a failure is an :class:`ApiCallError` with the
API's sentence and its HTTP status (None when the gateway did not answer at all), which
:mod:`gateway.ctl.exits` turns into the exit status. An id is checked by the gateway's own rule
before it becomes a path segment, so ``../commands`` cannot name another resource.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any

import aiohttp

from gateway.clientauth import ApiClient, Credentials
from openshell_wire.records import sandbox_id_problem

#: One request's deadline (a follow has none once connected, only TCP keepalive:
#: :meth:`ApiClient.stream`).
CALL_TIMEOUT_S = 60.0
#: The page size of the sandbox list (the API's largest).
LIST_PAGE = 1000


class ApiCallError(Exception):
    """The API could not be reached (``status`` None) or refused (its HTTP status and sentence)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def sandbox_path(sandbox_id: str, rest: str = "") -> str:
    problem = sandbox_id_problem(sandbox_id)
    if problem is not None:
        raise ApiCallError(f"sandbox id {sandbox_id!r}: {problem}", 400)
    return f"/sandboxes/{sandbox_id}{rest}"


class Api:
    """The API at ``api_url`` with ``credentials``; ``async with`` it."""

    def __init__(self, api_url: str, credentials: Credentials, *, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.api_url = api_url
        self._client = ApiClient(api_url, credentials, timeout_s=timeout_s)

    async def __aenter__(self) -> Api:
        await self._client.__aenter__()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._client.__aexit__(kind, exc, tb)

    def _unreachable(self, exc: BaseException) -> ApiCallError:
        return ApiCallError(f"cannot reach the gateway API at {self.api_url}: {exc or type(exc).__name__}")

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str | int] | None = None,
    ) -> dict[str, Any]:
        try:
            status, doc = await self._client.request(method, path, json_body=body, params=params)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from None
        if not isinstance(doc, dict):
            raise ApiCallError(f"the API answered HTTP {status} with a non-object", status)
        if status >= 400:
            raise ApiCallError(str(doc.get("error", doc)), status)
        return doc

    async def sandboxes(self) -> list[dict[str, Any]]:
        """Every sandbox the caller may see, page by page in id order."""
        found: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": LIST_PAGE}
            if after is not None:
                params["after"] = after
            doc = await self.call("GET", "/sandboxes", params=params)
            found += doc["sandboxes"]
            after = doc.get("next")
            if not after:
                return found

    async def sandbox(self, sandbox_id: str) -> dict[str, Any]:
        return await self.call("GET", sandbox_path(sandbox_id))

    async def logs(self, sandbox_id: str, params: Mapping[str, str | int]) -> list[dict[str, Any]]:
        doc = await self.call("GET", sandbox_path(sandbox_id, "/logs"), params=params)
        events: list[dict[str, Any]] = doc["events"]
        return events

    async def follow(self, sandbox_id: str, params: Mapping[str, str | int]) -> AsyncIterator[dict[str, Any]]:
        """The follow stream's events as they arrive; an ``{"error"}`` line (the store failed after
        the stream began) is an ApiCallError with status 503, as the same failure before it."""
        path = sandbox_path(sandbox_id, "/logs")
        try:
            async with self._client.stream(path, params={**params, "follow": 1}) as resp:
                if resp.status >= 400:
                    try:
                        doc = await resp.json(content_type=None)
                    except ValueError:
                        doc = {"error": f"HTTP {resp.status}"}
                    error = doc.get("error", doc) if isinstance(doc, dict) else doc
                    raise ApiCallError(str(error), resp.status)
                async for raw in resp.content:
                    line = raw.strip()
                    if not line:
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        event = None
                    if not isinstance(event, dict):
                        # A proxy's page in the middle of the stream, say: not the API's.
                        shown = line[:200].decode(errors="replace")
                        raise ApiCallError(f"the follow stream sent a line that is not an event: {shown!r}")
                    if "error" in event and "sequence" not in event:
                        raise ApiCallError(f"the follow ended: {event['error']}", 503)
                    yield event
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # OSError: the keepalive's verdict on a dead peer (ETIMEDOUT) or a reset, mid-read.
            raise self._unreachable(exc) from None

    async def send_command(self, sandbox_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.call("POST", sandbox_path(sandbox_id, "/commands"), body=body)

    async def commands(self, sandbox_id: str) -> list[dict[str, Any]]:
        doc = await self.call("GET", sandbox_path(sandbox_id, "/commands"))
        commands: list[dict[str, Any]] = doc["commands"]
        return commands

    async def command(self, command_id: str) -> dict[str, Any]:
        return await self.call("GET", f"/commands/{urllib.parse.quote(command_id, safe='')}")

    async def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.call("POST", "/sandboxes", body=body)

    async def delete(self, sandbox_id: str) -> dict[str, Any]:
        return await self.call("DELETE", sandbox_path(sandbox_id))

    async def version(self) -> dict[str, Any]:
        return await self.call("GET", "/version")

    async def fleet(self, params: Mapping[str, str | int]) -> dict[str, Any]:
        return await self.call("GET", "/fleet", params=params)
