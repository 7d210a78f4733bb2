"""The bare baseline: a grpc.aio ConnectSupervisor peer on the project's own stubs that does no work.

It accepts every hello (resuming from an in-memory high-water mark per sandbox and journal epoch),
echoes heartbeats and acknowledges every event batch at once, with the gateway's own server options.
The scale benchmark drives it with the same simulator as the gateway in the same run, so the
gateway's cost per heartbeat reads against what grpc.aio alone costs on this machine.

    python -m chaos.echo_server 127.0.0.1:17170 [--interval-ms 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import uuid
from collections.abc import AsyncIterator

import grpc
from grpc import aio

from gateway.config import GatewayConfig
from gateway.server import server_options
from openshell_wire.records import CAP_EVENTS, CAP_RESUME
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc


class EchoService(pb_grpc.OpenShellServicer):
    def __init__(self, *, interval_ms: int) -> None:
        self.interval_ms = interval_ms
        #: (sandbox_id, journal_epoch) -> highest sequence acknowledged.
        self.high_water: dict[tuple[str, str], int] = {}

    async def ConnectSupervisor(
        self,
        request_iterator: AsyncIterator[pb.SupervisorMessage],
        context: aio.ServicerContext[pb.SupervisorMessage, pb.GatewayMessage],
    ) -> AsyncIterator[pb.GatewayMessage]:
        messages = request_iterator.__aiter__()
        try:
            first = await anext(messages)
        except StopAsyncIteration:
            return
        if first.WhichOneof("payload") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a hello")
        hello = first.hello
        key = (hello.sandbox_id, hello.journal_epoch)
        # The gateway's resume rule without a store: what it acknowledged, never above what was written.
        resume = min(self.high_water.get(key, 0), hello.journal_last_sequence)
        yield pb.GatewayMessage(
            session_accepted=pb.SessionAccepted(
                session_id=uuid.uuid4().hex,
                heartbeat_interval_secs=max(1, self.interval_ms // 1000),
                heartbeat_interval_ms=self.interval_ms,
                stale_after_ms=3 * self.interval_ms,
                capabilities=[c for c in hello.capabilities if c in (CAP_EVENTS, CAP_RESUME)],
                resume_after_sequence=resume,
            )
        )
        async for message in messages:
            kind = message.WhichOneof("payload")
            if kind == "heartbeat":
                yield pb.GatewayMessage(
                    heartbeat=pb.GatewayHeartbeat(echo_unix_ms=message.heartbeat.sent_unix_ms)
                )
            elif kind == "events":
                batch = message.events
                if batch.events:
                    self.high_water[key] = max(self.high_water.get(key, 0), batch.events[-1].sequence)
                yield pb.GatewayMessage(
                    event_ack=pb.EventAck(
                        journal_epoch=batch.journal_epoch,
                        acked_through_sequence=self.high_water.get(key, 0),
                    )
                )


async def serve(address: str, *, interval_ms: int) -> None:
    server = aio.server(options=list(server_options(GatewayConfig())))
    # Only ConnectSupervisor is served; the base class answers UNIMPLEMENTED for the other methods.
    service = EchoService(interval_ms=interval_ms)  # type: ignore[abstract]
    pb_grpc.add_OpenShellServicer_to_server(service, server)
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"echo_server: cannot listen on {address}")
    await server.start()
    print("echo ready", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(grace=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chaos.echo_server", description=__doc__.splitlines()[0])
    parser.add_argument("address", help="host:port to listen on")
    parser.add_argument("--interval-ms", type=int, default=10_000, help="heartbeat interval to hand out")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.address, interval_ms=args.interval_ms))


if __name__ == "__main__":
    main()
