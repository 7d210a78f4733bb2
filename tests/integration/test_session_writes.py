"""One write at a time on a session's stream, on a real gateway process.

The gateway answers a heartbeat in the session's reader task (the hot path, no hop through the
inbox) while the session's loop writes acknowledgements and commands: gRPC refuses a second
write on a stream while one is in flight, so the two take turns (``gateway.server``). Here a
client sends heartbeats back to back with event batches for a few seconds: every heartbeat is
answered with its own echo, every batch acknowledged, the session never ends, and the gateway
logs nothing at error level."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path
from typing import Any

from grpc import aio

from openshell_wire.convert import event_to_proto
from openshell_wire.records import CAP_EVENTS, CAP_RESUME, Event, LogRecord, LogStream
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.support.procs import GatewayProcess

RUN_FOR_S = 4.0


def _hello(sandbox_id: str, epoch: str) -> pb.SupervisorMessage:
    hello = pb.SupervisorMessage()
    hello.hello.sandbox_id = sandbox_id
    hello.hello.instance_id = uuid.uuid4().hex[:12]
    hello.hello.connection_epoch = 1
    hello.hello.capabilities.extend([CAP_RESUME, CAP_EVENTS])
    hello.hello.journal_epoch = epoch
    return hello


async def _interleave(address: str, sandbox_id: str) -> tuple[set[int], set[int], int, int]:
    """(echoes sent, echoes answered, batches sent, highest acknowledgement)."""
    epoch = uuid.uuid4().hex[:12]
    async with aio.insecure_channel(address) as channel:
        call: Any = pb_grpc.OpenShellStub(channel).ConnectSupervisor()
        await call.write(_hello(sandbox_id, epoch))
        first = await asyncio.wait_for(call.read(), 30)
        assert first.WhichOneof("payload") == "session_accepted", first
        sent: set[int] = set()
        echoed: set[int] = set()
        batches = 0
        acked = 0

        async def write() -> None:
            nonlocal batches
            beat = 0
            until = time.monotonic() + RUN_FOR_S
            while time.monotonic() < until:
                for _ in range(5):
                    beat += 1
                    message = pb.SupervisorMessage()
                    message.heartbeat.sent_unix_ms = beat  # an id to echo, not a time
                    await call.write(message)
                    sent.add(beat)
                batches += 1
                batch = pb.SupervisorMessage()
                batch.events.journal_epoch = epoch
                record = LogRecord(LogStream.STDOUT, f"line {batches}")
                batch.events.events.append(
                    event_to_proto(Event(sequence=batches, timestamp_ms=1, payload=record))
                )
                await call.write(batch)
            await call.done_writing()

        writer = asyncio.create_task(write())
        while True:
            out = await asyncio.wait_for(call.read(), 30)
            if out is aio.EOF:
                break
            kind = out.WhichOneof("payload")
            if kind == "heartbeat":
                echoed.add(out.heartbeat.echo_unix_ms)
            elif kind == "event_ack":
                acked = max(acked, out.event_ack.acked_through_sequence)
            else:
                raise AssertionError(f"unexpected {kind}: {out}")
        await writer
        return sent, echoed, batches, acked


def test_heartbeat_answers_and_acknowledgements_take_turns(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "gateway")
    gateway.start()
    try:
        results = asyncio.run(_run(gateway.address))
    finally:
        gateway.stop()
    for sent, echoed, batches, acked in results:
        assert sent and echoed == sent, f"{len(sent - echoed)} heartbeats unanswered"
        assert batches > 10 and acked == batches, (batches, acked)
    log = gateway.log_text()
    assert "stream broke" not in log, log[-3000:]
    assert not re.search(r"^\S+ (error|critical)", log, re.MULTILINE), log[-3000:]


async def _run(address: str) -> list[tuple[set[int], set[int], int, int]]:
    return list(await asyncio.gather(*(_interleave(address, f"turns-{i}") for i in range(4))))
