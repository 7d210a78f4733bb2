"""What a held session costs the gateway in Python objects (issue 22 point 7: "memory at most 45 MiB
per 1,000 sessions"), and that nothing of it outlives the session.

An in-process gateway (SQLite) takes a few hundred ConnectSupervisor streams over one channel, with
the simulated supervisors' capabilities (resume, events, reconnect); ``tracemalloc`` counts what is
still allocated once they are all accepted, keeping only allocations with a frame of the gateway's
own code in their traceback, less gRPC's read in progress (what gRPC allocates for the stream
itself, the bare echo server pays too: ``python -m chaos.memprobe`` compares them). Before the cuts
of 2026-12 a session held 10.9 KB this way: an ``asyncio.Queue`` as its inbox (four deques of 760
bytes each, empty), an ExitStack for the hello's admission ticket (one more deque), a deque of
waiting batches, and the hello's message, claim and ticket kept by the handler's frame; now 5.3 KB
(its handler's generator frames, the reader task, the stale timer, the Session and its Inbox).
Then the streams are cancelled: no Session, reader task or stale timer may remain.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from gateway import rpc
from gateway.app import Gateway
from gateway.sessions import Session
from openshell_wire.records import CAP_EVENTS, CAP_RECONNECT, CAP_RESUME
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.support.gateway import gateway_config

GATEWAY_CODE = str(Path(__file__).resolve().parents[2] / "gateway" / "*")
READ_FRAME = str(Path(rpc.__file__).resolve())
SESSIONS = 200
#: Bytes per held session allocated with the gateway's code on the stack (5.3 KB measured; 10.9 KB
#: before the cuts). Headroom for what Python versions put in a frame and for the store's
#: background work while it is counted, not for a new per-session structure: a Queue crosses it.
MAX_BYTES_PER_SESSION = 7_500

#: A ConnectSupervisor call (the stubs' types do not describe grpc.aio's).
Call = Any


async def _open(stub: pb_grpc.OpenShellStub, sandbox_id: str) -> Call:
    call: Call = stub.ConnectSupervisor()  # type: ignore[call-arg]  # grpc.aio: no iterator, call.write
    message = pb.SupervisorMessage()
    message.hello.sandbox_id = sandbox_id
    message.hello.instance_id = "i-" + uuid.uuid4().hex[:6]
    message.hello.connection_epoch = 1
    message.hello.capabilities.extend((CAP_RESUME, CAP_EVENTS, CAP_RECONNECT))
    message.hello.journal_epoch = "e1"
    await call.write(message)
    answer = await call.read()
    assert answer is not aio.EOF and answer.WhichOneof("payload") == "session_accepted", answer
    return call


async def _open_all(stub: pb_grpc.OpenShellStub, prefix: str, n: int) -> list[Call]:
    calls: list[Call] = []
    for start in range(0, n, 25):  # a few at a time: within admission's concurrent handshakes
        calls += await asyncio.gather(
            *(_open(stub, f"{prefix}-{i:04d}") for i in range(start, min(start + 25, n)))
        )
    return calls


def _gateway_bytes() -> int:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [
            tracemalloc.Filter(True, GATEWAY_CODE, all_frames=True),
            # gRPC's read in progress (its future, buffers, callbacks), which every server has
            # while a stream waits for a message: the echo server's costs it the same.
            tracemalloc.Filter(False, READ_FRAME, lineno=_read_line(), all_frames=True),
        ]
    )
    return sum(stat.size for stat in snapshot.statistics("filename"))


def _read_line() -> int:
    """The line of gateway.rpc's request stream that awaits gRPC's next frame."""
    lines, start = inspect.getsourcelines(rpc.Requests.__anext__)
    return start + next(i for i, line in enumerate(lines) if ".read()" in line)


def _readers() -> int:
    return sum(1 for t in asyncio.all_tasks() if t.get_name().startswith("read-"))


def _reminds_a_session(handle: asyncio.TimerHandle) -> bool:
    """A session's stale timer: it puts its reminder into the session's inbox."""
    callback = handle._callback  # type: ignore[attr-defined]
    target = getattr(getattr(callback, "func", callback), "__self__", None)
    return type(target).__name__ in ("Inbox", "Queue") or "check_stale" in getattr(
        callback, "__qualname__", ""
    )


def _held() -> dict[str, int]:
    """What a session owns, still alive anywhere in the process."""
    gc.collect()
    loop = asyncio.get_running_loop()
    timers = [h for h in getattr(loop, "_scheduled", []) if _reminds_a_session(h)]
    return {
        "sessions": sum(1 for o in gc.get_objects() if isinstance(o, Session)),
        "reader tasks": _readers(),
        "stale timers": sum(1 for h in timers if not h.cancelled()),
    }


async def _until(predicate: object, *, within: float = 30.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway = Gateway(
        gateway_config(
            tmp_path,
            # Hellos under tracemalloc on a busy machine: the store's deadline is not what is measured.
            {"rebalance": {"enabled": False}, "grpc": {"store_timeout_s": 30.0}},
        )
    )
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def test_a_held_session_costs_a_bounded_number_of_python_bytes_and_leaves_nothing(gw: Gateway) -> None:
    channel = aio.insecure_channel(gw.grpc_address)
    try:
        stub = pb_grpc.OpenShellStub(channel)
        # Warm: the store's statement caches, interned capability sets, gRPC's method tables.
        warm = await _open_all(stub, "warm", 10)
        for call in warm:
            call.cancel()
        await _until(lambda: len(gw.registry) == 0)
        # Traced from here only: tracing slows the hellos, and what the warm-up left is not counted.
        tracemalloc.start(20)
        gc.collect()
        before = _gateway_bytes()
        calls = await _open_all(stub, "held", SESSIONS)
        # Each session's reader starts once its SessionAccepted is written.
        await _until(lambda: len(gw.registry) == SESSIONS and _readers() == SESSIONS)
        gc.collect()
        per_session = (_gateway_bytes() - before) / SESSIONS
        held = _held()
        assert held == {
            "sessions": SESSIONS,
            "reader tasks": SESSIONS,
            "stale timers": SESSIONS,
        }, held
        assert per_session <= MAX_BYTES_PER_SESSION, (
            f"a held session costs {per_session:.0f} bytes of the gateway's Python objects "
            f"(at most {MAX_BYTES_PER_SESSION})"
        )

        for call in calls:
            call.cancel()
        await _until(lambda: len(gw.registry) == 0)
        # The handlers' cleanup runs as gRPC notices each cancellation: polled, not slept.
        deadline = time.monotonic() + 30
        while (held := _held()) != {"sessions": 0, "reader tasks": 0, "stale timers": 0}:
            assert time.monotonic() < deadline, f"left behind by closed sessions: {held}"
            await asyncio.sleep(0.1)
    finally:
        tracemalloc.stop()
        await channel.close()
