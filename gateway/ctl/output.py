"""What the API commands print: aligned tables (ids never cut), or the API's documents as JSON
or YAML, unchanged, so that a script reads exactly what an agent reading the API reads.

Times in tables are ages (``42s``, ``7m``, ``3h``, ``2d``) from the caller's clock; the documents
keep the API's RFC 3339 times.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import yaml

FORMATS = ("table", "wide", "json", "yaml")


def dump(doc: object, fmt: str) -> str:
    """``doc`` as ``json`` (indented) or ``yaml`` (keys in the API's order)."""
    if fmt == "yaml":
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip("\n")
    return json.dumps(doc, indent=2)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns as wide as their widest cell, three spaces apart (the last column unpadded)."""
    columns = Columns(headers)
    columns.widen(rows)
    return "\n".join(columns.line(row) for row in (headers, *rows))


class Columns:
    """A table printed in parts (``get --watch``): each column as wide as its widest cell so far,
    so that a later row is never narrower than an earlier one, without keeping the rows."""

    def __init__(self, headers: Sequence[str]) -> None:
        self.headers = list(headers)
        self.widths = [len(h) for h in headers]

    def widen(self, rows: Sequence[Sequence[str]]) -> None:
        for row in rows:
            self.widths = [max(w, len(str(cell))) for w, cell in zip(self.widths, row, strict=True)]

    def line(self, row: Sequence[str]) -> str:
        """``row`` as :func:`table` prints it (the last column unpadded)."""
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], self.widths, strict=False)] + [str(row[-1])]
        return "   ".join(cells).rstrip()


def age(value: object, *, now: datetime) -> str:
    """An ISO time as an age from ``now``: ``42s``, ``7m``, ``3h``, ``2d``; ``-`` when unset."""
    if not isinstance(value, str) or not value:
        return "-"
    seconds = max(0.0, (now - datetime.fromisoformat(value)).total_seconds())
    # Each unit from twice the next smaller's limit: "90s" reads better than "1m".
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _text(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _driver_state(value: object) -> str:
    if isinstance(value, Mapping):
        return _text(value.get("phase"))
    return _text(value)


SANDBOX_HEADERS = ("ID", "STATE", "EXIT", "LAST HEARTBEAT", "AGE")
SANDBOX_WIDE = ("GENERATION", "DRIVER", "DRIVER STATE", "CONNECTED", "CREATED BY", "TEAM")


def sandbox_headers(*, wide: bool) -> tuple[str, ...]:
    return SANDBOX_HEADERS + (SANDBOX_WIDE if wide else ())


def sandbox_table(sandboxes: Sequence[Mapping[str, Any]], *, wide: bool, now: datetime) -> str:
    return table(sandbox_headers(wide=wide), [sandbox_row(sb, wide=wide, now=now) for sb in sandboxes])


def sandbox_row(sb: Mapping[str, Any], *, wide: bool, now: datetime) -> list[str]:
    row = [
        str(sb["id"]),
        str(sb["state"]),
        _text(sb.get("exit_code")),
        age(sb.get("last_heartbeat_at"), now=now),
        age(sb.get("created_at"), now=now),
    ]
    if wide:
        row += [
            _text(sb.get("generation")),
            _text(sb.get("driver")),
            _driver_state(sb.get("driver_state")),
            "yes" if sb.get("connected") else "no",
            _text(sb.get("created_by")),
            _text(sb.get("team")),
        ]
    return row


COMMAND_HEADERS = ("ID", "KIND", "ARGUMENT", "STATE", "DELIVERED", "AGE", "ERROR")


def _command_argument(c: Mapping[str, Any]) -> str:
    if c.get("kind") == "signal":
        return _signal_name(c.get("signal"))
    if c.get("kind") == "stop":
        return f"grace {c.get('grace_ms')}ms"
    return f"interval {c.get('interval_ms')}ms"


def _signal_name(number: object) -> str:
    try:
        return signal.Signals(number).name if isinstance(number, int) else _text(number)
    except ValueError:
        return str(number)


def command_table(commands: Sequence[Mapping[str, Any]], *, now: datetime) -> str:
    rows = [
        [
            str(c["id"]),
            str(c["kind"]),
            _command_argument(c),
            str(c["state"]),
            "yes" if c.get("delivered_at") else "no",
            age(c.get("created_at"), now=now),
            _text(c.get("error")),
        ]
        for c in commands
    ]
    return table(COMMAND_HEADERS, rows)


def event_line(event: Mapping[str, Any]) -> str:
    """One stored event for a terminal: its UTC time to the millisecond, its stream (or kind, with
    a structured line's level), its message as it is."""
    at = datetime.fromtimestamp(int(event["timestamp_ms"]) / 1000, UTC)
    stamp = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
    tag = event.get("stream") or event.get("kind") or "-"
    level = (event.get("data") or {}).get("level")
    if isinstance(level, str) and level:
        tag = f"{tag}/{level}"
    return f"{stamp} {tag:9} {event.get('message', '')}"


# -- the fleet summary ---------------------------------------------------------------------


def _count_line(counts: Mapping[str, Any]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())


def _clock_time(value: object) -> str:
    """An ISO time as UTC hh:mm:ss (with the date when not today's)."""
    if not isinstance(value, str):
        return "-"
    at = datetime.fromisoformat(value).astimezone(UTC)
    return at.strftime("%H:%M:%S" if at.date() == datetime.now(UTC).date() else "%Y-%m-%d %H:%M:%S")


def _rows(rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned rows without a header, indented by two spaces (a section of the fleet summary)."""
    if not rows:
        return []
    return ["  " + line for line in table(rows[0], rows[1:]).splitlines()]


def render_fleet(doc: Mapping[str, Any]) -> str:
    """The summary for a terminal: counts, then the unhealthy, the exited and the replicas; ids whole."""
    out = [
        f"{doc['sandboxes']} sandboxes: {_count_line(doc['by_state'])}",
        f"health (not exited): {_count_line(doc['by_health'])}",
    ]
    unhealthy = doc["unhealthy"]
    if unhealthy["sandboxes"]:
        more = f" (showing {len(unhealthy['sandboxes'])})" if unhealthy["truncated"] else ""
        out += ["", f"unhealthy or degraded: {unhealthy['total']}{more}"]
        out += _rows(
            [
                [u["id"], u["health"], u["state"], f"since {_clock_time(u['since'])}", u["reason"] or "-"]
                for u in unhealthy["sandboxes"]
            ]
        )
    exited = doc["exited"]
    more = f" (showing {len(exited['sandboxes'])})" if exited["truncated"] else ""
    out += ["", f"exited since {_clock_time(exited['since'])}: {exited['total']}{more}"]
    out += _rows(
        [
            [x["id"], f"exit {x['exit_code']}", f"at {_clock_time(x['exited_at'])}", x["reason"] or "-"]
            for x in exited["sandboxes"]
        ]
    )
    replicas = doc.get("replicas")
    if replicas:
        out += ["", "replicas:"]
        rows = []
        for r in replicas:
            marks = [m for m, on in (("draining", r["draining"]), ("lease lapsed", not r["alive"])) if on]
            rows.append(
                [
                    r["id"],
                    f"{r['sessions']} sessions",
                    f"renewed {r['lease_age_s']:.0f}s ago",
                    f"({', '.join(marks)})" if marks else "",
                ]
            )
        out += _rows(rows)
    return "\n".join(out)
