"""Commands from the gateway, applied at most once each.

The gateway sends a command again on every new session until it has the supervisor's answer, so
the same id can arrive several times (a cut between our apply and the gateway's receipt of the
result, a gateway restart). The ids applied here are remembered in a small file beside the
journal, written durably *before* the command is applied: a repeat is then answered as a
duplicate and changes nothing. The price of that order is that a supervisor killed between
writing the id and applying the command never applies it; its answer then says so on the next
delivery (``duplicate``), which is the visible, safe side of the trade.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from pathlib import Path

from supervisor.journal.fsio import atomic_write

log = logging.getLogger(__name__)

#: Ids remembered; the gateway redelivers only unanswered commands, so a short memory suffices.
REMEMBERED = 1000


class AppliedCommands:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._ids: deque[str] = deque(maxlen=REMEMBERED)
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s): commands may be applied again", self._path, exc)
            return
        if isinstance(data, list) and all(isinstance(i, str) for i in data):
            self._ids.extend(data)
        else:
            log.warning("ignoring %s: not a list of command ids", self._path)

    def seen(self, command_id: str) -> bool:
        return command_id in self._ids

    def remember(self, command_id: str) -> None:
        """Durably note ``command_id`` as applied. Raises OSError when that cannot be written."""
        self._ids.append(command_id)
        atomic_write(self._path, [json.dumps(list(self._ids)).encode()])
