"""The supervisor as a whole: journal, main process, capture and session, owned and shut down.

Order of events: open the journal (recovering it), journal SUPERVISOR_STARTED, start the
session (it delivers whatever the journal holds, including a previous run's leftovers), start
the main process and journal STARTED, capture its lines, and when it exits journal EXITED and
wait up to ``exit_flush_timeout_s`` for the gateway to acknowledge everything. Undelivered
records stay in the journal directory, so a supervisor started again over it delivers them.
Signals sent to the supervisor are forwarded to the main process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import uuid

from openshell_wire.records import LifecycleKind, LifecycleRecord, LogRecord, Payload
from supervisor.config import SupervisorConfig
from supervisor.journal import FsyncPolicy, Journal, JournalError, JournalOptions
from supervisor.process import MainProcess, StartFailed
from supervisor.session import Session

log = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def journal_options(config: SupervisorConfig) -> JournalOptions:
    j = config.journal
    return JournalOptions(
        directory=j.directory,
        segment_bytes=j.segment_bytes,
        max_bytes=j.max_bytes,
        fsync=FsyncPolicy(j.fsync),
        fsync_interval_s=j.fsync_interval_s,
    )


class Agent:
    def __init__(self, config: SupervisorConfig) -> None:
        self.config = config
        self.instance_id = config.instance_id or uuid.uuid4().hex
        self.journal = Journal.open(journal_options(config))
        self.session = Session(config=config, journal=self.journal, instance_id=self.instance_id)
        self._append_failures = 0

    def record(self, payload: Payload) -> None:
        """Journal one record; a full disk is reported, never allowed to stop the capture."""
        try:
            self.journal.append(payload)
        except JournalError as exc:
            self._append_failures += 1
            if self._append_failures == 1 or self._append_failures % 1000 == 0:
                log.error("journal append failed (%d so far): %s", self._append_failures, exc)

    async def run(self) -> int:
        if not self.config.command:
            raise SystemExit("openshell-supervisor: no command to run (give it after --, or set `command`)")
        self.record(
            LifecycleRecord(
                kind=LifecycleKind.SUPERVISOR_STARTED, pid=os.getpid(), instance_id=self.instance_id
            )
        )
        background = [
            asyncio.create_task(self.journal.run_fsync_loop(), name="journal-fsync"),
            asyncio.create_task(self.session.run(), name="session"),
        ]
        try:
            code = await self._supervise()
            await self._flush()
            return code
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            self.journal.close()

    async def _supervise(self) -> int:
        echo = self.config.capture.echo
        main = MainProcess(
            self.config.command,
            sink=self._capture,
            max_line_bytes=self.config.capture.max_line_bytes,
            echo_stdout=sys.stdout.buffer if echo else None,
            echo_stderr=sys.stderr.buffer if echo else None,
        )
        loop = asyncio.get_running_loop()
        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, main.send_signal, sig)
        try:
            try:
                pid = await main.start()
            except StartFailed as exc:
                log.error("main process could not start: %s", exc)
                self.record(LifecycleRecord(kind=LifecycleKind.START_FAILED, detail=str(exc)))
                self.record(
                    LifecycleRecord(kind=LifecycleKind.EXITED, exit_code=exc.exit_code, detail=str(exc))
                )
                return exc.exit_code
            self.record(
                LifecycleRecord(
                    kind=LifecycleKind.STARTED,
                    pid=pid,
                    argv=tuple(self.config.command),
                    instance_id=self.instance_id,
                )
            )
            log.info("main process started", extra={"pid": pid})
            status = await main.wait()
            self.record(
                LifecycleRecord(
                    kind=LifecycleKind.EXITED,
                    pid=pid,
                    exit_code=status.exit_code,
                    signal=status.signal,
                    instance_id=self.instance_id,
                )
            )
            log.info("main process exited", extra={"pid": pid, "exit_code": status.exit_code})
            return status.exit_code
        finally:
            for sig in FORWARDED_SIGNALS:
                loop.remove_signal_handler(sig)

    def _capture(self, record: LogRecord) -> None:
        self.record(record)

    async def _flush(self) -> None:
        target = self.journal.last_sequence
        timeout = self.config.session.exit_flush_timeout_s
        try:
            await asyncio.wait_for(self.session.wait_acked(target), timeout)
        except TimeoutError:
            left = target - self.journal.acked_through
            log.warning(
                "gateway did not acknowledge %d records within %.0fs; they stay in %s for the next start",
                left,
                timeout,
                self.config.journal.directory,
            )
        else:
            log.info("all records delivered", extra={"through": target})


async def run(config: SupervisorConfig) -> int:
    try:
        agent = Agent(config)
    except JournalError as exc:
        log.error("cannot open the journal: %s", exc)
        return 70  # EX_SOFTWARE: nothing ran, nothing was lost
    with contextlib.suppress(asyncio.CancelledError):
        return await agent.run()
    return 130
