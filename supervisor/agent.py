"""The supervisor as a whole: journal, main process, capture and session, owned and shut down.

Order of events: open the journal (recovering it), install the reaper (SIGCHLD, child
subreaper), journal SUPERVISOR_STARTED, start the session (it delivers whatever the journal
holds, including a previous run's leftovers), start the main process and journal STARTED,
capture its lines, and when it exits journal EXITED and keep delivering for up to
``session.exit_delivery_s`` until the gateway has acknowledged everything (the session reconnects
at once and then with a short backoff: :meth:`Session.deliver_exit`). Undelivered records stay in
the journal directory, so a supervisor started again over it delivers them.

Init duties: every child that exits is reaped, orphans re-parented to us included
(:mod:`supervisor.reaper`). Signals sent to the supervisor are forwarded to the main process
group from the first moment: one that arrives before the main process started is delivered as
soon as it has. SIGTERM or SIGINT is also a stop request: forwarded, then after
``process.stop_grace_s`` the group is SIGKILLed (exit code 137, journaled with its reason), and
the main process is not restarted; after it exited, a stop request cuts the exit flush short
(the exit code is still the main process's). Under ``process.restart: on-failure`` a non-zero
exit starts the main process again after a full-jitter backoff, at most ``restart_limit`` times;
each run is journaled (EXITED, then STARTED with "restart n/limit after exit code c") and the
supervisor exits with the last run's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import time
import uuid
from typing import TYPE_CHECKING

from openshell_wire.records import Command, CommandKind, LifecycleKind, LifecycleRecord, LogRecord, Payload
from supervisor.childenv import current_main_process_env
from supervisor.config import SupervisorConfig

if TYPE_CHECKING:
    from supervisor.http import HttpServer
    from supervisor.metrics import SupervisorMetrics
from supervisor.health import HealthMonitor
from supervisor.journal import FsyncPolicy, Journal, JournalError, JournalOptions, JournalStats
from supervisor.process import MainProcess, StartFailed
from supervisor.reaper import Reaper
from supervisor.session import Session, SessionStatus
from supervisor.telemetry import Telemetry

log = logging.getLogger(__name__)

FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
#: As PID 1 the supervisor receives only the signals it handles, and the runtime stops a container
#: with its image's STOPSIGNAL (SIGQUIT for nginx, for one): each of these stops the sandbox, passed
#: on to the main process as it came, then SIGKILL after the grace period.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def restart_delay(restart: int, initial_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before restart number ``restart`` (1, 2, ...).

    A random wait in [0, min(max_s, initial_s * 2 ** (restart - 1))], as tenacity's
    ``wait_random_exponential`` computes it for the session's reconnects.
    """
    high = min(max_s, initial_s * 2 ** min(restart - 1, 62))
    return (rng or random).uniform(0.0, high)


def journal_options(config: SupervisorConfig) -> JournalOptions:
    j = config.journal
    return JournalOptions(
        directory=j.directory,
        segment_bytes=j.segment_bytes,
        max_bytes=j.max_bytes,
        fsync=FsyncPolicy(j.fsync),
        fsync_interval_s=j.fsync_interval_s,
        reserve_bytes=j.reserve_bytes,
    )


class Agent:
    def _credential_refused(self) -> str:
        """The health reason while the gateway refuses our credential ("" otherwise)."""
        session: Session = self.session
        return session.status.credential_refused

    def __init__(self, config: SupervisorConfig) -> None:
        self.config = config
        self.instance_id = config.instance_id or uuid.uuid4().hex
        self.journal = Journal.open(journal_options(config))
        # The endpoints' libraries (aiohttp, prometheus_client) load only when they are on: a
        # supervisor is in every sandbox, and they would cost it some 15 MiB.
        self.http: HttpServer | None = None
        metrics: SupervisorMetrics | None = None
        if config.http.enabled:
            from supervisor.http import HttpServer  # noqa: PLC0415
            from supervisor.metrics import SupervisorMetrics  # noqa: PLC0415

            metrics = SupervisorMetrics(self)
            self.http = HttpServer(config.http, self, readiness=config.readiness, metrics=metrics)
        # Samples the main process tree, the cgroup and disks (the journal's included) and
        # journals the health verdict (supervisor.health); read by /status and /metrics.
        self.health: HealthMonitor | None = (
            HealthMonitor(
                config.health,
                main_pid=lambda: self.main_pid,
                record=self.record,
                extra_disk_paths=[config.journal.directory],
                journal_stats=self.journal.stats,
                # Read at each check; the session is made below.
                session_problem=self._credential_refused,
            )
            if config.health.enabled
            else None
        )
        self.session = Session(
            config=config,
            journal=self.journal,
            instance_id=self.instance_id,
            on_command=self._apply_command,
            on_rtt=metrics.observe_rtt if metrics is not None else None,
        )
        self.telemetry = Telemetry(config.telemetry, self) if config.telemetry.enabled else None
        self._append_failures = 0
        # What the health, metrics and status endpoints read (supervisor.metrics.SupervisorView).
        self.loop_heartbeat = time.monotonic()
        self.started_at: float | None = None
        self.restarts = 0
        self.last_exit_code: int | None = None
        self.reaper = Reaper()
        self._main: MainProcess | None = None
        self._main_done = False
        self._pending_signals: list[signal.Signals] = []
        self._cut_flush = asyncio.Event()
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        #: time.monotonic() at which the exit-delivery window of the last exit of the main process
        #: ends: the EXITED record's retries on a full disk and the delivery after it share it, so
        #: the supervisor is done within session.exit_delivery_s of that exit (the pod's grace).
        self._exit_deadline: float | None = None

    # -- the view the HTTP endpoints read -------------------------------------------------

    @property
    def sandbox_id(self) -> str:
        return self.config.sandbox_id

    @property
    def main_pid(self) -> int | None:
        main = self._main
        return main.pid if main is not None and main.running else None

    @property
    def main_running(self) -> bool:
        return self._main is not None and self._main.running

    @property
    def session_status(self) -> SessionStatus:
        return self.session.status

    @property
    def journal_stats(self) -> JournalStats:
        return self.journal.stats()

    # -- records ----------------------------------------------------------------------------

    def record(self, payload: Payload) -> bool:
        """Journal one record; a full disk is reported, never allowed to stop the capture.

        Never silent either: a log line the journal cannot write is counted in a WRITE_FAILED gap
        record (``Journal.append``), and a lifecycle or health-change record stays with its
        caller, who retries. The failure itself is a health change, checked at once.
        """
        try:
            self.journal.append(payload)
        except JournalError as exc:
            self._append_failures += 1
            if self._append_failures == 1 or self._append_failures % 1000 == 0:
                log.error("journal append failed (%d so far): %s", self._append_failures, exc)
            if self.health is not None:
                self.health.notify()
            return False
        return True

    async def record_lifecycle(self, payload: LifecycleRecord, *, deadline: float | None = None) -> None:
        """Journal a lifecycle record, retrying while the disk is full: these are never dropped.

        Acknowledgements trim the journal and free room while we wait, so a full disk with a
        reachable gateway resolves itself; without one, we give up at ``deadline`` (a
        time.monotonic(); by default session.exit_delivery_s from now, at least 1 s) and say so,
        rather than hang. The exit's records pass the exit-delivery window's deadline.
        """
        if deadline is None:
            deadline = time.monotonic() + max(self.config.session.exit_delivery_s, 1.0)
        while not self.record(payload):
            if time.monotonic() > deadline:
                # Still not silent: the journal counts it in the next WRITE_FAILED gap record.
                self.journal.lost(payload)
                log.critical("lifecycle record could not be journaled (counted in a gap record): %s", payload)
                return
            await asyncio.sleep(0.5)

    def request_stop(
        self,
        reason: str,
        sig: signal.Signals = signal.SIGTERM,
        *,
        grace_s: float | None = None,
        cut_flush: bool = True,
    ) -> None:
        """Stop the main process for good: send ``sig`` to its group, SIGKILL the group after
        ``grace_s`` (default ``process.stop_grace_s``), restart it no more. Once the supervisor is
        done with the main process, a stop with ``cut_flush`` (a signal to the supervisor: the
        kubelet is about to kill it) cuts the exit flush short; a stop command from the gateway
        does not, since that gateway is the one receiving what the flush delivers."""
        grace = self.config.process.stop_grace_s if grace_s is None else grace_s
        if not self._stopping:
            self._stopping = True
            self._stop_requested.set()
            log.info("%s: stopping the main process (grace %gs)", reason, grace)
        main = self._main
        if self._main_done:
            if cut_flush:
                self._cut_flush.set()
        elif main is None:
            # Not started yet: deliver as soon as it is, so a stop request is never lost.
            self._pending_signals.append(sig)
        elif main.running:
            main.send_signal(sig)
            main.kill_after(grace)
        # Otherwise it is between two runs (or just exited): _stopping ends the restarts, and the
        # exit flush still runs; a second signal during it cuts it short.

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._main_done:
            # The main process is gone; a stop request now only cuts the exit flush short.
            if sig in STOP_SIGNALS:
                log.info("%s during the exit flush: not waiting for the gateway any longer", sig.name)
                self._cut_flush.set()
            return
        if sig in STOP_SIGNALS:
            self.request_stop(f"{sig.name} received", sig)
            return
        main = self._main
        if main is None:
            self._pending_signals.append(sig)  # delivered once it has started
        elif main.running:
            main.send_signal(sig)
        else:
            log.info("%s while the main process is not running: not forwarded", sig.name)

    async def _apply_command(self, command: Command) -> str | None:
        """Stop and signal commands from the gateway; the session has made sure each id applies once."""
        if command.kind is CommandKind.STOP:
            grace = command.grace_ms / 1000 if command.grace_ms else None
            self.request_stop(f"stop command {command.command_id}", grace_s=grace, cut_flush=False)
            return None
        if command.kind is CommandKind.SIGNAL:
            try:
                sig = signal.Signals(command.signal)
            except ValueError:
                return f"{command.signal} is not a signal on this system"
            main = self._main
            if main is None or not main.running:
                return "the main process is not running"
            main.send_signal(sig)
            return None
        return f"{command.kind.value} commands are applied by the session"

    async def _tick(self) -> None:
        """Keep /healthz's heartbeat fresh while the supervisor's own tasks are alive."""
        while True:
            if all(not t.done() for t in self._background):
                self.loop_heartbeat = time.monotonic()
            await asyncio.sleep(1.0)

    async def _offline_policy(self) -> None:
        """Apply the offline policy once per outage longer than ``offline.grace_s``."""
        settings = self.config.offline
        acted_for: float | None = None
        while True:
            await asyncio.sleep(min(1.0, settings.grace_s / 4))
            status = self.session.status
            since = status.offline_since
            refused = False
            if settings.count_auth_refusals and status.refused_since is not None:
                # Refused, then unreachable (or the reverse) is one stretch without a gateway
                # that takes us: counted from the earlier of the two.
                refused = since is None or status.refused_since < since
                since = status.refused_since if refused else since
            if since is None or since == acted_for or self._main_done:
                continue
            offline_s = time.monotonic() - since
            if offline_s < settings.grace_s:
                continue
            acted_for = since
            stop = settings.policy == "stop" and not self._main_done and not self._stopping
            detail = "stopping the main process" if stop else "keeping the main process running"
            log.warning(
                "gateway %s for %.0fs: %s (offline policy %s)",
                "refusing our credential" if refused else "unreachable",
                offline_s,
                detail,
                settings.policy,
            )
            await self.record_lifecycle(
                LifecycleRecord(
                    kind=LifecycleKind.OFFLINE_POLICY,
                    detail=detail,
                    duration_ms=int(offline_s * 1000),
                    instance_id=self.instance_id,
                )
            )
            if stop:
                self.request_stop("offline policy")

    async def run(self) -> int:
        if not self.config.command:
            raise SystemExit("openshell-supervisor: no command to run (give it after --, or set `command`)")
        loop = asyncio.get_running_loop()
        # Handlers first: a signal in any later moment is forwarded, queued or honoured, and every
        # child that exits from now on is reaped.
        self.reaper.install(loop)
        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        background = self._background
        try:
            if self.http is not None:
                from supervisor.http import HttpStartError  # noqa: PLC0415 - loaded with the endpoints

                try:
                    await self.http.start()
                except HttpStartError as exc:
                    log.error("%s", exc)
                    return 70  # EX_SOFTWARE: nothing was started
            if self.telemetry is not None:
                self.telemetry.start()
            await self.record_lifecycle(
                LifecycleRecord(
                    kind=LifecycleKind.SUPERVISOR_STARTED, pid=os.getpid(), instance_id=self.instance_id
                )
            )
            for coro, name in (
                (self.journal.run_fsync_loop(), "journal-fsync"),
                (self.session.run(), "session"),
                (self._offline_policy(), "offline-policy"),
                (self._tick(), "loop-heartbeat"),
                *([(self.health.run(), "health")] if self.health is not None else []),
            ):
                task = asyncio.create_task(coro, name=name)
                task.add_done_callback(_report_unexpected_end)
                background.append(task)
            code = await self._supervise()
            await self._flush()
            return code
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if self.http is not None:
                await self.http.stop()
            if self.telemetry is not None:
                await self.telemetry.stop()
            # Only now: until here a signal must not take the default action (death by signal,
            # or KeyboardInterrupt) and replace the main process's exit code.
            for sig in FORWARDED_SIGNALS:
                loop.remove_signal_handler(sig)
            # Last: a background task's own children (a readiness command) are reaped until here.
            self.reaper.uninstall()
            if self.reaper.orphans_reaped:
                log.info("reaped %d orphaned processes", self.reaper.orphans_reaped)
            self.journal.close()

    async def _supervise(self) -> int:
        """Run the main process, again under the restart policy; the last run's exit code."""
        policy = self.config.process
        restarts = 0
        code = await self._run_once("")
        while code != 0 and not self._stopping and policy.restart == "on-failure":
            if restarts >= policy.restart_limit:
                log.warning("main process exited with code %d; restart limit (%d) reached", code, restarts)
                break
            restarts += 1
            self.restarts = restarts
            delay = restart_delay(restarts, policy.restart_backoff_initial_s, policy.restart_backoff_max_s)
            log.warning(
                "main process exited with code %d; restart %d/%d in %.2fs",
                code,
                restarts,
                policy.restart_limit,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), delay)
            if self._stopping:
                # Stopped during the restart backoff: the delivery window starts now, not at the
                # exit the backoff followed.
                self._exit_deadline = time.monotonic() + self.config.session.exit_delivery_s
                break
            code = await self._run_once(f"restart {restarts}/{policy.restart_limit} after exit code {code}")
        self._main_done = True
        return code

    async def _run_once(self, detail: str) -> int:
        """One run of the main process, journaled from STARTED (or START_FAILED) to EXITED."""
        echo = self.config.capture.echo
        main = MainProcess(
            self.config.command,
            env=current_main_process_env(),
            reaper=self.reaper,
            sink=self._capture,
            max_line_bytes=self.config.capture.max_line_bytes,
            echo_stdout=sys.stdout.buffer if echo else None,
            echo_stderr=sys.stderr.buffer if echo else None,
        )
        self._main = main
        try:
            pid = await main.start()
        except StartFailed as exc:
            log.error("main process could not start: %s", exc)
            deadline = self._exit_deadline = time.monotonic() + self.config.session.exit_delivery_s
            await self.record_lifecycle(
                LifecycleRecord(kind=LifecycleKind.START_FAILED, detail=str(exc)), deadline=deadline
            )
            await self.record_lifecycle(
                LifecycleRecord(kind=LifecycleKind.EXITED, exit_code=exc.exit_code, detail=str(exc)),
                deadline=deadline,
            )
            return exc.exit_code
        pending, self._pending_signals = self._pending_signals, []
        for sig in pending:
            self._on_signal(sig)
        await self.record_lifecycle(
            LifecycleRecord(
                kind=LifecycleKind.STARTED,
                pid=pid,
                argv=tuple(self.config.command),
                detail=detail,
                instance_id=self.instance_id,
            )
        )
        main.start_capture()  # only now: the main process's lines come after its STARTED record
        self.started_at = time.time()
        log.info("main process started", extra={"pid": pid})
        status = await main.wait()
        self._exit_deadline = time.monotonic() + self.config.session.exit_delivery_s
        await self.record_lifecycle(
            LifecycleRecord(
                kind=LifecycleKind.EXITED,
                pid=pid,
                exit_code=status.exit_code,
                signal=status.signal,
                detail=status.detail,
                instance_id=self.instance_id,
            ),
            deadline=self._exit_deadline,
        )
        self.last_exit_code = status.exit_code
        log.info("main process exited", extra={"pid": pid, "exit_code": status.exit_code})
        return status.exit_code

    def _capture(self, record: LogRecord) -> None:
        journaled = self.record(record)
        if self.telemetry is not None:
            self.telemetry.emit_line(record, self.journal.last_sequence if journaled else None)

    async def _flush(self) -> None:
        """Wait until the gateway holds everything journaled, records that arrive meanwhile
        (a command's audit line, a health sample) included, within ``session.exit_delivery_s`` of
        the main process's exit (the window the EXITED record's retries already used counts).

        Disconnected, the session would otherwise sit out a reconnect backoff of up to
        ``reconnect_max_s`` while the window runs: it is told to try at once and keep trying often."""
        window = self.config.session.exit_delivery_s
        deadline = self._exit_deadline if self._exit_deadline is not None else time.monotonic() + window
        target = self.journal.last_sequence
        if self.journal.acked_through < target:
            self.session.deliver_exit()
        while not self._cut_flush.is_set():
            acked = asyncio.create_task(self.session.wait_acked(target), name="exit-flush")
            cut = asyncio.create_task(self._cut_flush.wait(), name="exit-flush-cut")
            try:
                await asyncio.wait(
                    {acked, cut},
                    timeout=max(deadline - time.monotonic(), 0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for task in (acked, cut):
                    task.cancel()
                await asyncio.gather(acked, cut, return_exceptions=True)
            if self.journal.acked_through < target or self.journal.last_sequence == target:
                break
            target = self.journal.last_sequence
        if self.journal.acked_through >= target:
            log.info("all records delivered", extra={"through": target})
            return
        left = target - self.journal.acked_through
        log.warning(
            "gateway did not acknowledge %d records within the exit-delivery window (%gs%s); "
            "they stay in %s for the next start",
            left,
            window,
            ", cut short by a stop signal" if self._cut_flush.is_set() else "",
            self.config.journal.directory,
        )


def _report_unexpected_end(task: asyncio.Task[None]) -> None:
    """A background task must run until cancelled; anything else is a bug that must be seen."""
    if task.cancelled():
        return
    exc = task.exception()
    log.critical("background task %s ended unexpectedly: %r", task.get_name(), exc, exc_info=exc)


async def run(config: SupervisorConfig) -> int:
    try:
        agent = Agent(config)
    except JournalError as exc:
        log.error("cannot open the journal: %s", exc)
        return 70  # EX_SOFTWARE: nothing ran, nothing was lost
    return await agent.run()
