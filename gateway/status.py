"""``openshell-gateway status``: the sandboxes, their state and their last log lines, read through
the HTTP API (the same document an agent reads), rendered for a terminal. The state and the
"since" column are the API's, derived by :mod:`gateway.sandbox_state`: a sandbox whose heartbeat
went stale shows as disconnected since its last heartbeat, even if its disconnection was never
written."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiohttp


class StatusError(Exception):
    pass


async def fetch_status(api_url: str, *, lines: int) -> list[dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(f"{api_url}/api/v1/sandboxes") as resp:
                resp.raise_for_status()
                sandboxes: list[dict[str, Any]] = (await resp.json())["sandboxes"]
            for sb in sandboxes:
                sb["_events"] = []
                if lines > 0:
                    async with http.get(
                        f"{api_url}/api/v1/sandboxes/{sb['id']}/logs", params={"tail": lines}
                    ) as r:
                        r.raise_for_status()
                        sb["_events"] = (await r.json())["events"]
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise StatusError(f"cannot reach the gateway API at {api_url}: {exc or type(exc).__name__}") from None
    return sandboxes


def _ago(value: str | None) -> str:
    if not value:
        return "-"
    then = datetime.fromisoformat(value)
    seconds = (datetime.now(UTC) - then).total_seconds()
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _one_line(message: str, limit: int = 160) -> str:
    """A terminal row per event: the first line, shortened, with a mark when something was cut."""
    first, *rest = message.splitlines() or [""]
    if len(first) > limit or rest:
        return first[:limit] + " ..."
    return first


def render(sandboxes: list[dict[str, Any]]) -> str:
    if not sandboxes:
        return "no sandboxes"
    out = [f"{'SANDBOX':24} {'STATE':13} {'EXIT':>4}  {'LAST HEARTBEAT':15} {'SINCE':12}"]
    for sb in sandboxes:
        exit_code = "" if sb.get("exit_code") is None else str(sb["exit_code"])
        since = (
            sb.get("disconnected_since")
            if sb["state"] in ("disconnected", "lost")
            else sb.get("connected_at")
        )
        beat = _ago(sb.get("last_heartbeat_at"))
        out.append(f"{sb['id'][:24]:24} {sb['state']:13} {exit_code:>4}  {beat:15} {_ago(since):12}")
        for ev in sb.get("_events", []):
            stamp = datetime.fromtimestamp(ev["timestamp_ms"] / 1000, UTC).strftime("%H:%M:%S")
            tag = ev.get("stream") or ev["kind"]
            out.append(f"    {stamp} #{ev['sequence']:<6} {tag:10} {_one_line(ev['message'])}")
    return "\n".join(out)
