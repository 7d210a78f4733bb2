"""The supervisor's HTTP endpoints: probes for the kubelet, metrics for Prometheus, status for agents.

==========  =====================================================================================
/healthz    200 while the supervisor loop is alive: its heartbeat (``SupervisorView.loop_heartbeat``)
            is younger than ``healthz_stale_after_s``; 503 otherwise. Only the supervisor's own
            liveness: a main process that exited or a gateway that is gone must not get the pod
            killed (the design keeps the sandbox running through a cut).
/readyz     200 while the main process runs and the optional readiness check passes
            (:mod:`supervisor.readiness`); 503 with the reason otherwise.
/metrics    Prometheus exposition of :class:`supervisor.metrics.SupervisorMetrics` (text or
            OpenMetrics, as the scraper's Accept header asks).
/status     one JSON document with the whole picture (main process, session, journal, readiness,
            health: the latest sample and verdict of :mod:`supervisor.health`), for agents and
            scripts: what a person would piece together from the other three.
==========  =====================================================================================

Every handler only reads state the supervisor already keeps, through :class:`SupervisorView`: no
handler waits on the journal, the session or the main process, so a probe answers in microseconds
even while the supervisor is busy, and a slow readiness check cannot slow a probe (it runs in the
background, see :class:`supervisor.readiness.ReadinessProbe`). If the event loop itself is stuck,
no handler runs at all and the kubelet's probe timeout notices, which is the right outcome.

Errors are JSON objects ``{"error": ...}`` like the gateway's API, so a client parses every answer
the same way. :class:`HttpServer` owns the aiohttp runner and the readiness probe task, started by
``start`` and cancelled and awaited by ``stop``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from openshell_wire import __version__
from supervisor.endpoint_settings import HttpSettings, ReadinessSettings
from supervisor.metrics import SupervisorMetrics
from supervisor.readiness import ReadinessProbe
from supervisor.view import SupervisorView, health_of, monotonic_age

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpStartError(Exception):
    """The HTTP endpoints cannot start (bad address, port taken); the message says why."""


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise HttpStartError(f"{address!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def _wall_clock(monotonic_at: float | None) -> float | None:
    """A ``time.monotonic()`` instant as Unix time, for documents read outside this process."""
    if monotonic_at is None:
        return None
    return time.time() - (time.monotonic() - monotonic_at)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own answers (unknown route, wrong method) come as text/plain.
        return web.json_response({"error": exc.reason}, status=exc.status, headers=_allow(exc))


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


class _Endpoints:
    def __init__(
        self,
        view: SupervisorView,
        metrics: SupervisorMetrics,
        readiness: ReadinessProbe,
        stale_after_s: float,
    ) -> None:
        self.view = view
        self.metrics = metrics
        self.readiness = readiness
        self.stale_after_s = stale_after_s

    def _loop_age(self) -> float:
        age = monotonic_age(self.view.loop_heartbeat)
        return age if age is not None else float("inf")

    def alive(self) -> bool:
        return self._loop_age() <= self.stale_after_s

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        age = self._loop_age()
        alive = age <= self.stale_after_s
        body: dict[str, Any] = {"alive": alive, "loop_heartbeat_age_s": round(age, 3)}
        if not alive:
            body["reason"] = f"supervisor loop silent for {age:.1f}s (limit {self.stale_after_s:g}s)"
        return web.json_response(body, status=200 if alive else 503)

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        verdict = self.readiness.verdict(self.view.main_running)
        return web.json_response(
            {"ready": verdict.ready, "reason": verdict.reason}, status=200 if verdict.ready else 503
        )

    async def metrics_text(self, request: web.Request) -> web.StreamResponse:
        # Prometheus asks for OpenMetrics in its Accept header; curl gets the classic text format.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def status(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.document())

    def document(self) -> dict[str, Any]:
        """The /status document (also handy for logging a snapshot)."""
        view = self.view
        s = view.session_status
        main_running = view.main_running
        connected_for = monotonic_age(s.connected_since)
        journal = dataclasses.asdict(view.journal_stats)
        journal["unacked_records"] = max(journal["last_sequence"] - journal["acked_through"], 0)
        age = self._loop_age()
        return {
            "sandbox_id": view.sandbox_id,
            "instance_id": view.instance_id,
            "version": __version__,
            "time": time.time(),
            "supervisor": {
                "pid": os.getpid(),
                "alive": age <= self.stale_after_s,
                "loop_heartbeat_age_s": round(age, 3),
            },
            "main_process": {
                "pid": view.main_pid,
                "running": main_running,
                "started_at": view.started_at,
                "restarts": view.restarts,
                "last_exit_code": view.last_exit_code,
            },
            "session": {
                "state": s.state,
                "connected": s.state == "connected",
                "mode": s.mode,
                "session_id": s.session_id,
                "attempts": s.attempts,
                "sessions": s.sessions,
                "reconnects": max(s.sessions - 1, 0),
                "last_error": s.last_error,
                "last_rtt_ms": s.last_rtt_ms,
                "connected_since": _wall_clock(s.connected_since),
                "connected_for_s": round(connected_for, 3) if connected_for is not None else None,
            },
            "journal": journal,
            "readiness": self.readiness.to_json(main_running),
            "health": _health_json(view),
        }


def _health_json(view: SupervisorView) -> dict[str, Any]:
    monitor = health_of(view)
    if monitor is None:
        return {"enabled": False}
    return monitor.to_json()


def build_app(
    view: SupervisorView,
    metrics: SupervisorMetrics,
    readiness: ReadinessProbe,
    *,
    healthz_stale_after_s: float = 10.0,
) -> web.Application:
    """The aiohttp application alone (no socket, no probe task): what tests serve directly."""
    endpoints = _Endpoints(view, metrics, readiness, healthz_stale_after_s)
    app = web.Application(middlewares=[_json_errors])
    app.router.add_get("/healthz", endpoints.healthz)
    app.router.add_get("/readyz", endpoints.readyz)
    app.router.add_get("/metrics", endpoints.metrics_text)
    app.router.add_get("/status", endpoints.status)
    return app


class HttpServer:
    """The endpoints on a socket, plus the readiness probe task; ``start`` then ``stop``.

    ``metrics`` may be built beforehand (so the session can report heartbeat round trips into it
    before the server starts); otherwise one is made over ``view``.
    """

    def __init__(
        self,
        settings: HttpSettings,
        view: SupervisorView,
        *,
        readiness: ReadinessSettings | None = None,
        metrics: SupervisorMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.view = view
        self.metrics = metrics if metrics is not None else SupervisorMetrics(view)
        # Only a running main process is checked; its pid ties each result to that process.
        self.readiness = ReadinessProbe(
            readiness if readiness is not None else ReadinessSettings(),
            lambda: view.main_pid if view.main_running else None,
        )
        self.metrics.set_ready_source(lambda: self.readiness.verdict(view.main_running).ready)
        self.app = build_app(
            view, self.metrics, self.readiness, healthz_stale_after_s=settings.healthz_stale_after_s
        )
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._probe: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host, _ = split_host_port(self.settings.listen)
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        host, port = split_host_port(self.settings.listen)
        # Probes and scrapes are short; the timeout only bounds a stuck client at shutdown.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise HttpStartError(
                f"cannot listen for HTTP on {self.settings.listen}: {exc.strerror or exc}"
            ) from None
        self._runner = runner
        # With port 0 the kernel picks one; the runner knows which.
        self.port = int(runner.addresses[0][1]) if runner.addresses else port
        if self.readiness.enabled:
            self._probe = asyncio.create_task(self.readiness.run(), name="readiness-probe")
            self._probe.add_done_callback(_report_unexpected_end)
        log.info("http endpoints ready", extra={"url": self.url, "readiness": self.readiness.settings.kind})

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _report_unexpected_end(task: asyncio.Task[None]) -> None:
    """The probe runs until cancelled; anything else leaves /readyz frozen and must be seen."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.critical("background task %s ended unexpectedly: %r", task.get_name(), exc, exc_info=exc)
