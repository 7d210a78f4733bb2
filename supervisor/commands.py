"""Commands from the gateway, applied at most once each.

The gateway sends a command again on every new session until it has the supervisor's answer, so
the same id can arrive several times (a cut between our apply and the gateway's receipt of the
result, a gateway restart). Each id is written durably *before* the command is applied, and its
outcome after: a repeat is answered with the outcome of the first delivery, marked duplicate, and
changes nothing. The price of that order is that a supervisor killed between writing the id and
applying the command never applies it; the next delivery then says so (not applied, duplicate),
the visible and safe side of the trade.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from supervisor.journal.fsio import atomic_write

log = logging.getLogger(__name__)

#: Ids remembered; the gateway redelivers only unanswered commands, so a short memory suffices.
REMEMBERED = 1000

INTERRUPTED = "the supervisor stopped while applying it; it was not applied again"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the first delivery of a command came to; ``applied`` None: it never finished."""

    applied: bool | None
    error: str = ""


class AppliedCommands:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._seen: OrderedDict[str, Outcome] = OrderedDict()
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s): commands may be applied again", self._path, exc)
            return
        if not isinstance(data, dict):
            log.warning("ignoring %s: not a mapping of command ids", self._path)
            return
        for command_id, outcome in data.items():
            if isinstance(outcome, dict):
                applied = outcome.get("applied")
                error = outcome.get("error", "")
                self._seen[str(command_id)] = Outcome(
                    applied if isinstance(applied, bool) else None, error if isinstance(error, str) else ""
                )

    def outcome(self, command_id: str) -> Outcome | None:
        """The first delivery's outcome, or None when this id was never seen."""
        found = self._seen.get(command_id)
        if found is not None and found.applied is None:
            return Outcome(False, INTERRUPTED)
        return found

    def begin(self, command_id: str) -> None:
        """Durably note ``command_id`` before applying it. Raises OSError (and notes nothing)."""
        self._write(command_id, Outcome(None))

    def finish(self, command_id: str, *, applied: bool, error: str = "") -> None:
        """Note the outcome; a failure to write it is logged, the id stays noted as begun."""
        try:
            self._write(command_id, Outcome(applied, error))
        except OSError as exc:
            log.warning("cannot record the outcome of command %s: %s", command_id, exc)

    def _write(self, command_id: str, outcome: Outcome) -> None:
        before = self._seen.get(command_id)
        self._seen[command_id] = outcome
        self._seen.move_to_end(command_id)
        while len(self._seen) > REMEMBERED:
            self._seen.popitem(last=False)
        doc = {k: {"applied": v.applied, "error": v.error} for k, v in self._seen.items()}
        try:
            atomic_write(self._path, [json.dumps(doc).encode()])
        except OSError:
            # Keep memory and disk in agreement: an id that is not on disk was not noted.
            if before is None:
                self._seen.pop(command_id, None)
            else:
                self._seen[command_id] = before
            raise
