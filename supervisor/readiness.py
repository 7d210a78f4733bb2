"""The optional readiness check of the main process, and the verdict that /readyz serves.

The sandbox is ready when its main process runs and, if a check is configured, the last check of
*this* main process passed. A check is one of:

- ``command``: run an argv; exit status 0 passes (its output's tail is kept as the reason when it
  fails). It runs in a session of its own so that a timeout kills it with everything it started;
- ``tcp``: a TCP connection to ``host:port`` opens;
- ``http``: a GET of ``url`` answers 2xx (redirects are not followed: a 3xx is a failure, so a
  check that lands on a login page does not pass by accident).

Each check is bounded by ``timeout_s`` and repeated every ``period_s``; the first one runs
``initial_delay_s`` after the main process started. A check never raises: every failure (refused,
timed out, not found, bad status) becomes a :class:`CheckResult` with a reason.

Design choices:

- **The probe runs in the background, /readyz only reads.** Kubernetes probes every pod every few
  seconds and a slow check must not make the endpoint slow, so the handler reads the last result
  (cheap, never blocks) and the probe task refreshes it on its own period.
- **Results belong to one main process.** A result records the pid it was taken against, and the
  verdict ignores a result of another pid: after a restart the sandbox is not ready until the *new*
  process passed its check, with no window in which the old process's success still counts. The
  probe notices a new pid within :data:`PID_POLL_S` and starts over with the initial delay.
- **Transitions are logged, steady states are not**: a check passing every 5 s says nothing new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from supervisor.childenv import current_main_process_env
from supervisor.endpoint_settings import ReadinessSettings

log = logging.getLogger(__name__)

#: How often the probe looks for a new main process pid between checks.
PID_POLL_S = 0.5
#: Bytes of a failing command's output kept as the reason (the end, where errors are).
OUTPUT_TAIL = 512


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    #: Why it failed, or what passed ("exit 0", "connected", "HTTP 200").
    detail: str
    #: Wall-clock time the check finished.
    at: float
    duration_s: float
    #: The main process the check was run against.
    pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "detail": self.detail,
            "at": self.at,
            "duration_ms": round(self.duration_s * 1000, 3),
            "pid": self.pid,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    ready: bool
    reason: str


# -- the checks --------------------------------------------------------------------------


async def check_command(argv: list[str], timeout_s: float) -> tuple[bool, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own session and process group: a timeout kills whatever the check started too.
            start_new_session=True,
            env=current_main_process_env(),  # the sandbox's environment, as the main process gets it
        )
    except OSError as exc:
        return False, f"cannot run {argv[0]!r}: {exc.strerror or exc}"
    try:
        async with asyncio.timeout(timeout_s):
            output, _ = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return False, f"timed out after {timeout_s:g}s"
    except asyncio.CancelledError:
        # Shutting down mid-check: leave no child behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    if proc.returncode == 0:
        return True, "exit 0"
    tail = output[-OUTPUT_TAIL:].decode(errors="replace").strip()
    code = proc.returncode if proc.returncode is not None else -1
    code_text = f"signal {-code}" if code < 0 else f"exit {code}"
    return False, f"{code_text}: {tail}" if tail else code_text


async def check_tcp(address: str, timeout_s: float) -> tuple[bool, str]:
    host, _, port = address.rpartition(":")
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    except TimeoutError:
        return False, f"connect to {address} timed out after {timeout_s:g}s"
    except OSError as exc:
        return False, f"connect to {address}: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, "connected"


async def check_http(client: aiohttp.ClientSession, url: str, timeout_s: float) -> tuple[bool, str]:
    try:
        async with client.get(
            url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            status = response.status
    except TimeoutError:
        return False, f"GET {url} timed out after {timeout_s:g}s"
    except aiohttp.ClientError as exc:
        return False, f"GET {url}: {exc or type(exc).__name__}"
    if 200 <= status < 300:
        return True, f"HTTP {status}"
    return False, f"GET {url}: HTTP {status}"


# -- the probe ---------------------------------------------------------------------------


class ReadinessProbe:
    """Runs the configured check against each main process and keeps the last result.

    ``main_pid`` returns the running main process's pid, or None when there is none.
    ``run`` loops until cancelled (its owner cancels and awaits it); ``verdict`` is cheap and
    can be called from any handler.
    """

    def __init__(self, settings: ReadinessSettings, main_pid: Callable[[], int | None]) -> None:
        self.settings = settings
        self._main_pid = main_pid
        self.last: CheckResult | None = None
        self._logged_ok: bool | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.kind != "none"

    def verdict(self, main_running: bool) -> Verdict:
        if not main_running:
            return Verdict(False, "main process not running")
        if not self.enabled:
            return Verdict(True, "main process running")
        last = self.last
        pid = self._main_pid()
        if last is None or last.pid != pid:
            return Verdict(False, f"{self.settings.kind} check has not run yet for this main process")
        if not last.ok:
            return Verdict(False, f"{self.settings.kind} check failing: {last.detail}")
        return Verdict(True, f"{self.settings.kind} check passing: {last.detail}")

    async def check_once(self, client: aiohttp.ClientSession | None = None) -> CheckResult:
        """Run the configured check now and record its result (also used by tests)."""
        s = self.settings
        pid = self._main_pid()
        began = time.monotonic()
        if s.kind == "command":
            ok, detail = await check_command(s.command, s.timeout_s)
        elif s.kind == "tcp":
            ok, detail = await check_tcp(s.address, s.timeout_s)
        elif s.kind == "http":
            if client is None:
                async with aiohttp.ClientSession() as own:
                    ok, detail = await check_http(own, s.url, s.timeout_s)
            else:
                ok, detail = await check_http(client, s.url, s.timeout_s)
        else:
            ok, detail = True, "no check configured"
        result = CheckResult(ok, detail, time.time(), time.monotonic() - began, pid)
        self._record(result)
        return result

    def _record(self, result: CheckResult) -> None:
        self.last = result
        if result.ok != self._logged_ok:
            if result.ok:
                log.info("readiness check passing", extra={"pid": result.pid, "detail": result.detail})
            else:
                log.warning("readiness check failing", extra={"pid": result.pid, "detail": result.detail})
            self._logged_ok = result.ok

    async def run(self) -> None:
        if not self.enabled:
            return
        # One client for the probe's lifetime: a connection pool, not a new one per check.
        client = aiohttp.ClientSession() if self.settings.kind == "http" else None
        try:
            while True:
                pid = await self._wait_for_main()
                log.debug("readiness: checking main process %d", pid)
                # The previous process's result must not speak for this one (see `verdict`); the
                # next transition is logged again, so a restart's readiness shows in the log.
                self._logged_ok = None
                if not await self._sleep_same_pid(self.settings.initial_delay_s, pid):
                    continue
                while True:
                    await self.check_once(client)
                    if not await self._sleep_same_pid(self.settings.period_s, pid):
                        break
        finally:
            if client is not None:
                await client.close()

    async def _wait_for_main(self) -> int:
        while True:
            pid = self._main_pid()
            if pid is not None:
                return pid
            await asyncio.sleep(PID_POLL_S)

    async def _sleep_same_pid(self, seconds: float, pid: int) -> bool:
        """Sleep ``seconds``; return False early if the main process changed or went away."""
        deadline = time.monotonic() + seconds
        while True:
            if self._main_pid() != pid:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            await asyncio.sleep(min(left, PID_POLL_S))

    def to_json(self, main_running: bool) -> dict[str, Any]:
        verdict = self.verdict(main_running)
        return {
            "ready": verdict.ready,
            "reason": verdict.reason,
            "kind": self.settings.kind,
            "last_check": self.last.to_json() if self.last is not None else None,
        }
