"""The gateway's operations listener (``ops.listen``, default 127.0.0.1:7090): probes and metrics,
apart from the HTTP API so that the API's authentication covers the whole API.

/healthz    200 ``{"status": "ok"}`` while the process's event loop answers (liveness: nothing
            else is checked, so a database outage never gets the gateway restarted).
/readyz     200 ``{"ready": true, "checks": {...}}`` when the gateway can do its work: the
            database answers a read within ``READY_DB_TIMEOUT_S`` and its schema is at the
            migrations' head, or past it (a schema missing or older than this gateway is not
            ready: run ``openshell-gateway migrate``; one that a rollout's migration moved past
            this running replica is served on, see ``Readiness``), and the gRPC server is serving
            (started, not shutting down). 503 with the failed check's reason otherwise.
/metrics    the Prometheus exposition (:mod:`gateway.metrics`).
/status     200, what this replica is and what it decided at start, for an operator: its version,
            replica id and run, whether it drains, and its driver (the Kubernetes driver's
            supervisor injection: :mod:`gateway.drivers.injection`).

gRPC health (``grpc.health.v1``, services ``""`` and ``openshell.v1.OpenShell``) gives the same
verdict as /readyz: :class:`HealthFollower` asks :class:`Readiness` every ``HEALTH_INTERVAL_S`` and
sets both services NOT_SERVING while it fails (the database unreachable, its schema missing or older
than this gateway), SERVING again once it passes, so a gRPC-aware balancer or probe stops routing
supervisors to a replica that could only reject them. A change is logged once, not every check.

Nothing else is served there, and nothing there needs a credential: keep the listener pod-local
or reachable only by the kubelet and Prometheus (the chart's NetworkPolicy). It speaks plain HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimitedLog
from gateway.sandbox_state import Liveness
from gateway.store import Database, SandboxStore, utcnow
from gateway.store.db import describe_error, packaged_heads, schema_state, unreachable_reason

log = logging.getLogger(__name__)

#: A readiness probe waits this long for the database (the kubelet's default timeout is 1 s, the
#: chart's 3 s); a check still running is shared by the probes that come meanwhile.
READY_DB_TIMEOUT_S = 2.0
#: How often gRPC health asks for the readiness verdict.
HEALTH_INTERVAL_S = 2.0


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


def schema_heads() -> frozenset[str]:
    """The packaged migrations' head revisions (what ``alembic_version`` holds once migrated)."""
    return packaged_heads()


class Readiness:
    """The database half of /readyz, run in a task this object owns: one check at a time, however
    many probes come, and a probe never cancels it (SQLAlchemy finishes a connection's cleanup on
    a hung server before it lets a cancellation through)."""

    def __init__(self, db: Database, *, grpc_serving: Callable[[], bool]) -> None:
        self._db = db
        self._grpc_serving = grpc_serving
        self._checking: asyncio.Task[Verdict] | None = None
        self._log = RateLimitedLog(log, concern="readiness")

    async def _check_database(self) -> Verdict:
        try:
            async with self._db.engine.connect() as conn:
                state = await conn.run_sync(schema_state)
        except Exception as exc:  # any failure of the database is "not ready", with its reason
            return Verdict(False, f"database: {describe_error(exc)}")
        if state.unknown:
            # A rollout migrates before its new pods start (the chart's hook), so the replicas still
            # running the previous version see a schema newer than theirs: they serve on, or every
            # rollout would empty the Service. Revisions are additive for that reason (see
            # docs/architecture.md, "Migrations"); a restart of this version is refused instead.
            return Verdict(
                True,
                f"reachable, schema at {', '.join(sorted(state.current))}, newer than this gateway's "
                f"{', '.join(sorted(state.heads))}: serving on until replaced (a restart is refused)",
            )
        if not state.at_head:
            # Missing or older (not migrated yet), said so with what to run.
            return Verdict(False, state.describe())
        return Verdict(True, "reachable, schema at head")

    async def check(self) -> dict[str, Verdict]:
        if self._checking is None or self._checking.done():
            self._checking = asyncio.create_task(self._check_database(), name="readiness-check")
        try:
            database = await asyncio.wait_for(asyncio.shield(self._checking), READY_DB_TIMEOUT_S)
        except TimeoutError:
            # New connections are retried while the server is unreachable: say why they fail.
            why = unreachable_reason(self._db.engine)
            database = Verdict(
                False,
                f"database: no answer within {READY_DB_TIMEOUT_S:.0f}s"
                + (f" (unreachable: {why})" if why else ""),
            )
        grpc = Verdict(True, "serving") if self._grpc_serving() else Verdict(False, "gRPC server not serving")
        verdicts = {"database": database, "grpc": grpc}
        failed = "; ".join(v.reason for v in verdicts.values() if not v.ok)
        if failed:
            self._log.log(logging.WARNING, ("not-ready", failed), f"not ready: {failed}")
        return verdicts

    async def close(self) -> None:
        if self._checking is not None:
            checking, self._checking = self._checking, None
            checking.cancel()
            # Bounded like the metrics' count: the shutdown has one deadline for all its phases.
            await asyncio.wait({checking}, timeout=0.5)
            if checking.done() and not checking.cancelled():
                checking.exception()
        self._log.close()


class HealthFollower:
    """Keeps gRPC health on the readiness verdict, in a task it owns (see the module docstring).
    ``set_serving`` is given the new verdict only when it changes, and once at the start."""

    def __init__(
        self,
        readiness: Readiness,
        *,
        set_serving: Callable[[bool], Awaitable[None]],
        interval_s: float = HEALTH_INTERVAL_S,
    ) -> None:
        self._readiness = readiness
        self._set_serving = set_serving
        self._interval_s = interval_s
        self._serving: bool | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool | None:
        return self._serving

    async def start(self) -> None:
        """Give the first verdict now (a gateway that says it is ready answers health with it),
        then follow in the owned task."""
        await self._check()
        self._task = asyncio.create_task(self._follow(), name="grpc-health-follower")

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self._check()

    async def _check(self) -> None:
        try:
            verdicts = await self._readiness.check()
        except Exception as exc:  # a bug in a check must not leave health stuck on its last word
            log.error("readiness check failed: %r", exc, exc_info=exc)
            verdicts = {"check": Verdict(False, f"readiness check failed: {exc!r}")}
        serving = all(v.ok for v in verdicts.values())
        if serving != self._serving:
            if self._serving is not None:
                reasons = "; ".join(v.reason for v in verdicts.values() if not v.ok)
                if serving:
                    log.info("gRPC health SERVING again: ready")
                else:
                    log.warning("gRPC health NOT_SERVING: %s", reasons)
            self._serving = serving
            await self._set_serving(serving)

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            # Bounded: a check stuck on a hung database is the Readiness' task, shielded from this.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=0.5)


def build_ops(
    *,
    metrics: GatewayMetrics,
    sandboxes: SandboxStore,
    readiness: Readiness,
    liveness: Liveness,
    status: Callable[[], dict[str, Any]] = dict,
    now: Callable[[], datetime] = utcnow,
) -> web.Application:
    """The ops listener's application: /healthz, /readyz, /metrics and /status, nothing else."""

    async def healthz(request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.StreamResponse:
        verdicts = await readiness.check()
        ready = all(v.ok for v in verdicts.values())
        body = {
            "ready": ready,
            "checks": {name: {"ok": v.ok, "reason": v.reason} for name, v in verdicts.items()},
        }
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_text(request: web.Request) -> web.StreamResponse:
        # Sandboxes by state, by the same rule as the API's: counted again when the last count is
        # older than a few seconds, in a task the metrics own (GatewayMetrics).
        await metrics.count_sandboxes(sandboxes, now=now(), liveness=liveness)
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status_doc(request: web.Request) -> web.StreamResponse:
        return web.json_response(status())

    app = web.Application()
    app.router.add_get("/status", status_doc)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
    return app
