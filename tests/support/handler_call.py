"""A streaming gRPC handler written with ``context.write`` (the gateway's ConnectSupervisor), driven
in-process as the async iterator of what it writes: the unit tests call the service directly,
without a server, and read its answers one by one as a client would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from openshell_wire.v1 import openshell_pb2 as pb

Handler = Callable[[AsyncIterator[pb.SupervisorMessage], Any], Coroutine[Any, Any, None]]


class HandlerCall:
    """``handler(requests, self)`` running as a task; ``self`` is its context (``peer``,
    ``write``). ``anext`` gives the next message written, raises what the handler raised, or
    ``StopAsyncIteration`` once it returned; ``aclose`` cancels it, as gRPC does when the peer
    leaves.

    A write returns when the next message is asked for, as an async generator resumes from its
    yield (the handler does not run ahead of the test: a command queued meanwhile meets the
    session where the test expects it); with ``resume_on_read``, as soon as its message is read
    (a client reading as it comes, with nothing buffered). Either way a second write while a
    message is unread fails, as gRPC refuses a second write on a stream while one is in flight
    (a write cancelled in Python goes on in gRPC's core: its message stays unread here)."""

    def __init__(
        self,
        handler: Handler,
        requests: AsyncIterator[pb.SupervisorMessage],
        *,
        peer: str = "ipv4:127.0.0.1:5000",
        resume_on_read: bool = False,
    ) -> None:
        self._peer = peer
        self._resume_on_read = resume_on_read
        self._written: asyncio.Queue[pb.GatewayMessage] = asyncio.Queue()
        self._resume: asyncio.Future[None] | None = None
        self.task = asyncio.create_task(handler(requests, self))

    @classmethod
    def running(cls, body: Callable[[HandlerCall], Coroutine[Any, Any, None]]) -> HandlerCall:
        """``body(call)`` instead of a handler: a part of one (the session loop) given
        ``call.write``."""

        async def handler(_requests: AsyncIterator[pb.SupervisorMessage], call: HandlerCall) -> None:
            await body(call)

        return cls(handler, _no_requests())

    def peer(self) -> str:
        return self._peer

    async def write(self, message: pb.GatewayMessage) -> None:
        if not self._written.empty():
            raise RuntimeError("a write while another one is in flight on this stream")
        self._written.put_nowait(message)
        resume = self._resume = asyncio.get_running_loop().create_future()
        await resume

    def __aiter__(self) -> HandlerCall:
        return self

    def _resume_writer(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        self._resume = None

    def _read(self, message: pb.GatewayMessage) -> pb.GatewayMessage:
        if self._resume_on_read:
            self._resume_writer()
        return message

    async def __anext__(self) -> pb.GatewayMessage:
        if not self._resume_on_read:
            self._resume_writer()
        if self._written.empty() and not self.task.done():
            getter = asyncio.ensure_future(self._written.get())
            try:
                await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                return self._read(getter.result())
        if not self._written.empty():
            return self._read(self._written.get_nowait())
        exc = self.task.exception()
        if exc is not None:
            raise exc
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def _no_requests() -> AsyncIterator[pb.SupervisorMessage]:
    return
    yield  # an async generator that ends at once
