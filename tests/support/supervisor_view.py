"""A stand-in for the agent behind the supervisor's HTTP endpoints (``supervisor.metrics.SupervisorView``).

Plain mutable attributes: a test sets the state it wants the endpoints to see. It satisfies the
Protocol structurally, as the real agent will.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from supervisor.journal import JournalStats
from supervisor.session import SessionStatus


def journal_stats(**changes: Any) -> JournalStats:
    values: dict[str, Any] = {
        "bytes_on_disk": 4096,
        "records": 12,
        "segments": 1,
        "first_sequence": 1,
        "last_sequence": 12,
        "acked_through": 10,
        "sent_through": 12,
        "dropped_records_total": 0,
        "corrupt_records_total": 0,
    }
    values.update(changes)
    return JournalStats(**values)


@dataclass
class FakeView:
    sandbox_id: str = "sbx-1"
    instance_id: str = "inst-1"
    main_pid: int | None = None
    started_at: float | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    session_status: SessionStatus = field(default_factory=SessionStatus)
    journal_stats: JournalStats = field(default_factory=journal_stats)
    loop_heartbeat: float = field(default_factory=time.monotonic)

    @property
    def main_running(self) -> bool:
        return self.main_pid is not None

    def start_main(self, pid: int) -> None:
        if self.started_at is not None:
            self.restarts += 1
        self.main_pid = pid
        self.started_at = time.time()

    def exit_main(self, code: int) -> None:
        self.main_pid = None
        self.last_exit_code = code

    def connect(self, session_id: str = "s-1") -> None:
        s = self.session_status
        s.attempts += 1
        s.sessions += 1
        s.state = "connected"
        s.mode = "events"
        s.session_id = session_id
        s.connected_since = time.monotonic()
