"""Optional OpenTelemetry export: the supervisor's metrics and the main process's lines over OTLP/gRPC.

Off by default (``telemetry.enabled``). When on, :class:`Telemetry` pushes to one OTLP gRPC
endpoint (a collector, or any backend that speaks OTLP):

- **Metrics**, read from the same :class:`~supervisor.metrics.SupervisorView` that ``/metrics``
  reads, through observable instruments whose callbacks run at each export: no second copy of any
  number. The table :data:`INSTRUMENTS` names them ``openshell.supervisor.<name>`` where
  ``openshell_supervisor_<name>`` is the Prometheus series with the same value, so a collector's
  Prometheus exporter turns them into the names ``/metrics`` already uses (counters gain
  ``_total`` there, as they do in our exposition). The heartbeat round trip is the last value seen
  (``openshell.supervisor.heartbeat_rtt``, seconds), not the histogram: a distribution cannot be
  rebuilt from the snapshot the callbacks read.
- **Logs**: every line of the main process that the capture produces becomes one OTel log record:
  body = the line, timestamp = when it was captured, attributes ``log.iostream`` (``stdout`` or
  ``stderr``, the semantic-convention name), ``openshell.sequence`` (the journal sequence the
  line was journaled under, when it was) and ``openshell.continued`` on the parts of a line that
  was split. Severity: **INFO for stdout, WARN for stderr**. A process's streams carry no level;
  stderr is where programs put diagnostics (Python's logging writes everything there), so ERROR
  would raise an alarm for every log line, while WARN keeps stderr findable in a severity filter;
  the stream itself stays in ``log.iostream`` for a pipeline that wants to map it otherwise. The
  supervisor's own log lines are not exported (its failure reports would feed the exporter
  reporting them).
- **Resource**: ``service.name`` (``telemetry.service_name``), ``service.instance.id`` (this
  supervisor's instance id), ``service.version`` and ``openshell.sandbox_id``, merged over what
  ``OTEL_RESOURCE_ATTRIBUTES`` adds (pod name, node, ...).

Threads: the rule is asyncio throughout, but the OTel SDK forces threads of its own, and this is
the one place they are accepted: the batch log processor exports from a worker thread and the
periodic metric reader collects and exports from another (both daemon threads). So the metric
callbacks run on the reader's thread: they only read attributes of the view (each read is atomic
under the GIL; nothing is written from there), exactly what a Prometheus scrape reads. Emitting a
log record from the event loop only appends to the processor's queue (bounded at
:data:`LOG_QUEUE_SIZE`; past it the oldest records are dropped, which never slows the capture).
:meth:`Telemetry.stop` flushes and shuts both down in a daemon thread of its own and waits at most
:data:`SHUTDOWN_TIMEOUT_S`: a slow or dead endpoint can lengthen the supervisor's exit by that much,
never hang it, and (daemon threads) never hold up the interpreter's exit either.

Failures never reach the sandbox: an endpoint that is down, slow or refusing costs failed exports
on the SDK's threads and nothing else. The SDK's own log output is silenced (it would print a
warning per retry, a traceback for some errors, a warning per dropped record); instead one warning
says that export to the endpoint is failing, with the reason the exporter gave, and one info line
says when it works again. The SDK is imported only when telemetry starts (hence the function-level
imports), so a supervisor with telemetry off pays nothing for it (some 50 ms of imports).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from openshell_wire import __version__
from openshell_wire.records import LogRecord, LogStream
from supervisor.view import SESSION_STATES, SupervisorView

if TYPE_CHECKING:
    # Types only: the SDK is imported when telemetry starts, never by a supervisor without it.
    from opentelemetry._logs import Logger, SeverityNumber
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
    from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

log = logging.getLogger(__name__)

#: How long :meth:`Telemetry.stop` waits for the last export before giving up on it. A healthy
#: endpoint takes milliseconds; this bound is reached only when the endpoint fails during the
#: final flush itself (the exporter retries within its own deadline). Counts towards the pod's
#: termination grace period, after process.stop_grace_s and session.exit_delivery_s (one window
#: from the main process's exit, a full disk's retries of the EXITED record included).
SHUTDOWN_TIMEOUT_S = 3.0
#: Log records waiting for the exporter; past this the oldest are dropped.
LOG_QUEUE_SIZE = 8192
#: The logger the OTLP gRPC exporter reports its failures on (captured for our one warning).
_EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.grpc.exporter"


class TelemetrySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        False,
        description="Push metrics and the main process's log lines to an OTLP gRPC endpoint "
        "(an OpenTelemetry collector). Export failures never affect the sandbox.",
    )
    endpoint: str = Field(
        "http://127.0.0.1:4317",
        description="OTLP gRPC endpoint: http://host:port (plaintext), https://host:port (TLS) or host:port.",
        min_length=3,
    )
    insecure: bool = Field(
        True,
        description="Plaintext gRPC. false: TLS with the system's roots (OTEL_EXPORTER_OTLP_CERTIFICATE "
        "and the client key variables are honoured). An https:// endpoint always uses TLS.",
    )
    export_interval_s: float = Field(
        15.0, gt=0, description="Period of the metric export; log records are sent in batches as they come."
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="gRPC metadata sent with every export, e.g. an authorization header for a "
        "hosted backend. Names must be lowercase.",
    )
    logs: bool = Field(True, description="Export the main process's stdout and stderr lines as log records.")
    metrics: bool = Field(True, description="Export the supervisor's metrics (the ones /metrics serves).")
    service_name: str = Field(
        "openshell-supervisor", min_length=1, description="The service.name resource attribute."
    )

    @field_validator("endpoint")
    @classmethod
    def _host_port(cls, value: str) -> str:
        parsed = urlparse(value if "://" in value else f"http://{value}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("expected http://host:port, https://host:port or host:port")
        try:
            port = parsed.port
        except ValueError:
            port = None
        if port is None:
            raise ValueError("the endpoint needs a port (the OTLP gRPC default is 4317)")
        return value

    @field_validator("headers")
    @classmethod
    def _lowercase(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [name for name in value if name != name.lower() or not name]
        if bad:
            raise ValueError(f"gRPC metadata names must be lowercase: {', '.join(sorted(bad))}")
        return value


# -- metrics ------------------------------------------------------------------------------------

Point = tuple[float, dict[str, str]]


@dataclass(frozen=True, slots=True)
class Instrument:
    """One exported metric: ``openshell.supervisor.<name>``, read from the view at each export."""

    name: str
    kind: Literal["gauge", "counter"]
    description: str
    read: Callable[[SupervisorView], Iterable[Point]]
    unit: str = ""


def _one(value: float | None) -> Iterable[Point]:
    return () if value is None else ((float(value), {}),)


def _session_states(view: SupervisorView) -> Iterable[Point]:
    state = view.session_status.state
    return [(float(state == name), {"state": name}) for name in SESSION_STATES]


def _rtt_s(view: SupervisorView) -> Iterable[Point]:
    rtt_ms = view.session_status.last_rtt_ms
    return _one(None if rtt_ms is None else rtt_ms / 1000)


def _unacked(view: SupervisorView) -> Iterable[Point]:
    stats = view.journal_stats
    return _one(max(stats.last_sequence - stats.acked_through, 0))


#: What is exported, with the same meaning (and, Prometheus-translated, the same name) as
#: supervisor.metrics' series. Each reader runs on the metric reader's thread: attribute reads only.
INSTRUMENTS: tuple[Instrument, ...] = (
    Instrument("main_process_up", "gauge", "1 while the main process runs.", lambda v: _one(v.main_running)),
    Instrument(
        "main_process_restarts",
        "counter",
        "Times the main process was started again after it exited.",
        lambda v: _one(v.restarts),
    ),
    Instrument(
        "main_process_last_exit_code",
        "gauge",
        "Exit code of the last main process that exited (128 + signal number for a signal).",
        lambda v: _one(v.last_exit_code),
    ),
    Instrument(
        "session_connected",
        "gauge",
        "1 while a session with the gateway is established.",
        lambda v: _one(v.session_status.state == "connected"),
    ),
    Instrument("session_state", "gauge", "The session's state: 1 for the current one.", _session_states),
    Instrument(
        "session_reconnects",
        "counter",
        "Sessions established again after the first one.",
        lambda v: _one(max(v.session_status.sessions - 1, 0)),
    ),
    Instrument(
        "session_connect_attempts",
        "counter",
        "Connection attempts to the gateway, successful or not.",
        lambda v: _one(v.session_status.attempts),
    ),
    Instrument("heartbeat_rtt", "gauge", "The last heartbeat round trip to the gateway.", _rtt_s, "s"),
    Instrument(
        "journal_bytes",
        "gauge",
        "Bytes of journal segments on disk.",
        lambda v: _one(v.journal_stats.bytes_on_disk),
        "By",
    ),
    Instrument(
        "journal_records",
        "gauge",
        "Records held in the journal, including acknowledged ones not yet trimmed.",
        lambda v: _one(v.journal_stats.records),
    ),
    Instrument("journal_unacked_records", "gauge", "Records not yet acknowledged by the gateway.", _unacked),
    Instrument(
        "journal_segments", "gauge", "Journal segment files.", lambda v: _one(v.journal_stats.segments)
    ),
    Instrument(
        "journal_dropped_records",
        "counter",
        "Log records dropped past the journal's byte bound (each drop is counted by a gap record).",
        lambda v: _one(v.journal_stats.dropped_records_total),
    ),
    Instrument(
        "journal_corrupt_records",
        "counter",
        "Records lost to corruption found in the journal.",
        lambda v: _one(v.journal_stats.corrupt_records_total),
    ),
)

METRIC_PREFIX = "openshell.supervisor."


def _callback(
    instrument: Instrument, view: SupervisorView
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    from opentelemetry.metrics import Observation  # noqa: PLC0415

    def observe(options: CallbackOptions) -> Iterator[Observation]:
        for value, attributes in instrument.read(view):
            yield Observation(value, attributes)

    return observe


# -- export health ------------------------------------------------------------------------------


class _ExportHealth(logging.Filter):
    """Whether exports to the endpoint work; one warning when they start failing, one line when
    they work again. Also the filter that swallows the OTLP exporter's own log records (keeping the
    last one as the reason), so the SDK's retries and tracebacks never reach the supervisor's log."""

    def __init__(self, endpoint: str) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.failing = False
        self.failures = 0
        self.closing = False
        self._reason = ""
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            self._reason = record.getMessage()
        return False

    def outcome(self, signal: str, ok: bool, error: BaseException | None = None) -> None:
        with self._lock:
            reason = repr(error) if error is not None else self._reason
            self._reason = ""
            if ok:
                recovered, self.failing = self.failing, False
                first = False
            else:
                self.failures += 1
                first, self.failing = not self.failing, True
                recovered = False
        if first:
            log.warning(
                "telemetry: exporting %s to %s failed (%s); the sandbox is not affected, "
                "export goes on trying",
                signal,
                self.endpoint,
                reason or "no detail",
            )
        elif recovered:
            log.info("telemetry: exporting to %s works again", self.endpoint)

    def skip(self) -> bool:
        """At shutdown, with the endpoint failing, do not wait on one more failed attempt."""
        return self.closing and self.failing


def _succeeded(result: object) -> bool:
    # LogRecordExportResult / MetricExportResult: compared by name so the SDK's renames of the
    # result enums between versions cannot turn a success into a reported failure.
    return getattr(result, "name", "") == "SUCCESS"


def _log_exporter(inner: LogRecordExporter, health: _ExportHealth) -> LogRecordExporter:
    from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult  # noqa: PLC0415

    class ReportingLogExporter(LogRecordExporter):
        def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
            if health.skip():
                return LogRecordExportResult.FAILURE
            try:
                result = inner.export(batch)
            except Exception as exc:
                health.outcome("logs", False, exc)
                return LogRecordExportResult.FAILURE
            health.outcome("logs", _succeeded(result))
            return result

        def shutdown(self) -> None:
            inner.shutdown()  # type: ignore[no-untyped-call]  # untyped in the SDK's base class

        def force_flush(self, timeout_millis: int = 30_000) -> bool:
            return True  # nothing is held here: each batch is exported as it comes

    return ReportingLogExporter()


def _metric_exporter(inner: MetricExporter, health: _ExportHealth) -> MetricExporter:
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult  # noqa: PLC0415

    class ReportingMetricExporter(MetricExporter):
        def export(
            self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: object
        ) -> MetricExportResult:
            if health.skip():
                return MetricExportResult.FAILURE
            try:
                result = inner.export(metrics_data, timeout_millis=timeout_millis)
            except Exception as exc:
                health.outcome("metrics", False, exc)
                return MetricExportResult.FAILURE
            health.outcome("metrics", _succeeded(result))
            return result

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return inner.force_flush(timeout_millis=timeout_millis)

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
            inner.shutdown(timeout_millis=timeout_millis)

    # Cumulative temporality and default aggregations (the base class's defaults): observable
    # counters report the running totals the view holds.
    return ReportingMetricExporter()


# -- the exporter -------------------------------------------------------------------------------


class Telemetry:
    """The OTLP export of one supervisor; ``start``, then ``emit_line`` per captured line, then ``stop``.

    Building it is free: the SDK is imported and its threads are started by :meth:`start`. Nothing
    here raises into the supervisor: a start that fails is logged and leaves telemetry off.
    """

    def __init__(self, settings: TelemetrySettings, view: SupervisorView) -> None:
        self.settings = settings
        self.view = view
        self.health = _ExportHealth(settings.endpoint)
        self.lines_emitted = 0
        self._logger_provider: LoggerProvider | None = None
        self._meter_provider: MeterProvider | None = None
        self._logger: Logger | None = None
        self._severity: dict[LogStream, tuple[SeverityNumber, str]] = {}

    @property
    def running(self) -> bool:
        return self._logger_provider is not None or self._meter_provider is not None

    def start(self) -> None:
        try:
            self._start()
        except Exception as exc:
            log.warning("telemetry could not start and stays off: %s", exc)
            self._quiet(False)
            self._shutdown_providers(deadline=time.monotonic() + 1.0)

    def _start(self) -> None:
        from opentelemetry._logs import SeverityNumber  # noqa: PLC0415
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter  # noqa: PLC0415
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter  # noqa: PLC0415
        from opentelemetry.sdk._logs import LoggerProvider  # noqa: PLC0415
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor  # noqa: PLC0415
        from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader  # noqa: PLC0415
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415

        s = self.settings
        self._quiet(True)
        resource = Resource.create(
            {
                "service.name": s.service_name,
                "service.instance.id": self.view.instance_id,
                "service.version": __version__,
                "openshell.sandbox_id": self.view.sandbox_id,
            }
        )
        # The exporter's own deadline (it retries within it); an export never outlives an interval
        # by much, and never more than 10 s.
        timeout_s = min(10.0, max(s.export_interval_s, 1.0))
        headers = dict(s.headers)
        if s.logs:
            inner_logs = OTLPLogExporter(
                endpoint=s.endpoint, insecure=s.insecure, headers=headers, timeout=timeout_s
            )
            provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
            provider.add_log_record_processor(
                BatchLogRecordProcessor(
                    _log_exporter(inner_logs, self.health),
                    schedule_delay_millis=min(s.export_interval_s, 1.0) * 1000,
                    max_queue_size=LOG_QUEUE_SIZE,
                )
            )
            self._logger_provider = provider
            self._logger = provider.get_logger("openshell.supervisor.capture", __version__)
            self._severity = {
                LogStream.STDOUT: (SeverityNumber.INFO, "INFO"),
                LogStream.STDERR: (SeverityNumber.WARN, "WARN"),
                LogStream.SUPERVISOR: (SeverityNumber.INFO, "INFO"),
            }
        if s.metrics:
            inner_metrics = OTLPMetricExporter(
                endpoint=s.endpoint, insecure=s.insecure, headers=headers, timeout=timeout_s
            )
            reader = PeriodicExportingMetricReader(
                _metric_exporter(inner_metrics, self.health),
                export_interval_millis=s.export_interval_s * 1000,
                export_timeout_millis=timeout_s * 1000,
            )
            meters = MeterProvider(metric_readers=[reader], resource=resource, shutdown_on_exit=False)
            self._meter_provider = meters
            meter = meters.get_meter("openshell.supervisor", __version__)
            for instrument in INSTRUMENTS:
                make = (
                    meter.create_observable_gauge
                    if instrument.kind == "gauge"
                    else meter.create_observable_counter
                )
                make(
                    METRIC_PREFIX + instrument.name,
                    callbacks=[_callback(instrument, self.view)],
                    unit=instrument.unit,
                    description=instrument.description,
                )
        log.info(
            "telemetry export started",
            extra={
                "endpoint": s.endpoint,
                "logs": s.logs,
                "metrics": s.metrics,
                "interval_s": s.export_interval_s,
            },
        )

    def emit_line(self, record: LogRecord, sequence: int | None) -> None:
        """One captured line as an OTel log record (a queue append; the export is batched)."""
        logger = self._logger
        if logger is None:
            return
        try:
            severity, text = self._severity[record.stream]
            attributes: dict[str, str | int | bool] = {"log.iostream": record.stream.value}
            if sequence is not None:
                attributes["openshell.sequence"] = sequence
            if record.continued:
                attributes["openshell.continued"] = True
            logger.emit(
                timestamp=time.time_ns(),
                severity_number=severity,
                severity_text=text,
                body=record.message,
                attributes=attributes,
            )
            self.lines_emitted += 1
        except Exception as exc:
            # Never let telemetry stop the capture; say it once and stop trying.
            self._logger = None
            log.warning("telemetry: log records can no longer be emitted: %r", exc)

    async def stop(self) -> None:
        """Flush and shut down within :data:`SHUTDOWN_TIMEOUT_S`; never raises, never hangs."""
        if not self.running:
            return
        self._logger = None
        self.health.closing = True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def shutdown() -> None:
            try:
                self._shutdown_providers(deadline=time.monotonic() + SHUTDOWN_TIMEOUT_S)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                    loop.call_soon_threadsafe(finished)

        # A daemon thread, not asyncio.to_thread: the default executor is joined when asyncio.run
        # ends, which would let a stuck export hold the supervisor's exit.
        threading.Thread(target=shutdown, name="telemetry-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), SHUTDOWN_TIMEOUT_S + 0.5)
        except TimeoutError:
            # The thread goes on (a daemon: it cannot hold the exit); its reports stay swallowed.
            log.warning("telemetry: the last export did not finish in %gs; it is dropped", SHUTDOWN_TIMEOUT_S)
            return
        if self.health.failures:
            log.info(
                "telemetry: %d exports to %s failed during this run",
                self.health.failures,
                self.settings.endpoint,
            )
        self._quiet(False)

    def _shutdown_providers(self, deadline: float) -> None:
        logs, self._logger_provider = self._logger_provider, None
        meters, self._meter_provider = self._meter_provider, None

        def left_ms() -> float:
            return max(deadline - time.monotonic(), 0.0) * 1000

        if logs is not None:
            try:
                logs.force_flush(timeout_millis=int(left_ms()))
                logs.shutdown()
            except Exception as exc:
                log.debug("telemetry: log shutdown: %r", exc)
        if meters is not None:
            try:
                # Shutdown collects and exports once more: the final values (main process down,
                # its exit code) reach the endpoint.
                meters.shutdown(timeout_millis=left_ms())
            except Exception as exc:
                log.debug("telemetry: metric shutdown: %r", exc)

    def _quiet(self, on: bool) -> None:
        """Silence the SDK's own log output while we run (our health reports replace it)."""
        exporter_log = logging.getLogger(_EXPORTER_LOGGER)
        if on:
            logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
            # Its own level so that its warnings reach the filter, which keeps them as reasons.
            exporter_log.setLevel(logging.WARNING)
            exporter_log.addFilter(self.health)
        else:
            exporter_log.removeFilter(self.health)
