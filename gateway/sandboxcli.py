"""``openshell-gateway sandbox create|delete`` and ``fleet``: the HTTP API's sandbox calls from a
terminal.

The same requests an agent or a script sends (``POST /api/v1/sandboxes``, ``DELETE
/api/v1/sandboxes/{id}``); the answer is printed as the API's JSON, and a refusal as the API's
own sentence with a non-zero exit status. A request is checked here first by the same rule the
gateway applies (:func:`gateway.drivers.podspec.request_problem`), so a bad one is refused with
that sentence before anything is sent. ``fleet`` prints the fleet summary (``GET /api/v1/fleet``,
:mod:`gateway.fleet`) as a few readable lines, or as the API's JSON.

The call carries the caller's bearer token (:mod:`gateway.clientauth`: ``--token-file``,
``$OPENSHELL_TOKEN`` or the login cache, refreshed as needed); an authentication problem is a
:class:`~gateway.clientauth.ClientAuthError` that says what to run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp

from gateway.clientauth import ApiClient, Credentials, NoCredentials
from gateway.drivers.podspec import SandboxRequest, request_problem
from openshell_wire.records import sandbox_id_problem


class SandboxCallError(Exception):
    """The API could not be reached (``status`` None) or refused (its HTTP status and sentence)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SandboxCallError(f"--env {item!r}: expected NAME=VALUE", 400)
        env[name] = value
    return env


async def _call(
    api_url: str,
    method: str,
    path: str,
    body: Mapping[str, Any] | None = None,
    *,
    credentials: Credentials | None = None,
    params: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    try:
        async with ApiClient(api_url, credentials or NoCredentials(api_url), timeout_s=60) as api:
            status, doc = await api.request(method, path, json_body=body, params=params)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SandboxCallError(
            f"cannot reach the gateway API at {api_url}: {exc or type(exc).__name__}"
        ) from None
    if not isinstance(doc, dict):
        raise SandboxCallError(f"the API answered HTTP {status} with a non-object", status)
    if status >= 400:
        raise SandboxCallError(str(doc.get("error", doc)), status)
    return doc


async def create_sandbox(
    api_url: str,
    sandbox_id: str,
    command: Sequence[str],
    *,
    image: str | None,
    env: Mapping[str, str],
    credentials: Credentials | None = None,
) -> dict[str, Any]:
    problem = request_problem(SandboxRequest(sandbox_id, list(command), image=image or None, env=dict(env)))
    if problem is not None:
        raise SandboxCallError(problem, 400)
    body: dict[str, Any] = {"id": sandbox_id}
    if command:  # none: the image's own ENTRYPOINT and CMD
        body["command"] = list(command)
    if image:
        body["image"] = image
    if env:
        body["env"] = dict(env)
    return await _call(api_url, "POST", "/sandboxes", body, credentials=credentials)


async def delete_sandbox(
    api_url: str, sandbox_id: str, *, credentials: Credentials | None = None
) -> dict[str, Any]:
    # The id becomes a path segment: "../commands" must not name another resource.
    problem = sandbox_id_problem(sandbox_id)
    if problem is not None:
        raise SandboxCallError(f"id: {problem}", 400)
    return await _call(api_url, "DELETE", f"/sandboxes/{sandbox_id}", credentials=credentials)


async def fetch_fleet(
    api_url: str, *, since: str | None, limit: int | None, credentials: Credentials | None = None
) -> dict[str, Any]:
    """The fleet summary document; ``since`` and ``limit`` are passed as given (the API checks them)."""
    params = {k: str(v) for k, v in (("since", since), ("limit", limit)) if v is not None}
    return await _call(api_url, "GET", "/fleet", credentials=credentials, params=params)


def _count_line(counts: Mapping[str, Any]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())


def _when(value: object) -> str:
    """An ISO time as UTC hh:mm:ss (with the date when not today's)."""
    if not isinstance(value, str):
        return "-"
    at = datetime.fromisoformat(value).astimezone(UTC)
    return at.strftime("%H:%M:%S" if at.date() == datetime.now(UTC).date() else "%Y-%m-%d %H:%M:%S")


def render_fleet(doc: Mapping[str, Any]) -> str:
    """The summary for a terminal: counts, then the unhealthy, the exited and the replicas."""
    out = [
        f"{doc['sandboxes']} sandboxes: {_count_line(doc['by_state'])}",
        f"health (not exited): {_count_line(doc['by_health'])}",
    ]
    unhealthy = doc["unhealthy"]
    if unhealthy["sandboxes"]:
        more = f" (showing {len(unhealthy['sandboxes'])})" if unhealthy["truncated"] else ""
        out += ["", f"unhealthy or degraded: {unhealthy['total']}{more}"]
        for u in unhealthy["sandboxes"]:
            out.append(
                f"  {u['id'][:32]:32} {u['health']:9} {u['state']:12} since {_when(u['since'])}  "
                f"{u['reason'] or '-'}"
            )
    exited = doc["exited"]
    more = f" (showing {len(exited['sandboxes'])})" if exited["truncated"] else ""
    out += ["", f"exited since {_when(exited['since'])}: {exited['total']}{more}"]
    for x in exited["sandboxes"]:
        out.append(
            f"  {x['id'][:32]:32} exit {x['exit_code']:<4} at {_when(x['exited_at'])}  {x['reason'] or '-'}"
        )
    replicas = doc.get("replicas")
    if replicas:
        out += ["", "replicas:"]
        for r in replicas:
            marks = [m for m, on in (("draining", r["draining"]), ("lease lapsed", not r["alive"])) if on]
            out.append(
                f"  {r['id'][:32]:32} {r['sessions']:>6} sessions  renewed {r['lease_age_s']:.0f}s ago"
                + (f"  ({', '.join(marks)})" if marks else "")
            )
    return "\n".join(out)
