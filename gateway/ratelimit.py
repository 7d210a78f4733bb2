"""A rate-limited log: at most one line per key every interval, for what peers can trigger at will
(bad frames, store failures, repeated exit reports), so that no peer can flood the gateway's log.

A module of its own, below both the gRPC layer (:mod:`gateway.rpc`) and the store, so that each
can use it without importing the other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

#: At most one log line per key (peer host and method, or method for store failures) this often.
LOG_INTERVAL_S = 60.0


@dataclass(slots=True)
class _Seen:
    last: float
    suppressed: int = 0


class RateLimitedLog:
    """Logs at most one line per key every ``interval_s``; the next line that gets through says how
    many were left out. Keys are bounded (the oldest forgotten first), so a flood from many peers
    cannot grow memory. A count left out when the flood stops is only in the metrics."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = LOG_INTERVAL_S,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._clock = clock
        self._seen: dict[Hashable, _Seen] = {}

    def log(
        self,
        level: int,
        key: Hashable,
        message: str,
        *,
        exc_info: BaseException | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """Log ``message`` unless ``key`` was logged within the interval; True when logged."""
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.last < self._interval_s:
            seen.suppressed += 1
            return False
        suppressed = seen.suppressed if seen is not None else 0
        self._seen.pop(key, None)
        while len(self._seen) >= self._max_keys:
            self._seen.pop(next(iter(self._seen)))
        self._seen[key] = _Seen(last=now)
        if suppressed:
            message += f" (and {suppressed} more like it in the last {self._interval_s:.0f}s)"
        self._logger.log(level, "%s", message, exc_info=exc_info, extra=extra)
        return True
