"""``logs -f``'s stream as the client reads it, against a real HTTP server on loopback that
writes what a test needs (the gateway's follow never writes these: a line a proxy put in, a
follow that stays quiet), so that what the client does with them is seen.

The follow cut by a real gateway's shutdown is tests/integration/test_ctl_sandboxes.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from gateway.clientauth import KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES, StaticToken
from gateway.ctl.calls import Api, ApiCallError


@contextlib.asynccontextmanager
async def _serve(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """The logs route served by ``handler`` on a loopback port: its base URL."""
    app = web.Application()
    app.router.add_get("/api/v1/sandboxes/{id}/logs", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _api(url: str) -> Api:
    return Api(url, StaticToken("t", origin="test", api_url=url))


async def test_a_line_that_is_not_an_event_is_an_error_not_a_traceback() -> None:
    async def proxy_page(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b'{"id":1,"sequence":1,"message":"one"}\n<html>502 Bad Gateway</html>\n')
        return response

    seen = []
    async with _serve(proxy_page) as url, _api(url) as api:
        with pytest.raises(ApiCallError, match="not an event: '<html>502 Bad Gateway</html>'"):
            async for event in api.follow("sb-1", {}):
                seen.append(event["message"])
    assert seen == ["one"]


async def test_a_follows_connection_has_tcp_keepalive() -> None:
    """The gateway writes nothing on a quiet follow: only the kernel's keepalive probes can tell
    a peer that vanished (no FIN, no RST) from a quiet one."""
    quiet = asyncio.Event()

    async def silent(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await quiet.wait()
        return response

    async with (
        _serve(silent) as url,
        _api(url) as api,
        api._client.stream("/sandboxes/sb-1/logs", params={"follow": 1}) as resp,
    ):
        assert resp.connection is not None and resp.connection.transport is not None
        sock = resp.connection.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert [
                sock.getsockopt(socket.IPPROTO_TCP, option)
                for option in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)
            ] == [KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES]
        quiet.set()
