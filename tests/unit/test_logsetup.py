"""The gateway's log setup with gRPC's asyncio server: a client gone before its reply is a counted
debug line, in both formats; every other gRPC error keeps its level and traceback.

The server is gRPC's own (its ``_handle_exceptions`` logs the records); the handlers raise the
exception core's failed batch raises, as the race that produces it (a client leaving while its
reply is on the way, before the server learns it left) cannot be timed from outside: a storm of
1,200 hellos cancelled around their refusal never showed it on an idle machine (CI saw it once)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc._cython import cygrpc
from prometheus_client import generate_latest

from gateway.metrics import GatewayMetrics
from gateway.sessions import SessionRegistry
from openshell_wire.logsetup import (
    GRPC_SERVER_LOGGER,
    quiet_vanished_peers,
    setup_logging,
    vanished_peers,
)

SERVICE = "t.Vanish"
VANISHED = "Vanished"
MISUSED = "Misused"
BROKEN = "Broken"


class _Ran:
    """Handlers that ran to their failure (gRPC logs it in the same step, as the exception goes up)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.names: list[str] = []
        self.all = asyncio.Event()

    def add(self, name: str) -> None:
        self.names.append(name)
        if len(self.names) >= self.expected:
            self.all.set()


ran = _Ran(0)


async def _vanished(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
    # What core's failure of a batch (here the status) raises when the call was cancelled.
    ran.add(VANISHED)
    raise cygrpc.ExecuteBatchError('Failed "execute_batch": (<SendStatusFromServerOperation>,)')


async def _misused(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
    # What a batch core refuses to start raises (8: GRPC_CALL_ERROR_TOO_MANY_OPERATIONS).
    ran.add(MISUSED)
    raise cygrpc.ExecuteBatchError("Failed grpc_call_start_batch: 8")


async def _broken(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
    ran.add(BROKEN)
    raise ValueError("a bug of ours")


def _handler(fn: Callable[[bytes, Any], Awaitable[bytes]]) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(fn)


@pytest.fixture
def logs() -> Iterator[Callable[[str, str], io.StringIO]]:
    """The gateway's log setup into a buffer; the root logger and gRPC's logger as they were after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    grpc_logger = logging.getLogger(GRPC_SERVER_LOGGER)
    grpc_filters = grpc_logger.filters[:]
    # setup_logging quietens a few libraries' loggers: as they were for the tests after this one.
    levels = {
        name: logger.level
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }

    def setup(level: str, fmt: str) -> io.StringIO:
        out = io.StringIO()
        setup_logging(level, fmt, stream=out)
        quiet_vanished_peers()
        quiet_vanished_peers()  # twice, as a second setup would: still one filter
        return out

    yield setup
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    grpc_logger.filters[:] = grpc_filters
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


async def _call(methods: list[str], *, calls: int = 1) -> None:
    """Each method called ``calls`` times at once on a real gRPC asyncio server; a call whose
    handler failed on ExecuteBatchError gets no status (gRPC sends none): given up once every
    handler has failed (cancelled before, its handler would be cancelled, not fail)."""
    global ran  # noqa: PLW0603 (the handlers' one tally, per call of this)
    ran = _Ran(len(methods) * calls)
    server = aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {VANISHED: _handler(_vanished), MISUSED: _handler(_misused), BROKEN: _handler(_broken)},
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            pending = [
                asyncio.ensure_future(channel.unary_unary(f"/{SERVICE}/{method}")(b"", timeout=60))
                for method in methods
                for _ in range(calls)
            ]
            await asyncio.wait_for(ran.all.wait(), 30)
            for call in pending:
                call.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        await server.stop(None)


def test_a_client_gone_before_its_reply_is_a_counted_debug_line_without_traceback(
    logs: Callable[[str, str], io.StringIO],
) -> None:
    out = logs("debug", "text")
    before = vanished_peers()
    asyncio.run(_call([VANISHED], calls=50))
    text = out.getvalue()
    assert vanished_peers() - before == 50
    lines = [line for line in text.splitlines() if "ExecuteBatchError raised in core" in line]
    assert len(lines) == 50, text[-3000:]
    assert all(" debug   grpc._cython.cygrpc: " in line and "peer_vanished=True" in line for line in lines)
    assert "Traceback" not in text and " error " not in text, text[-3000:]
    # And the gateway's /metrics says how many.
    exposed = generate_latest(GatewayMetrics(SessionRegistry()).registry).decode()
    assert f"openshell_gateway_peer_vanished_total {float(vanished_peers())}" in exposed


def test_in_json_and_below_debug_too(logs: Callable[[str, str], io.StringIO]) -> None:
    out = logs("debug", "json")
    asyncio.run(_call([VANISHED]))
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    (doc,) = [d for d in docs if d["msg"].startswith("ExecuteBatchError raised in core")]
    assert doc["level"] == "debug" and doc["logger"] == GRPC_SERVER_LOGGER and "exc" not in doc, doc
    # At info, not shown at all, yet counted.
    out = logs("info", "json")
    before = vanished_peers()
    asyncio.run(_call([VANISHED], calls=3))
    assert vanished_peers() - before == 3
    assert "ExecuteBatchError" not in out.getvalue(), out.getvalue()


def test_every_other_grpc_error_keeps_its_level_and_traceback(
    logs: Callable[[str, str], io.StringIO],
) -> None:
    out = logs("debug", "text")
    before = vanished_peers()
    asyncio.run(_call([MISUSED, BROKEN]))
    text = out.getvalue()
    assert vanished_peers() == before
    # A batch core would not start is a misuse of the call (ours): still an error, with its cause.
    assert "error   grpc._cython.cygrpc: ExecuteBatchError raised in core by servicer method" in text, text
    assert "Failed grpc_call_start_batch: 8" in text
    broken = f"Unexpected [ValueError] raised by servicer method [/{SERVICE}/{BROKEN}]"
    assert f"error   grpc._cython.cygrpc: {broken}" in text, text
    assert text.count("Traceback") == 2, text
