#!/usr/bin/env python3
"""A peer that speaks only the upstream OpenShell protocol: an upstream gateway or supervisor.

Its stubs are compiled at start-up from ``upstream_openshell.proto`` beside this file (the
upstream subset of WIRE.md and nothing of ours), so whatever our side adds (fields >= 100, new
oneof members) reaches this peer as genuinely unknown fields, the way it would reach upstream's
own code. Run it as a separate process: it must never share a descriptor pool with
``openshell_wire`` (both define ``openshell.v1.*``).

    upstream_peer.py gateway --listen HOST:PORT --out FILE [--heartbeat-secs 1] [--crash-after-lines K]
                     [--keep-lines 100] [--require-token TOKEN [--stream-open]]
    upstream_peer.py supervisor --gateway HOST:PORT --sandbox-id ID --lines N --exit-code C

gateway
    ConnectSupervisor answers the hello with SessionAccepted{session_id, heartbeat_interval_secs},
    answers each heartbeat with a heartbeat and sends its own every interval; PushSandboxLogs
    appends the SandboxLogLines it keeps to FILE as one JSON object per line: like upstream's
    gateway (openshell-server src/grpc/policy.rs:4105) only the first ``--keep-lines`` (100) of
    each request, answering OK all the same; what it drops is recorded as ``{"dropped": n,
    "dropped_lines": [the lines]}`` (0 keeps everything); ReportMainProcessExit
    appends ``{"exit": code, "instance_id": ..., "sandbox_id": ...}``; Health answers HEALTHY.
    FILE also gets ``{"gateway_started": pid}`` at start and ``{"hello": ..., "unknown_fields":
    [numbers]}`` / ``{"session_end": ...}`` per stream, so a reader can tell restarts and
    sessions apart. ``--crash-after-lines K`` makes it die (exit 137) right after it has stored the
    PushSandboxLogs request that brings its count to K, before answering: the one window in
    which an upstream client cannot know that its lines were stored. ``--require-token TOKEN``:
    every call without the metadata ``authorization: Bearer TOKEN`` ends UNAUTHENTICATED, as
    upstream's gateway ends a call whose sandbox JWT does not verify, recorded as
    ``{"refused": method}``; with ``--stream-open`` ConnectSupervisor is let through (a stream
    opened before its token expired stays open while new calls are refused). Prints "upstream
    gateway ready" once listening and runs until SIGTERM/SIGINT.

supervisor
    Opens ConnectSupervisor, sends hello{sandbox_id, instance_id}, prints the first reply as
    ``{"first_reply": ..., "unknown_fields": [numbers]}``, heartbeats at the interval it was given
    and checks that heartbeats come back, pushes N lines ("upstream line {i}", source "sandbox")
    through PushSandboxLogs, calls ReportMainProcessExit(exit_code=C), closes the stream and
    prints ``{"summary": ...}``. Exit status 0, or 1 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc import aio
from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTO = HERE / "upstream_openshell.proto"
#: The path upstream's descriptors carry; the stubs are compiled under it.
PROTO_NAME = "openshell/v1/openshell.proto"
#: Upstream's supervisor configuration and inference messages (packages openshell.sandbox.v1 and
#: openshell.inference.v1), compiled beside it: import them as openshell.v1.sandbox_pb2,
#: openshell.v1.inference_pb2 and openshell.v1.inference_pb2_grpc once load_stubs has run.
EXTRA_PROTOS = {
    "openshell/v1/sandbox.proto": HERE / "upstream_sandbox.proto",
    "openshell/v1/inference.proto": HERE / "upstream_inference.proto",
}


class PeerError(Exception):
    """The other side did something an upstream peer cannot accept; the text says what."""


# -- stubs ------------------------------------------------------------------------------------


def load_stubs(stubs_dir: Path) -> tuple[ModuleType, ModuleType]:
    """Compile the upstream .proto into ``stubs_dir`` and import the result."""
    if "openshell_wire" in sys.modules:
        raise PeerError("openshell_wire is loaded in this process: the upstream stubs would clash with ours")
    src = stubs_dir / "src"
    out = stubs_dir / "gen"
    (src / PROTO_NAME).parent.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROTO, src / PROTO_NAME)
    for name, path in EXTRA_PROTOS.items():
        shutil.copyfile(path, src / name)
    include = str(Path(protoc.__file__).parent / "_proto")  # google/protobuf/struct.proto
    rc = protoc.main(
        [
            "protoc",
            f"-I{src}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            PROTO_NAME,
            *EXTRA_PROTOS,
        ]
    )
    if rc != 0:
        raise PeerError(f"protoc failed ({rc}) on {PROTO}")
    sys.path.insert(0, str(out))
    pb = importlib.import_module("openshell.v1.openshell_pb2")
    pb_grpc = importlib.import_module("openshell.v1.openshell_pb2_grpc")
    # Make sure these are the upstream-only descriptors, not ours found some other way.
    ours = [
        f"{m.full_name}.{f.name}"
        for m in pb.DESCRIPTOR.message_types_by_name.values()
        for f in m.fields
        if f.number >= 100
    ]
    if ours or "openshell_wire" in sys.modules or "EventBatch" in pb.DESCRIPTOR.message_types_by_name:
        raise PeerError(f"the loaded stubs are not the upstream subset: {ours}")
    return pb, pb_grpc


def unknown_fields(message: Any) -> list[int]:
    """Field numbers this peer's stubs did not know, as parsed off the wire (sorted, unique)."""
    return sorted({f.field_number for f in UnknownFieldSet(message)})


def to_dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


# -- gateway ----------------------------------------------------------------------------------


class Recorder:
    """Appends JSON objects to the out file, one write per call, so a kill never tears a line."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def write(self, *objects: dict[str, Any]) -> None:
        data = "".join(json.dumps(o, sort_keys=True) + "\n" for o in objects).encode()
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def make_gateway(pb: ModuleType, pb_grpc: ModuleType, recorder: Recorder, args: argparse.Namespace) -> Any:
    interval: int = args.heartbeat_secs
    keep: int = args.keep_lines

    async def authorized(method: str, context: Any) -> bool:
        """Without the required bearer token the call ends UNAUTHENTICATED, before anything is read."""
        if not args.require_token:
            return True
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("authorization") == f"Bearer {args.require_token}":
            return True
        recorder.write({"refused": method})
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid sandbox token")
        return False  # abort raises; for the type checker

    class UpstreamGateway(pb_grpc.OpenShellServicer):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.lines = 0

        async def ConnectSupervisor(
            self, request_iterator: AsyncIterator[Any], context: Any
        ) -> AsyncIterator[Any]:
            if not args.stream_open and not await authorized("ConnectSupervisor", context):
                return
            try:
                first = await anext(request_iterator)
            except StopAsyncIteration:
                return
            if first.WhichOneof("payload") != "hello":
                yield pb.GatewayMessage(
                    session_rejected=pb.SessionRejected(reason="the first message must be hello")
                )
                return
            session_id = uuid.uuid4().hex
            recorder.write(
                {
                    "hello": to_dict(first.hello),
                    "unknown_fields": unknown_fields(first.hello),
                    "session_id": session_id,
                }
            )
            accepted = pb.SessionAccepted(session_id=session_id, heartbeat_interval_secs=interval)
            yield pb.GatewayMessage(session_accepted=accepted)

            queue: asyncio.Queue[Any] = asyncio.Queue()
            counts = {"heartbeats": 0, "unknown_messages": 0, "other": 0, "heartbeat_unknown_fields": set()}

            async def read() -> None:
                try:
                    async for message in request_iterator:
                        kind = message.WhichOneof("payload")
                        if kind == "heartbeat":
                            counts["heartbeats"] += 1
                            counts["heartbeat_unknown_fields"].update(unknown_fields(message.heartbeat))
                            queue.put_nowait(pb.GatewayMessage(heartbeat=pb.GatewayHeartbeat()))
                        elif kind is None:
                            # A oneof member this peer does not know (an extension): ignored.
                            counts["unknown_messages"] += 1
                        else:
                            counts["other"] += 1
                except Exception as exc:  # the stream broke: end the session
                    counts["error"] = f"{type(exc).__name__}: {exc}"
                finally:
                    queue.put_nowait(None)

            async def tick() -> None:
                while True:
                    await asyncio.sleep(interval)
                    queue.put_nowait(pb.GatewayMessage(heartbeat=pb.GatewayHeartbeat()))

            tasks = [asyncio.create_task(read()), asyncio.create_task(tick())]
            try:
                while (item := await queue.get()) is not None:
                    yield item
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                counts["heartbeat_unknown_fields"] = sorted(counts["heartbeat_unknown_fields"])
                recorder.write({"session_end": session_id, **counts})

        async def PushSandboxLogs(self, request_iterator: AsyncIterator[Any], context: Any) -> Any:
            await authorized("PushSandboxLogs", context)
            async for request in request_iterator:
                logs = list(request.logs)
                kept, dropped = (logs[:keep], logs[keep:]) if keep else (logs, [])
                records = [to_dict(line) for line in kept]
                if dropped:
                    records.append({"dropped": len(dropped), "dropped_lines": [to_dict(x) for x in dropped]})
                recorder.write(*records)
                self.lines += len(kept)
                if args.crash_after_lines and self.lines >= args.crash_after_lines:
                    # Stored, not yet answered: the client sees the call fail.
                    recorder.write(
                        {"crash": os.getpid(), "after_lines": self.lines, "request_lines": len(kept)}
                    )
                    os._exit(137)
            return pb.PushSandboxLogsResponse()

        async def RefreshSandboxToken(self, request: Any, context: Any) -> Any:
            """Upstream's gateway with its default TTL of 0 mints every token with ``exp: 0``
            ("never expires") and re-mints one on refresh: the required token is such a token."""
            await authorized("RefreshSandboxToken", context)
            recorder.write({"refresh": "RefreshSandboxToken"})
            return pb.RefreshSandboxTokenResponse(token=args.require_token)

        async def ReportMainProcessExit(self, request: Any, context: Any) -> Any:
            await authorized("ReportMainProcessExit", context)
            recorder.write(
                {
                    "exit": request.exit_code,
                    "instance_id": request.instance_id,
                    "sandbox_id": request.sandbox_id,
                }
            )
            return pb.ReportMainProcessExitResponse()

        async def Health(self, request: Any, context: Any) -> Any:
            return pb.HealthResponse(status=pb.SERVICE_STATUS_HEALTHY, version="upstream-peer")

    return UpstreamGateway()


async def run_gateway(pb: ModuleType, pb_grpc: ModuleType, args: argparse.Namespace) -> int:
    recorder = Recorder(Path(args.out))
    recorder.write({"gateway_started": os.getpid()})
    # Upstream's gateway decodes at most 1 MiB per message (openshell-server src/multiplex.rs:200).
    server = aio.server(options=[("grpc.max_receive_message_length", 1024 * 1024)])
    pb_grpc.add_OpenShellServicer_to_server(make_gateway(pb, pb_grpc, recorder, args), server)
    if server.add_insecure_port(args.listen) == 0:
        raise PeerError(f"cannot listen on {args.listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("upstream gateway ready", flush=True)
    await stop.wait()
    await server.stop(grace=1)
    return 0


# -- supervisor -------------------------------------------------------------------------------


async def run_supervisor(pb: ModuleType, pb_grpc: ModuleType, args: argparse.Namespace) -> int:
    sandbox_id: str = args.sandbox_id
    instance_id = args.instance_id or uuid.uuid4().hex
    async with aio.insecure_channel(args.gateway) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), args.timeout)
        except TimeoutError:
            raise PeerError(f"no connection to {args.gateway} within {args.timeout:.0f}s") from None
        stub = pb_grpc.OpenShellStub(channel)
        call = stub.ConnectSupervisor()
        await call.write(
            pb.SupervisorMessage(hello=pb.SupervisorHello(sandbox_id=sandbox_id, instance_id=instance_id))
        )
        first = await asyncio.wait_for(call.read(), args.timeout)
        if first is aio.EOF:
            raise PeerError("the gateway closed the stream without answering the hello")
        accepted = first.session_accepted
        print(
            json.dumps(
                {"first_reply": to_dict(first), "unknown_fields": unknown_fields(accepted)}, sort_keys=True
            ),
            flush=True,
        )
        if first.WhichOneof("payload") != "session_accepted":
            raise PeerError(
                f"the hello was answered with {first.WhichOneof('payload') or 'an unknown message'}"
            )
        if not accepted.session_id or accepted.heartbeat_interval_secs <= 0:
            raise PeerError(
                f"SessionAccepted lacks session_id or heartbeat_interval_secs: {to_dict(accepted)}"
            )
        interval = float(accepted.heartbeat_interval_secs)

        sent = 0
        received = 0
        unknown_messages = 0
        write_lock = asyncio.Lock()

        async def heartbeats() -> None:
            nonlocal sent
            while True:
                async with write_lock:
                    await call.write(pb.SupervisorMessage(heartbeat=pb.SupervisorHeartbeat()))
                sent += 1
                await asyncio.sleep(interval)

        async def receive() -> None:
            nonlocal received, unknown_messages
            while True:
                message = await call.read()
                if message is aio.EOF:
                    return
                kind = message.WhichOneof("payload")
                if kind == "heartbeat":
                    received += 1
                elif kind == "relay_open":
                    reply = pb.RelayOpenResult(channel_id=message.relay_open.channel_id, error="unsupported")
                    async with write_lock:
                        await call.write(pb.SupervisorMessage(relay_open_result=reply))
                elif kind is None:
                    unknown_messages += 1  # an extension this peer does not know: ignored
                else:
                    raise PeerError(f"unexpected {kind} on an accepted session: {to_dict(message)}")

        async def heartbeats_came_back() -> None:
            # Heartbeats are empty, so "came back" can only mean: at least as many as we sent.
            while not (sent >= args.heartbeats and received >= sent):
                if reader.done():
                    reader.result()  # the reader's error, if that is what ended it
                    raise PeerError("the gateway closed the stream during the heartbeat check")
                await asyncio.sleep(0.05)

        beat = asyncio.create_task(heartbeats())
        reader = asyncio.create_task(receive())
        try:
            wait_for = args.heartbeats * interval + args.timeout
            try:
                await asyncio.wait_for(heartbeats_came_back(), wait_for)
            except TimeoutError:
                raise PeerError(
                    f"sent {sent} heartbeats, {received} came back within {wait_for:.0f}s "
                    f"(wanted {args.heartbeats})"
                ) from None

            now_ms = int(time.time() * 1000)
            lines = [
                pb.SandboxLogLine(
                    sandbox_id=sandbox_id,
                    timestamp_ms=now_ms + i,
                    level="info",
                    target="upstream_peer",
                    message=f"upstream line {i}",
                    source="sandbox",
                    fields={"i": str(i)},
                )
                for i in range(args.lines)
            ]
            chunk = max(1, args.chunk)
            requests = [
                pb.PushSandboxLogsRequest(sandbox_id=sandbox_id, logs=lines[i : i + chunk])
                for i in range(0, len(lines), chunk)
            ]
            await stub.PushSandboxLogs(iter(requests), timeout=args.timeout)
            await stub.ReportMainProcessExit(
                pb.ReportMainProcessExitRequest(
                    sandbox_id=sandbox_id, instance_id=instance_id, exit_code=args.exit_code
                ),
                timeout=args.timeout,
            )
            health = await stub.Health(pb.HealthRequest(), timeout=args.timeout)

            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            async with write_lock:
                await call.done_writing()
            # The gateway ends its side once ours is closed.
            await asyncio.wait_for(reader, args.timeout)
        finally:
            for task in (beat, reader):
                task.cancel()
            await asyncio.gather(beat, reader, return_exceptions=True)
            call.cancel()

    summary = {
        "session_id": accepted.session_id,
        "heartbeat_interval_secs": accepted.heartbeat_interval_secs,
        "heartbeats_sent": sent,
        "heartbeats_received": received,
        "unknown_messages": unknown_messages,
        "lines_pushed": args.lines,
        "exit_code": args.exit_code,
        "instance_id": instance_id,
        "health": pb.ServiceStatus.Name(health.status),
        "health_unknown_fields": unknown_fields(health),
    }
    print(json.dumps({"summary": summary}, sort_keys=True), flush=True)
    return 0


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A peer that speaks only the upstream OpenShell protocol.")
    parser.add_argument(
        "--stubs-dir", type=Path, help="compile the stubs here (default: a temporary directory)"
    )
    sub = parser.add_subparsers(dest="role", required=True)
    gw = sub.add_parser("gateway", help="an upstream-only gateway")
    gw.add_argument("--listen", required=True, metavar="HOST:PORT")
    gw.add_argument("--out", required=True, type=Path, help="append what was received here (JSON lines)")
    gw.add_argument("--heartbeat-secs", type=int, default=1)
    gw.add_argument("--crash-after-lines", type=int, default=0, metavar="K")
    gw.add_argument(
        "--keep-lines", type=int, default=100, metavar="N", help="lines kept of each request, as upstream"
    )
    gw.add_argument("--require-token", default="", metavar="TOKEN", help="refuse calls without this bearer")
    gw.add_argument("--stream-open", action="store_true", help="--require-token spares ConnectSupervisor")
    sv = sub.add_parser("supervisor", help="an upstream-only supervisor")
    sv.add_argument("--gateway", required=True, metavar="HOST:PORT")
    sv.add_argument("--sandbox-id", required=True)
    sv.add_argument("--instance-id", default="")
    sv.add_argument("--lines", type=int, required=True)
    sv.add_argument("--exit-code", type=int, required=True)
    sv.add_argument("--heartbeats", type=int, default=3, help="heartbeats that must come back before pushing")
    sv.add_argument("--chunk", type=int, default=100, help="log lines per PushSandboxLogsRequest")
    sv.add_argument("--timeout", type=float, default=20.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temporary = args.stubs_dir is None
    stubs_dir = Path(tempfile.mkdtemp(prefix="upstream-stubs-")) if temporary else args.stubs_dir
    try:
        pb, pb_grpc = load_stubs(stubs_dir)
        runner = run_gateway if args.role == "gateway" else run_supervisor
        return asyncio.run(runner(pb, pb_grpc, args))
    except Exception as exc:
        print(f"upstream {args.role} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if temporary:
            shutil.rmtree(stubs_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
