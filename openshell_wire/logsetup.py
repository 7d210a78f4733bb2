"""Structured logging for both components: one line per event, text for people, JSON for machines.

Context travels in ``extra={...}`` (sandbox_id, session_id, ...); the text format appends it as
``key=value`` pairs and the JSON format as fields, so both stay greppable.

A server (the gateway) also installs :class:`VanishedPeerFilter` (:func:`quiet_vanished_peers`):
gRPC's asyncio server says "a client went away" as an ERROR with a traceback, which a storm of
clients giving up would turn into thousands; it is made a counted debug line.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        extra = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{ts} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if extra:
            line += f"  {extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_extras(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str, fmt: str, *, stream: TextIO | None = None, prefix: str = "") -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries stay quiet unless asked.
    # httpx(2): one INFO line per request, the leader Lease renewal every retry period included.
    for noisy in ("aiosqlite", "sqlalchemy.engine", "alembic", "asyncio", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


#: The logger of gRPC's asyncio server (``grpc/_cython/_cygrpc/aio/server.pyx.pxi``).
GRPC_SERVER_LOGGER = "grpc._cython.cygrpc"
# What gRPC's server logs when a batch of a call fails and its client is not yet known to be gone...
_VANISHED_MSG = "ExecuteBatchError raised in core by servicer method ["
# ...and what its exception says when core ran the batch and failed it (the call was cancelled or
# its connection lost), as opposed to 'Failed grpc_call_start_batch: <error>', a batch core would
# not start (e.g. two writes at once on one call): a misuse of ours, which stays an error.
_FAILED_IN_CORE = 'Failed "execute_batch"'


class VanishedPeerFilter(logging.Filter):
    """Makes gRPC's "ExecuteBatchError raised in core" about a client that went away a debug line
    without traceback, and counts it.

    gRPC's asyncio server ignores a failed batch of a call whose client it knows has left, but a
    client that leaves while the reply (a refusal's status, a message) is on its way is often known
    only a moment later: the failure is then logged at ERROR with its traceback, once per client.
    That is the peer's departure, not a fault of the server: a storm of hellos whose callers gave
    up would fill the log with thousands of tracebacks. Only that record, with the exception gRPC
    raises for a batch core failed, is changed; every other record of gRPC keeps its level.
    Shown when its logger is enabled for debug (the gateway's ``log_level: debug``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._count = 0

    @property
    def count(self) -> int:
        """How many such records were seen (shown or not) since the filter was made."""
        return self._count

    def filter(self, record: logging.LogRecord) -> bool:
        if not is_vanished_peer(record):
            return True
        with self._lock:
            self._count += 1
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        record.peer_vanished = True
        # The logger let the record through at ERROR: at DEBUG it is shown only if debug is on.
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def is_vanished_peer(record: logging.LogRecord) -> bool:
    """The record gRPC's asyncio server logs for a batch core failed on a call whose client left."""
    if record.name != GRPC_SERVER_LOGGER or record.levelno != logging.ERROR:
        return False
    if not isinstance(record.msg, str) or not record.msg.startswith(_VANISHED_MSG):
        return False
    exc = record.exc_info[1] if record.exc_info else None
    return exc is not None and is_failed_batch(exc)


def is_failed_batch(exc: BaseException) -> bool:
    """gRPC's error for a batch its core failed (a message or status for a call whose client
    left): raised by ``context.write`` in a handler, or by gRPC's own send of a yielded answer."""
    return type(exc).__name__ == "ExecuteBatchError" and str(exc).startswith(_FAILED_IN_CORE)


_vanished = VanishedPeerFilter()


def quiet_vanished_peers() -> VanishedPeerFilter:
    """Install :class:`VanishedPeerFilter` on gRPC's server logger (once per process: the logger is
    the process's) and return it."""
    logging.getLogger(GRPC_SERVER_LOGGER).addFilter(_vanished)  # no-op when already there
    return _vanished


def vanished_peers() -> int:
    """How many "client went away" records of gRPC's server this process has counted."""
    return _vanished.count
