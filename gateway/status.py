"""``openshell-gateway status``: the sandboxes, their state and their last log lines, read through
the HTTP API (the same document an agent reads), rendered for a terminal. The state and the
"since" column are the API's, derived by :mod:`gateway.sandbox_state`: a sandbox whose heartbeat
went stale shows as disconnected since its last heartbeat, even if its disconnection was never
written.

The calls carry the caller's bearer token (:mod:`gateway.clientauth`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiohttp

from gateway.clientauth import ApiClient, Credentials, NoCredentials


class StatusError(Exception):
    """The API could not be reached (``status`` None) or refused (its HTTP status)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _refused(api_url: str, what: str, status: int, doc: Any) -> StatusError:
    message = doc.get("error") if isinstance(doc, dict) else None
    return StatusError(
        f"the gateway API at {api_url} refused {what}: HTTP {status}: {message or doc}", status
    )


async def fetch_status(
    api_url: str, *, lines: int, credentials: Credentials | None = None
) -> list[dict[str, Any]]:
    try:
        async with ApiClient(api_url, credentials or NoCredentials(api_url), timeout_s=10) as api:
            status, doc = await api.request("GET", "/sandboxes")
            if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("sandboxes"), list):
                raise _refused(api_url, "the sandbox list", status, doc)
            sandboxes: list[dict[str, Any]] = doc["sandboxes"]
            for sb in sandboxes:
                sb["_events"] = []
                if lines > 0:
                    status, doc = await api.request(
                        "GET", f"/sandboxes/{sb['id']}/logs", params={"tail": lines}
                    )
                    if status != 200 or not isinstance(doc, dict):
                        raise _refused(api_url, f"the logs of {sb['id']}", status, doc)
                    sb["_events"] = doc.get("events", [])
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
    # As wide as the longest id: an id is never cut (two that share a prefix stay two).
    width = max(24, *(len(sb["id"]) for sb in sandboxes))
    out = [f"{'SANDBOX':{width}} {'STATE':13} {'EXIT':>4}  {'LAST HEARTBEAT':15} {'SINCE':12}"]
    for sb in sandboxes:
        exit_code = "" if sb.get("exit_code") is None else str(sb["exit_code"])
        since = (
            sb.get("disconnected_since")
            if sb["state"] in ("disconnected", "lost")
            else sb.get("connected_at")
        )
        beat = _ago(sb.get("last_heartbeat_at"))
        out.append(f"{sb['id']:{width}} {sb['state']:13} {exit_code:>4}  {beat:15} {_ago(since):12}".rstrip())
        for ev in sb.get("_events", []):
            stamp = datetime.fromtimestamp(ev["timestamp_ms"] / 1000, UTC).strftime("%H:%M:%S")
            tag = ev.get("stream") or ev["kind"]
            # A structured line (an upstream supervisor's) shows its level beside the stream.
            level = (ev.get("data") or {}).get("level")
            if isinstance(level, str) and level:
                tag = f"{tag}/{level}"
            out.append(f"    {stamp} #{ev['sequence']:<6} {tag:10} {_one_line(ev['message'])}")
    return "\n".join(out)
