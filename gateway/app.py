"""The gateway process: one object that owns every server and background task.

``Gateway.start`` opens the database (running migrations), starts the gRPC server (our
service plus the standard gRPC health service, both registered through :mod:`gateway.rpc`, which
decodes frames itself and answers store failures UNAVAILABLE), the HTTP API, the operations
listener (:mod:`gateway.ops`: /healthz, /readyz, /metrics) and the task that flushes heartbeat
times in batches. ``Gateway.stop`` ends sessions, stops the servers with a grace
period, flushes once more, gives the disconnection writes still retrying what is left of its
deadline, and closes the database, in that order, so nothing acknowledged is left unwritten; the
phases share one deadline (``STOP_MARGIN_S`` past the grace period), so a database that hangs
cannot hold the shutdown past the pod's grace period.

A flush that fails (the store is away) is logged without a traceback, at most once a minute, and
its times are flushed again with the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import grpc
from aiohttp import web
from grpc import aio
from grpc_health.v1 import health, health_pb2

from gateway.admission import Admission
from gateway.api import build_api
from gateway.auth.people import PeopleAuth
from gateway.auth.sandbox_tokens import SandboxTokens
from gateway.auth.supervisors import SupervisorAuthenticator
from gateway.config import GatewayConfig
from gateway.drain import SHUTDOWN, Drainer
from gateway.drivers import Provisioner
from gateway.drivers.local import LocalProvisioner
from gateway.heartbeats import HeartbeatGovernor
from gateway.metrics import GatewayMetrics
from gateway.notify import Note, Notifier, Topic, notifier_for
from gateway.ops import HealthFollower, Readiness, build_ops
from gateway.otlp_logs import OtlpLogExport
from gateway.rebalance import Rebalancer
from gateway.replicas import (
    LeaseRenewer,
    LeaseStartError,
    LeaseView,
    ReplicaIdentity,
    advertise_address,
    this_replica,
)
from gateway.retention import Retention
from gateway.routing import CommandRouter
from gateway.rpc import CallGuard, RateLimitedLog, add_service
from gateway.sandbox_state import Liveness
from gateway.server import OpenShellService, server_options
from gateway.sessions import SessionRegistry
from gateway.store import CommandStore, Database, EventStore, SandboxStore, StoreError
from gateway.store.leadership import LeadershipStore
from gateway.store.replicas import ReplicaStore
from gateway.store.retention import EventRetention
from gateway.store.signing_keys import SigningKeyStore
from gateway.tasks import BackgroundTasks
from gateway.tls import HttpTls, TlsError, grpc_credentials
from gateway.tls import load as load_tls
from openshell_wire import __version__
from openshell_wire.v1 import inference_pb2
from openshell_wire.v1 import openshell_pb2 as pb

log = logging.getLogger(__name__)

#: ``Gateway.stop`` ends within ``grpc.shutdown_grace_s`` + this. The chart's
#: terminationGracePeriodSeconds is preStopSeconds + drain settle + window (``Gateway.drain``) +
#: grpc.shutdownGraceSeconds + 10: the last 2 s are for the process to exit.
STOP_MARGIN_S = 8.0
#: At most this long (of the margin) to stop the HTTP API.
HTTP_STOP_S = 5.0
#: How long a shutdown waits to mark this replica draining in its lease row (best effort).
DRAIN_MARK_S = 1.0
#: Kept (of the margin) for closing the database after the disconnection writes.
CLOSE_RESERVE_S = 1.5


class GatewayStartError(Exception):
    """The gateway cannot start; the message says why (port taken, database unreachable...)."""


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise GatewayStartError(f"{address!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.registry = SessionRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self._flush_log = RateLimitedLog(log, concern="heartbeat-flush")
        self._guard: CallGuard | None = None
        self.db: Database | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.ops_port = 0
        self._server: aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._ops_runner: web.AppRunner | None = None
        self._readiness: Readiness | None = None
        self._notifier: Notifier | None = None
        self._router: CommandRouter | None = None
        self._health: HealthFollower | None = None
        self._health_servicer: health.aio.HealthServicer | None = None
        self._http_tls: HttpTls | None = None
        #: True from the gRPC server's start to the beginning of the shutdown (/readyz reads it).
        self._grpc_serving = False
        self._flusher: asyncio.Task[None] | None = None
        self._sandboxes: SandboxStore | None = None
        self._service: OpenShellService | None = None
        self._authenticator: SupervisorAuthenticator | None = None
        self._provisioner: Provisioner | None = None
        self._local: LocalProvisioner | None = None  # with drivers.kind=local
        #: This replica's lease row (gateway.replicas), renewed from just before gRPC serves.
        self._renewer: LeaseRenewer | None = None
        #: The replicas' lease rows as this replica last read them (set by start()).
        self._lease_view: LeaseView | None = None
        #: Which hellos are worked on (drain, bounds, fair share): one per process.
        self.admission = Admission(
            config.admission, sessions=lambda: len(self.registry), metrics=self.metrics
        )
        #: The long-lived loops of this process (rebalancer, heartbeat governor, drain), cancelled
        #: by stop().
        self.tasks = BackgroundTasks("gateway")
        #: The OTLP log export (otlp_logs.enabled), released at stop for another replica to take over.
        self._otlp: OtlpLogExport | None = None
        #: When the drain began (loop time; None: serving). See begin_drain().
        self._draining_since: float | None = None
        #: begin_drain's awaited steps (health, lease mark, leader step-down), run once as their own
        #: task: a second signal cancelling the drain does not cancel them, stop() awaits the rest.
        self._drain_steps: asyncio.Task[None] | None = None
        #: The heartbeat interval this replica hands out (adaptive: sessions.max_heartbeats_per_s).
        self.heartbeats = HeartbeatGovernor(config.sessions, registry=self.registry, metrics=self.metrics)

    @property
    def sandboxes(self) -> SandboxStore:
        assert self._sandboxes is not None, "start() first"
        return self._sandboxes

    async def sandbox_token(self, sandbox_id: str, *, generation: int) -> str | None:
        """A minted token for a sandbox this process starts itself (the demo); None when
        supervisor auth is off."""
        assert self._authenticator is not None, "start() first"
        if not self._authenticator.required:
            return None
        return (await self._authenticator.tokens.mint(sandbox_id, generation=generation)).token

    @property
    def grpc_address(self) -> str:
        host, _ = split_host_port(self.config.grpc.listen)
        return f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        host, _ = split_host_port(self.config.http.listen)
        scheme = "https" if self.config.http.tls.enabled else "http"
        return f"{scheme}://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.http_port}"

    @property
    def ops_url(self) -> str:
        host, _ = split_host_port(self.config.ops.listen)
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.ops_port}"

    async def start(self) -> None:
        cfg = self.config
        #: Resolved once per start: every part that names this replica uses the same identity.
        self.identity: ReplicaIdentity = this_replica(cfg.ha)
        self.db = await Database.open(
            cfg.database.url, migrate=cfg.database.migrate_on_start, settings=cfg.database
        )
        self._sandboxes = SandboxStore(self.db)
        events = EventStore(self.db)
        # Commands and event batches committed on any replica wake this one (issue 20 point 3).
        notifier = self._notifier = notifier_for(
            self.db.engine.url,
            self.db.engine.dialect,
            replica=self.identity.id,
            connect_timeout_s=cfg.database.connect_timeout_s,
        )
        commands = CommandStore(self.db, notifier=notifier)

        # Only at debug level: a note of each call's credential (issue 8 will validate it).
        interceptors = [_CredentialNote()] if log.isEnabledFor(logging.DEBUG) else []
        server = aio.server(options=list(server_options(cfg)), interceptors=interceptors)
        self._authenticator = SupervisorAuthenticator(
            cfg,
            tokens=SandboxTokens(cfg.auth.supervisors, SigningKeyStore(self.db)),
            sandboxes=self._sandboxes,
            metrics=self.metrics,
        )
        self._service = OpenShellService(
            config=cfg,
            registry=self.registry,
            sandboxes=self._sandboxes,
            events=events,
            commands=commands,
            metrics=self.metrics,
            authenticator=self._authenticator,
            identity=self.identity,
            # Hellos wait for this run's lease row (written before serving, except on a schema
            # not migrated yet: see below).
            lease_written=lambda: self._renewer is not None and self._renewer.written,
            # Always: admission.enabled switches off the bounds only, a draining replica still
            # refuses every hello.
            admission=self.admission,
            heartbeats=self.heartbeats,
        )
        guard = self._guard = CallGuard(metrics=self.metrics)
        add_service(server, pb.DESCRIPTOR.services_by_name["OpenShell"], self._service, guard=guard)
        # Upstream's supervisor asks this one for its inference routes: the same service answers
        # (OpenShellService.GetInferenceBundle, with the same credentials), so it gets none.
        add_service(
            server, inference_pb2.DESCRIPTOR.services_by_name["Inference"], self._service, guard=guard
        )
        health_servicer = self._health_servicer = health.aio.HealthServicer()
        add_service(server, health_pb2.DESCRIPTOR.services_by_name["Health"], health_servicer, guard=guard)
        try:
            # Both listeners' files are checked before anything listens: a bad file stops the start.
            grpc_tls = load_tls(cfg.grpc.tls, listener="gRPC")
            http_tls_files = load_tls(cfg.http.tls, listener="HTTP API")
            self._http_tls = HttpTls(http_tls_files) if http_tls_files is not None else None
            if grpc_tls is not None:
                self.grpc_port = server.add_secure_port(cfg.grpc.listen, grpc_credentials(grpc_tls))
            else:
                self.grpc_port = server.add_insecure_port(cfg.grpc.listen)
        except TlsError as exc:
            await self.db.close()
            self.db = None
            raise GatewayStartError(str(exc)) from None
        except RuntimeError as exc:
            await self.db.close()
            self.db = None
            raise GatewayStartError(f"cannot listen for gRPC on {cfg.grpc.listen}: {exc}") from None
        replicas = ReplicaStore(self.db)
        self._renewer = LeaseRenewer(
            replicas,
            identity=self.identity,
            address=advertise_address(cfg),
            ha=cfg.ha,
            sessions=lambda: len(self.registry),
        )
        # The lease is written before the first session can name this replica its owner: start()
        # retries for up to ha.lease_s, and without a lease this replica does not serve. On a
        # schema still missing or older (not migrated here) the lease cannot be written until the
        # migration job has run: this replica serves not ready meanwhile and renews from then on,
        # refusing hellos (OVERLOADED, retried) until its first renewal has written the row.
        try:
            if self.db.schema_ready_at_open:
                await self._renewer.start()
            else:
                self._renewer.start_in_background()
        except LeaseStartError as exc:
            self._renewer = None
            await self.db.close()
            self.db = None
            raise GatewayStartError(str(exc)) from None
        lease_view = self._lease_view = LeaseView(replicas, ha=cfg.ha, timeout_s=cfg.grpc.store_timeout_s)
        # A follower of a sandbox's logs wakes on another replica's batches too.
        notifier.subscribe(
            lambda note: events.notifier().notify(note.sandbox_id) if note.topic is Topic.EVENTS else None
        )
        # ... told by a note sent after this replica's commits (coalesced; see gateway.notify).
        events.notifier().forward = lambda sandbox_id: notifier.soon(Note(Topic.EVENTS, sandbox_id))
        self._router = CommandRouter(
            commands=commands,
            registry=self.registry,
            hand_off=self._service.hand_off,
            notifier=notifier,
            replica=self.identity.id,
            settings=cfg.commands,
        )
        self._router.start()
        # Before sessions are taken: each (re)connection of the listener redelivers from the table.
        await notifier.start()
        self.metrics.use_leases(self._renewer.replica, lease_view.leases)
        await server.start()
        self._server = server
        self.tasks.spawn(self.heartbeats.run(), name="heartbeat governor")
        self._grpc_serving = True
        # NOT_SERVING until the health follower's first verdict (below, once the database and its
        # schema are checked) says otherwise: /readyz says the same meanwhile.
        await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await health_servicer.set("openshell.v1.OpenShell", health_pb2.HealthCheckResponse.NOT_SERVING)

        if cfg.drivers.kind == "kubernetes":
            from gateway.leader import Election  # noqa: PLC0415 - loads lightkube
            from gateway.provisioner import KubernetesProvisioner  # noqa: PLC0415 - loads lightkube

            provisioner = KubernetesProvisioner(
                cfg.drivers.kubernetes,
                self._sandboxes,
                auth=cfg.auth.supervisors,
                # One pod watch in the cluster: this replica's runs only while it holds the Lease.
                election=Election(
                    identity=self.identity, settings=cfg.ha.leader, store=LeadershipStore(self.db)
                ),
            )
            try:
                await provisioner.start()
            except Exception as exc:
                await provisioner.close()
                await self.stop()
                raise GatewayStartError(f"cannot start the Kubernetes driver: {exc}") from None
            self._provisioner = provisioner
            from gateway.auth.kubernetes_tokens import kubernetes_verifier  # noqa: PLC0415 - lightkube

            # Until this point (after the gRPC server started) a pod's token is answered UNAVAILABLE
            # (review_unavailable: the gateway is starting), which its supervisor retries soon.
            assert provisioner.driver is not None
            self._authenticator.use_kubernetes(kubernetes_verifier(cfg, provisioner.driver.client))
        else:
            supervisors = cfg.auth.supervisors
            self._local = LocalProvisioner(
                cfg.drivers.local,
                self._sandboxes,
                gateway_address=self.grpc_address,
                tokens=self._authenticator.tokens if supervisors.required else None,
                token_ttl_s=supervisors.token_ttl_s,
            )
            self._local.start()
            self._provisioner = self._local
        liveness = Liveness.from_settings(cfg.sessions)
        app = build_api(
            provisioner=self._provisioner,
            sandboxes=self._sandboxes,
            events=events,
            liveness=liveness,
            commands=commands,
            # Any replica's session: the router waits for the owner's delivered notification.
            deliver=self._router.wait_delivered,
            notifier=notifier,
            command_settings=cfg.commands,
            max_body_bytes=cfg.http.max_body_bytes,
            # The API owns the verifier (closed with it); without OIDC every caller is admin.
            auth=PeopleAuth(cfg.auth.oidc) if cfg.auth.oidc.issuer_url else None,
            metrics=self.metrics,
            leases=lease_view.leases,
        )
        if not cfg.auth.oidc.issuer_url:
            log.warning("the HTTP API takes no tokens (auth.oidc.issuer_url is unset): every caller is admin")
        # Followers see the shutdown within a second; the timeout only bounds a stuck handler.
        self._runner, self.http_port = await self._listen(
            app,
            cfg.http.listen,
            what="the HTTP API",
            ssl_context=self._http_tls.context if self._http_tls else None,
        )
        self._readiness = Readiness(self.db, grpc_serving=lambda: self._grpc_serving)

        async def set_health(serving: bool) -> None:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in ("", "openshell.v1.OpenShell"):
                await health_servicer.set(service, status)
            if serving and self._renewer is not None:
                # From now on the lease row says this replica takes sessions (not before: see
                # gateway.replicas, the others would shed toward a replica no one routes to yet).
                self._renewer.ready()

        # gRPC health follows /readyz's verdict (the database, its schema), not only the server's life.
        self._health = HealthFollower(self._readiness, set_serving=set_health)
        await self._health.start()
        ops = build_ops(
            metrics=self.metrics,
            sandboxes=self._sandboxes,
            readiness=self._readiness,
            liveness=liveness,
            status=self.status,
        )
        self._ops_runner, self.ops_port = await self._listen(ops, cfg.ops.listen, what="the ops listener")
        self._flusher = asyncio.create_task(self._flush_heartbeats(), name="heartbeat-flusher")
        # Shares from the lease rows (issue 22 point 2): sheds this replica's excess, and tells
        # admission when a hello would put it further above its share.
        self.rebalancer = Rebalancer(
            cfg.rebalance,
            ha=cfg.ha,
            me=self.identity.id,
            registry=self.registry,
            leases=lease_view.leases,
            draining=lambda: self.admission.draining,
            metrics=self.metrics,
        )
        if cfg.rebalance.enabled:
            # With rebalancing off (a balancer that pins connections) a refusal for share would
            # send the supervisor back to the same replica, to be refused again.
            self.admission.over_share = self.rebalancer.over_share
        self.tasks.spawn(self.rebalancer.run(), name="rebalancer")
        if cfg.retention.enabled:
            # Old events go in small batches (issue 23 point 3): docs/log-retention.md.
            retention = Retention(cfg.retention, EventRetention(self.db), metrics=self.metrics)
            self.tasks.spawn(retention.run(), name="retention")
        if cfg.otlp_logs.enabled:
            # Stored events to an OTLP receiver, from one replica at a time: docs/otlp-logs.md.
            self._otlp = OtlpLogExport(cfg.otlp_logs, self.db, replica=self.identity.id, metrics=self.metrics)
            self.tasks.spawn(self._otlp.run(), name="OTLP log export")
        log.info(
            "gateway ready",
            extra={
                "grpc": self.grpc_address,
                "http": self.http_url,
                "ops": self.ops_url,
                "database": _mask(cfg.database.url),
            },
        )

    async def _listen(
        self, app: web.Application, address: str, *, what: str, ssl_context: ssl.SSLContext | None = None
    ) -> tuple[web.AppRunner, int]:
        """Serve ``app`` on ``address``; a port taken (or any bind failure) stops what started and
        raises GatewayStartError naming the listener."""
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        host, port = split_host_port(address)
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await self.stop()
            raise GatewayStartError(f"cannot listen for {what} on {address}: {exc.strerror or exc}") from None
        # With port 0 the kernel picks one; the runner knows which.
        return runner, int(runner.addresses[0][1]) if runner.addresses else port

    async def _flush_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.sessions.heartbeat_flush_interval_s)
            await self._flush_once()

    async def _flush_once(self) -> None:
        # Only the sessions whose written time would otherwise go stale for a reader before the
        # flush after next (gateway.sessions): not one row per heartbeat.
        sessions_cfg = self.config.sessions
        due_after = Liveness.from_settings(sessions_cfg).heartbeat_write_after(
            sessions_cfg.heartbeat_flush_interval_s,
            flush_deadline_s=self.config.grpc.batch_store_timeout_s,
        )
        beats = self.registry.take_heartbeats(renew_after_s=due_after)
        if beats and self._sandboxes is not None:
            # Each beat is written only while the row names its session and its claim (fencing).
            sessions = self.registry.heartbeat_sessions(beats)
            epochs = self.registry.heartbeat_epochs(beats)
            # Bounded: a flush stuck on a database that stopped answering would stop the flusher,
            # and every replica would soon show every sandbox here disconnected.
            deadline_s = self.config.grpc.batch_store_timeout_s
            try:
                try:
                    async with asyncio.timeout(deadline_s):
                        fenced = await self._sandboxes.record_heartbeats(
                            beats, sessions=sessions, epochs=epochs
                        )
                except TimeoutError:
                    raise StoreError(
                        f"cannot record the heartbeats of {len(beats)} sandboxes: "
                        f"the database did not answer within {deadline_s:g}s"
                    ) from None
            except Exception as exc:  # a failed flush must not kill the flusher; the next one retries
                self.metrics.background_write_failures.labels("heartbeats").inc()
                self._flush_log.log(
                    logging.WARNING,
                    ("heartbeat-flush",),
                    f"heartbeat flush failed; retrying with the next flush: {exc}",
                    # A store failure is expected and explained by its message; anything else is a bug.
                    exc_info=None if isinstance(exc, StoreError) else exc,
                )
                # Nothing counts as written: the next flush finds these due again, newest times.
            else:
                self.registry.heartbeats_written(beats, sessions=sessions)
                self.metrics.heartbeat_rows_written.inc(len(beats) - len(fenced))
                # Sessions whose sandbox a newer session claimed end now (SessionRejected SUPERSEDED).
                self.registry.fence(fenced, sessions)

    @property
    def draining(self) -> bool:
        return self._draining_since is not None

    def status(self) -> dict[str, Any]:
        """The ops listener's /status: this replica and what it decided at start."""
        driver: dict[str, Any] = {"kind": self.config.drivers.kind}
        kube = getattr(self._provisioner, "driver", None)
        if self.config.drivers.kind == "kubernetes":
            choice = getattr(kube, "injection", None)
            driver["namespace"] = self.config.drivers.kubernetes.namespace
            # None until the cluster answered (decided at the first creation then).
            driver["injection"] = None if choice is None else choice.as_dict()
        return {
            "version": __version__,
            "replica": self.identity.id,
            "run": self.identity.run,
            "draining": self.draining,
            "driver": driver,
        }

    async def begin_drain(self) -> None:
        """Stop taking work, before any session is touched (idempotent): every hello is refused
        (OVERLOADED "draining", with a short retry hint: it may still reach us while endpoints
        move), /readyz says 503 and gRPC health NOT_SERVING, the lease row says draining (the
        others stop counting this replica) and the Kubernetes driver's leader Lease is released.
        Each store step is bounded: a hung database must not eat the drain's time. The awaited
        steps run once, as their own task: a caller cancelled meanwhile (a second signal during
        the drain) leaves them running, and the next call (stop's) waits for what is left of them,
        so the lease's draining mark and the leader step-down are never skipped."""
        if self._drain_steps is None:
            self._draining_since = asyncio.get_running_loop().time()
            self.admission.draining = True
            self.metrics.draining.set(1)
            self._grpc_serving = False  # /readyz says so at once: no new work is sent here
            self._drain_steps = asyncio.create_task(self._begin_drain_steps(), name="begin drain")
        await asyncio.shield(self._drain_steps)

    async def _begin_drain_steps(self) -> None:
        if self._health_servicer is not None:
            # gRPC health says so at once too, not at the follower's next tick; the follower's
            # later verdicts are ignored from here.
            await self._health_servicer.enter_graceful_shutdown()
        log.info("draining: refusing hellos, not ready", extra={"sessions": len(self.registry)})
        if self._renewer is not None:
            # The others see this replica going before its sessions move. Best effort, and short
            # (renewals keep saying it).
            await _bounded(self._renewer.drain(), DRAIN_MARK_S, what="marking this replica draining")
        step_down = getattr(self._provisioner, "step_down", None)  # the Kubernetes driver's leader
        if step_down is not None:
            # The Lease released first: another replica takes the pod watch over within its retry
            # period instead of a lease duration after this one is gone.
            await _bounded(step_down(), DRAIN_MARK_S * 3, what="releasing the leader Lease")

    async def drain(self) -> None:
        """The first SIGTERM's work before the stop (gateway.drain): ``begin_drain``, then the
        sessions are asked to reconnect elsewhere at a paced rate until none is left or
        ``drain.settle_s + drain.window_s`` after the drain began. Cancelled by a second signal."""
        await self.begin_drain()
        assert self._draining_since is not None
        settings = self.config.drain
        drainer = Drainer(
            self.registry, settings, metrics=self.metrics, handshakes=lambda: self.admission.inflight
        )
        task = self.tasks.spawn(
            drainer.run(deadline=self._draining_since + settings.settle_s + settings.window_s), name="drain"
        )
        # Cancelling this call cancels the drainer too (a task awaiting a task cancels it).
        await task

    async def stop(self) -> None:
        """Stop within ``grpc.shutdown_grace_s + STOP_MARGIN_S`` whatever the database does (the
        chart's ``terminationGracePeriodSeconds`` counts on it): the phases share one deadline, each
        bounded by what is left of it, and the disconnection writes still retrying get the rest.
        Without a drain before it (``drain``), it begins with ``begin_drain``'s steps; the sessions
        still here are asked to reconnect within ``drain.final_spread_s`` (not a bare end)."""
        loop = asyncio.get_running_loop()
        grace = self.config.grpc.shutdown_grace_s
        deadline = loop.time() + grace + STOP_MARGIN_S

        def left() -> float:
            return max(0.0, deadline - loop.time())

        await self.begin_drain()
        # The drain's pacing (if a second signal cut it short), the rebalancer, the governor.
        await self.tasks.close(timeout_s=min(DRAIN_MARK_S, left()))
        if self._otlp is not None:
            # Another replica exports from the stored position at once, not after the lease.
            await _bounded(
                self._otlp.release(), min(DRAIN_MARK_S, left()), what="releasing the OTLP log export"
            )
            self._otlp = None
        hinted = self.registry.close_all(
            "gateway shutting down", hint=SHUTDOWN, spread_s=self.config.drain.final_spread_s
        )
        if hinted:
            self.metrics.reconnect_hints.labels(SHUTDOWN).inc(hinted)
            log.info(
                "asked %d sessions to reconnect within %.1fs",
                hinted,
                self.config.drain.final_spread_s,
                extra={"hinted": hinted},
            )
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._runner is not None:
            # aiohttp bounds a stuck handler by its shutdown_timeout; this bounds the whole.
            await _bounded(self._runner.cleanup(), min(HTTP_STOP_S, left()), what="stopping the HTTP API")
            self._runner = None
        if self._ops_runner is not None:
            await _bounded(
                self._ops_runner.cleanup(), min(HTTP_STOP_S, left()), what="stopping the ops listener"
            )
            self._ops_runner = None
        if self._health is not None:
            await self._health.close()
            self._health = None
        if self._readiness is not None:
            await self._readiness.close()
            self._readiness = None
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
            # A database that hangs (not one that fails) would hold the last flush for as long as
            # its connect timeout, or forever on an open connection.
            await _bounded(self._flush_once(), left(), what="the last heartbeat flush")
        kubernetes = self._authenticator.kubernetes if self._authenticator is not None else None
        close_reviews = getattr(kubernetes, "close", None)  # the TokenReview verifier's
        if close_reviews is not None:
            # Token reviews still in flight are cancelled before the driver's client closes.
            await _bounded(close_reviews(), left(), what="cancelling token reviews")
        if self._provisioner is not None:
            # The local driver's sandboxes are this process's children: they are stopped too.
            await _bounded(self._provisioner.close(), left(), what="closing the sandbox driver")
            self._provisioner = self._local = None
        if self._router is not None:
            # Sessions have ended: nothing is left to hand over; deliveries not recorded are read
            # again by the sandbox's next session.
            await _bounded(self._router.stop(), min(DRAIN_MARK_S, left()), what="stopping the command router")
            self._router = None
        if self._notifier is not None:
            await _bounded(self._notifier.stop(), min(DRAIN_MARK_S, left()), what="closing the listener")
            self._notifier = None
        if self._service is not None:
            await self._service.drain(timeout_s=max(0.0, left() - CLOSE_RESERVE_S))
        if self._renewer is not None:
            # After the sessions ended: a deleted row says at once that this replica holds nothing.
            # Only within the deadline: a row not deleted expires after ha.lease_s.
            # Never out of the database's closing reserve (CLOSE_RESERVE_S): a pool closed in time
            # lets the process exit at once, a hung one keeps it in asyncio's teardown.
            await _bounded(
                self._renewer.stop(),
                max(0.0, min(DRAIN_MARK_S, left() - CLOSE_RESERVE_S)),
                what="deleting this replica's lease",
            )
            self._renewer = None
        await self.metrics.close()
        if self._guard is not None:
            self._guard.close()
        if self._authenticator is not None:
            self._authenticator.close()
        self._flush_log.close()
        if self.db is not None:
            # At least a moment: a database that answers closes its connections politely.
            await _bounded(self.db.close(), max(left(), 0.5), what="closing the database")
            self.db = None
        log.info("gateway stopped")


async def _bounded(work: Coroutine[Any, Any, None], timeout_s: float, *, what: str) -> None:
    """Await ``work`` for at most ``timeout_s``; past that it is cancelled, with a warning, and
    not waited for: a hung database driver may take its time to give up, and the deadline is
    the pod's (what is still cancelling ends with the event loop)."""
    task = asyncio.create_task(work, name=f"shutdown: {what}")
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if task in done:
        task.result()
        return
    task.cancel()
    log.warning("shutdown: gave up %s after %.1fs (the shutdown deadline)", what, timeout_s)


class _CredentialNote(aio.ServerInterceptor):
    """Logs (debug) whether a call presented a bearer credential; handlers read it themselves from
    ``context.invocation_metadata()``. Never logs the credential."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        metadata = handler_call_details.invocation_metadata or ()
        presented = any(key == "authorization" for key, _ in metadata)
        log.debug(
            "gRPC call %s credential",
            "with a" if presented else "without a",
            extra={"method": handler_call_details.method},
        )
        return await continuation(handler_call_details)


def _mask(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
