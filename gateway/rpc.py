"""How the gateway puts its gRPC services on the server: every request frame decoded by us, every
failure answered with a fitting status (never ``UNKNOWN``), and the log of bad input rate-limited.

grpc-python's generated ``add_..._to_server`` decodes each frame before the servicer runs; a frame
that is not a valid message then fails inside grpc, which answers ``UNKNOWN: Unexpected <class
DecodeError>`` and logs an ERROR with a traceback for every such frame, so anyone who can open a
connection could fill the log. :func:`add_service` therefore registers every method of a service
(read from its descriptor, so a method added to the ``.proto`` is covered too) with an identity
deserializer, and decodes the bytes itself:

- a frame that does not decode ends the call with ``INVALID_ARGUMENT`` ("malformed X frame: ..."),
  counted per method, and logged (one line, no traceback) at most once per peer host and method
  every ``LOG_INTERVAL_S`` and at most ``LOG_BURST`` lines per interval from all peers together
  (:mod:`gateway.ratelimit`: one limiter per concern), with how many were left out;
- a :class:`StoreError` (the database unreachable, read-only, failing) ends it with
  ``UNAVAILABLE`` and the trailing metadata ``grpc-retry-pushback-ms`` (a retry hint spread over
  ``STORE_RETRY_AFTER_MS`` so that a fleet does not come back in one instant); counted, and logged
  once per method per interval (a limiter of its own). The peer is told only that the store is
  unavailable: a database's error may name its hosts, and a sandbox is not trusted with them. A
  handler that already told its peer (ConnectSupervisor sends ``SessionRejected`` with the same
  hint first) raises :class:`Unavailable` with it instead;
- anything else unexpected (a bug) ends it with ``INTERNAL`` and is logged with its traceback,
  rate-limited too.

What a call had stored before the failure stays stored; nothing is acknowledged that was not
committed, since an answer is only sent after its write returned.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc import aio

from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimitedLog as RateLimitedLog  # noqa: PLC0414 - re-exported for app, server
from gateway.ratelimit import peer_host as peer_host  # noqa: PLC0414 - re-exported
from gateway.store import StoreError
from openshell_wire.logsetup import is_failed_batch

log = logging.getLogger(__name__)

Ctx = aio.ServicerContext[Any, Any]

#: The retry hint for a store failure is drawn from this range, in milliseconds.
STORE_RETRY_AFTER_MS = (1_000, 5_000)
#: All a peer learns of a store failure; the reason is in the gateway's log.
STORE_UNAVAILABLE = "store unavailable, retry later"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


class MalformedFrame(Exception):
    """A request frame that is not a valid encoding of the method's message."""


class Unavailable(Exception):
    """The call cannot be served now; the peer should retry after ``retry_after_ms``. The peer is
    told ``reason``; ``detail`` (a database's error, which may name hosts) goes to the log only."""

    def __init__(self, reason: str, *, retry_after_ms: int, detail: str = "") -> None:
        super().__init__(reason)
        self.retry_after_ms = retry_after_ms
        self.detail = detail


def store_retry_after_ms() -> int:
    return random.randint(*STORE_RETRY_AFTER_MS)


class CallGuard:
    """Turns what a handler raises into the call's status, counts it and logs it, rate-limited."""

    def __init__(self, *, metrics: GatewayMetrics | None = None) -> None:
        self._metrics = metrics
        # One limiter per concern: a flood of bad frames cannot crowd out store failures.
        self.malformed_log = RateLimitedLog(log, concern="malformed-frame")
        self.unavailable_log = RateLimitedLog(log, concern="store-failure")
        self.internal_log = RateLimitedLog(log, concern="internal-error")

    def close(self) -> None:
        """Write the summaries of what the limiters left out (at shutdown)."""
        for limiter in (self.malformed_log, self.unavailable_log, self.internal_log):
            limiter.close()

    async def malformed(self, method: str, context: Ctx, reason: str) -> NoReturn:
        if self._metrics is not None:
            self._metrics.malformed_frames.labels(method).inc()
        peer = context.peer()
        self.malformed_log.log(
            logging.WARNING,
            ("malformed", peer_host(peer), method),
            f"{method} from {peer} refused: {reason}",
            extra={"peer": peer, "method": method},
        )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)

    async def unavailable(
        self, method: str, context: Ctx, reason: str, *, retry_after_ms: int, detail: str
    ) -> NoReturn:
        if self._metrics is not None:
            self._metrics.store_failures.labels(method).inc()
        self.unavailable_log.log(
            logging.WARNING,
            ("unavailable", method),
            f"{method} answered UNAVAILABLE (retry after {retry_after_ms} ms): {detail or reason}",
            extra={"method": method},
        )
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            reason,
            trailing_metadata=((RETRY_PUSHBACK_KEY, str(retry_after_ms)),),
        )

    async def failed(self, method: str, context: Ctx, exc: Exception) -> NoReturn:
        self.internal_log.log(
            logging.ERROR, ("internal", method, type(exc)), f"{method} failed: {exc!r}", exc_info=exc
        )
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    async def settle(self, method: str, context: Ctx, exc: Exception) -> NoReturn:
        """End the call for ``exc``, raised by its handler."""
        if isinstance(exc, aio.AbortError):
            raise exc  # the handler chose the status itself
        if is_failed_batch(exc):
            # A context.write to a client that left: gRPC's server takes it as it takes a yielded
            # answer it could not send (a counted debug line, openshell_wire.logsetup), not as
            # an internal error of ours.
            raise exc
        if isinstance(exc, MalformedFrame):
            await self.malformed(method, context, str(exc))
        if isinstance(exc, Unavailable):
            await self.unavailable(
                method, context, str(exc), retry_after_ms=exc.retry_after_ms, detail=exc.detail
            )
        if isinstance(exc, StoreError):
            await self.unavailable(
                method, context, STORE_UNAVAILABLE, retry_after_ms=store_retry_after_ms(), detail=str(exc)
            )
        await self.failed(method, context, exc)


def decode(message_class: type[Message], data: bytes) -> Message:
    try:
        return message_class.FromString(data)
    except Exception:  # DecodeError, and whatever else a hostile encoding may provoke
        raise MalformedFrame(
            f"malformed {message_class.DESCRIPTOR.name} frame: not a valid protobuf encoding"
        ) from None


class Requests:
    """A client stream's requests, decoded: read with the call's own ``context.read()`` (the frames'
    bytes, no deserializer registered), not through grpc's request iterator. Per held stream that is
    neither grpc's async generator over ``read()`` nor one of ours over it (each with its frame, its
    pending ``asend`` and its entry in the loop's weak set of async generators): a few hundred
    bytes of every session (``python -m chaos.memprobe``)."""

    __slots__ = ("_context", "_ended", "_message_class")

    def __init__(self, message_class: type[Message], context: Ctx) -> None:
        self._message_class = message_class
        self._context = context
        self._ended = False

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> Message:
        # Ended for good, as an async generator is, by the stream's end, a failed read or a read
        # cancelled while it waited: a read after a cancelled one could ask gRPC for a second
        # message while the first receive is still pending in its core.
        if self._ended:
            raise StopAsyncIteration
        try:
            data = await self._context.read()
        except BaseException:
            self._ended = True
            raise
        if data is aio.EOF:
            self._ended = True
            raise StopAsyncIteration
        assert isinstance(data, bytes)
        return decode(self._message_class, data)


#: What a handler is given: one frame's bytes, or the stream of them (client streaming).
Frames = bytes | AsyncIterator[bytes]
#: A servicer's method as found by name: a coroutine function, an async generator function, or None.
Impl = Callable[[Any, Ctx], object] | None


def _handler(method: MethodDescriptor, impl: Impl, guard: CallGuard) -> grpc.RpcMethodHandler[bytes, Message]:
    """The handler for ``method``, its shape taken from the method's descriptor (its streaming
    flags), then the servicer's ``impl`` fitted into it (or refused UNIMPLEMENTED)."""
    name = method.name
    request_class = message_factory.GetMessageClass(method.input_type)
    serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
    client_streaming, server_streaming = method.client_streaming, method.server_streaming

    def request_of(request: Frames, context: Ctx) -> Message | AsyncIterator[Message]:
        if client_streaming:
            # grpc's own request iterator (``request``) is never iterated: see Requests.
            return Requests(request_class, context)
        assert isinstance(request, bytes)
        return decode(request_class, request)

    async def refused(request: Frames, context: Ctx) -> NoReturn:
        """The servicer lacks the method, or has it in a shape the descriptor does not allow."""
        try:
            decoded = request_of(request, context)
            if not isinstance(decoded, Message):
                async for _ in decoded:  # every frame is still checked, then refused
                    pass
        except Exception as exc:
            await guard.settle(name, context, exc)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by this gateway")

    async def streaming(request: Frames, context: Ctx) -> AsyncIterator[object]:
        assert impl is not None
        responses = impl(request_of(request, context), context)
        assert inspect.isasyncgen(responses)
        try:
            async for out in responses:
                yield out
        except Exception as exc:
            await guard.settle(name, context, exc)
        finally:
            # A call cancelled while this wrapper waits at its yield would otherwise leave the
            # handler suspended until garbage collection: its cleanup (the session registry)
            # must run now.
            await responses.aclose()

    async def single(request: Frames, context: Ctx) -> object:
        assert impl is not None
        try:
            result = impl(request_of(request, context), context)
            assert inspect.isawaitable(result)
            return await result
        except Exception as exc:
            await guard.settle(name, context, exc)

    behaviour: Callable[[Frames, Ctx], object]
    if server_streaming:
        # A stream of answers: yielded by an async generator, or written with context.write by a
        # coroutine (grpc_health's Watch).
        if inspect.isasyncgenfunction(impl):
            behaviour = streaming
        elif inspect.iscoroutinefunction(impl):
            behaviour = single
        else:
            behaviour = refused
    else:
        behaviour = single if inspect.iscoroutinefunction(impl) else refused
    kinds: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[bytes, Message]]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    # No request_deserializer: the handler gets the frame's bytes and decodes them itself.
    return kinds[(client_streaming, server_streaming)](behaviour, response_serializer=serialize)


def add_service(
    server: aio.Server,
    # Any too: the generated modules' descriptors are upb's, which the stubs do not know.
    service: ServiceDescriptor | Any,
    servicer: object,
    *,
    guard: CallGuard,
) -> None:
    """Register every method of ``service`` on ``server``, served by ``servicer``'s methods of the
    same names (see the module docstring); a method the servicer lacks answers UNIMPLEMENTED."""
    handlers = {m.name: _handler(m, getattr(servicer, m.name, None), guard) for m in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
