"""A real OTLP/gRPC receiver for tests: the collector's Logs and Metrics services, kept in memory.

A ``grpc.aio`` server on 127.0.0.1 with a free port, serving
``opentelemetry.proto.collector.logs.v1.LogsService/Export`` and
``opentelemetry.proto.collector.metrics.v1.MetricsService/Export`` with the stubs the
``opentelemetry-proto`` package ships: what an OpenTelemetry collector's OTLP receiver speaks. Every
request is kept as it arrived; the helpers flatten them into what a test asserts on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

T = TypeVar("T")


def any_value(value: AnyValue) -> Any:
    """An OTLP AnyValue as a plain Python value (the scalar kinds tests meet)."""
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


def attributes(items: Any) -> dict[str, Any]:
    pairs: list[KeyValue] = list(items)
    return {kv.key: any_value(kv.value) for kv in pairs}


@dataclass(frozen=True)
class ReceivedLog:
    resource: dict[str, Any]
    scope: str
    body: Any
    severity_number: int
    severity_text: str
    attributes: dict[str, Any]
    time_unix_nano: int


@dataclass(frozen=True)
class ReceivedPoint:
    resource: dict[str, Any]
    name: str
    kind: str  # gauge | sum | histogram | ...
    value: float
    attributes: dict[str, Any]
    monotonic: bool
    time_unix_nano: int


@dataclass
class OtlpReceiver:
    """Start with :meth:`start`, stop with :meth:`stop`; ``endpoint`` is what the supervisor dials."""

    log_requests: list[logs_service_pb2.ExportLogsServiceRequest] = field(default_factory=list)
    metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)
    port: int = 0
    _server: grpc.aio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server()
        # The generated registration functions carry no annotations.
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(self), server)  # type: ignore[no-untyped-call]
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(self), server)  # type: ignore[no-untyped-call]
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None

    # -- what arrived -----------------------------------------------------------------------

    def logs(self) -> list[ReceivedLog]:
        out: list[ReceivedLog] = []
        for request in self.log_requests:
            for rl in request.resource_logs:
                resource = attributes(rl.resource.attributes)
                for sl in rl.scope_logs:
                    for r in sl.log_records:
                        out.append(
                            ReceivedLog(
                                resource=resource,
                                scope=sl.scope.name,
                                body=any_value(r.body),
                                severity_number=r.severity_number,
                                severity_text=r.severity_text,
                                attributes=attributes(r.attributes),
                                time_unix_nano=r.time_unix_nano,
                            )
                        )
        return out

    def points(self, name: str | None = None) -> list[ReceivedPoint]:
        """Every number data point received, oldest first (optionally of one metric)."""
        out: list[ReceivedPoint] = []
        for request in self.metric_requests:
            for rm in request.resource_metrics:
                resource = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if name is not None and m.name != name:
                            continue
                        kind = m.WhichOneof("data")
                        if kind not in ("gauge", "sum"):
                            continue
                        data = getattr(m, kind)
                        monotonic = kind == "sum" and m.sum.is_monotonic
                        for p in data.data_points:
                            value = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
                            out.append(
                                ReceivedPoint(
                                    resource=resource,
                                    name=m.name,
                                    kind=kind,
                                    value=float(value),
                                    attributes=attributes(p.attributes),
                                    monotonic=monotonic,
                                    time_unix_nano=p.time_unix_nano,
                                )
                            )
        return out

    def last_value(self, name: str, **attrs: str) -> float | None:
        matching = [p for p in self.points(name) if all(p.attributes.get(k) == v for k, v in attrs.items())]
        return matching[-1].value if matching else None

    async def wait_for(self, check: Callable[[], T | None], *, within: float, what: str) -> T:
        """Poll ``check`` (without blocking the loop the server runs on) until it returns a value."""
        deadline = time.monotonic() + within
        while True:
            value = check()
            if value is not None and value is not False:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {within:.0f}s waiting for {what}; received "
                    f"{len(self.log_requests)} log and {len(self.metric_requests)} metric requests"
                )
            await asyncio.sleep(0.1)


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    async def Export(
        self, request: logs_service_pb2.ExportLogsServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        self.receiver.log_requests.append(request)
        return logs_service_pb2.ExportLogsServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    async def Export(
        self,
        request: metrics_service_pb2.ExportMetricsServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self.receiver.metric_requests.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()
