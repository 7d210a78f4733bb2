"""A rate-limited log, for what peers can trigger at will (bad frames, store failures, repeated exit
reports), so that no peer, nor many peers together, can flood the gateway's log.

Each concern (malformed frames, store failures, background writes...) has an instance of its own,
so a flood of one kind cannot crowd out the lines of another. An instance lets a line through only
when both hold:

- its key (peer host and method, or method, or run) was not logged within ``interval_s``, so one
  repeated cause costs one line per interval (keys are bounded: the oldest are forgotten first);
- the instance's token bucket has a token: at most ``burst`` lines per ``interval_s`` whatever the
  number of keys, so 20,000 peers each sending one bad frame cost ``burst`` lines, not 20,000.

What is left out is counted: the next line that gets through says how many, and when lines were
left out and none got through since, a summary line says how many at the end of the interval
(a timer on the running event loop; ``close`` writes the last one at shutdown).

A module of its own, below both the gRPC layer (:mod:`gateway.rpc`) and the store, so that each
can use it without importing the other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

#: At most one log line per key this often, and at most ``burst`` lines per instance.
LOG_INTERVAL_S = 60.0
LOG_BURST = 10


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.5:41234`` -> ``ipv4:10.0.0.5``: every connection of one host shares a key."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


class RateLimitedLog:
    """Logs at most one line per key every ``interval_s`` and at most ``burst`` lines per
    ``interval_s`` in all; see the module docstring."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        concern: str = "log",
        interval_s: float = LOG_INTERVAL_S,
        burst: int = LOG_BURST,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._concern = concern
        self._interval_s = interval_s
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._tokens = float(burst)
        self._refilled = clock()
        #: Lines left out since the last line (or summary) written.
        self._suppressed = 0
        self._summary: asyncio.TimerHandle | None = None

    @property
    def suppressed(self) -> int:
        """Lines left out and not yet reported by a later line or a summary."""
        return self._suppressed

    def log(
        self,
        level: int,
        key: Hashable,
        message: str,
        *,
        exc_info: BaseException | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """Log ``message`` unless ``key`` was logged within the interval or the instance's bucket
        is empty; True when logged."""
        now = self._clock()
        self._refill(now)
        last = self._last.get(key)
        if (last is not None and now - last < self._interval_s) or self._tokens < 1:
            self._suppressed += 1
            self._schedule_summary()
            return False
        self._tokens -= 1
        self._last.pop(key, None)
        while len(self._last) >= self._max_keys:
            self._last.pop(next(iter(self._last)))
        self._last[key] = now
        if self._suppressed:
            message += f" (and {self._suppressed} more {self._concern} lines left out before this one)"
            self._suppressed = 0
        self._logger.log(level, "%s", message, exc_info=exc_info, extra=extra)
        return True

    def close(self) -> None:
        """Write the summary of what is still left out now, and stop the summary timer."""
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
        self._summarize()

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._refilled)
        self._tokens = min(float(self._burst), self._tokens + elapsed * self._burst / self._interval_s)
        self._refilled = now

    def _schedule_summary(self) -> None:
        if self._summary is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): the next line that gets through says it
            return
        self._summary = loop.call_later(self._interval_s, self._on_timer)

    def _on_timer(self) -> None:
        self._summary = None
        self._summarize()

    def _summarize(self) -> None:
        if self._suppressed:
            self._logger.warning(
                "%d more %s lines left out in the last %.0fs (rate-limited)",
                self._suppressed,
                self._concern,
                self._interval_s,
            )
            self._suppressed = 0
