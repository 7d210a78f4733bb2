"""The gateway's HTTP JSON API: sandbox state and logs, for people, scripts and agents alike.

Read-only views over the store. A sandbox's ``state`` and ``connected`` are derived at read time
by :mod:`gateway.sandbox_state` (the one rule the status command and the metrics use too) from what
the store records (session, last heartbeat, disconnect time, exit), so they can never go stale in
the database:

- ``exited``: its main process has exited (the exit code is known);
- ``connected``: a supervisor session is up and its last heartbeat is fresh;
- ``lost``: disconnected for longer than ``lost_after_s``;
- ``disconnected``: was connected, is not (or its heartbeat went stale), for less than that;
- ``pending``: registered but never connected.

Logs come as a JSON tail, or with ``follow=1`` as a stream of NDJSON lines (one event per line)
that first sends the tail and then each event as the gateway stores it, until the client goes away
(or, with ``until_exit=1``, until the sandbox has exited and everything up to its exit is sent).
Both forms take filters, evaluated by the database (:class:`gateway.store.events.LogQuery`):
``since``/``until`` on the record's own time (RFC 3339, or a duration back from now such as
``10m``), ``stream``, ``level`` (a floor, over the records that carry one: captured lines carry
none) and ``text`` (a case-sensitive substring); gap records are never dropped by them
(docs/log-queries.md).
A follower wakes on the event store's notification, which on PostgreSQL comes from whichever
replica stored the batch (:mod:`gateway.notify`, within about a second), and otherwise re-checks
every few seconds (every second while this replica's listening connection is down), so a missed
wake-up costs latency, never events: the database is always the source.

``GET /api/v1/version`` names the gateway's release (``{"version": "0.1.0", "api": "v1"}``) for
``openshell-gateway version``; it takes a token as every read does (a release number tells an
attacker which advisories apply, so it is not told to anyone who asks).

``GET /api/v1/fleet`` summarises what the caller may list (:mod:`gateway.fleet`): counts by state
and by last reported health, the unhealthy and the recently exited sandboxes, and (for admins) the
replicas' load, each part one bounded statement (docs/fleet.md).

Commands for a sandbox's supervisor (``stop``, ``signal``, ``heartbeat``) are created with a POST,
stored with an expiry (``expires_in_s``, else ``commands.ttl_s``), sent at once to the sandbox's
live session on whichever replica holds it (:mod:`gateway.routing`; ``delivered`` says whether that
session wrote it to its stream within ``commands.delivery_wait_s``, which the owning replica records
as ``delivered_at``/``delivered_by``), and otherwise with its next session unless it expires first;
their state (``pending``, ``applied``, ``failed``, ``expired``) is readable until answered and after.
A command POST may carry an ``Idempotency-Key`` header (1 to 200 visible ASCII characters): a
repeat with the same key for the same sandbox answers the command stored first (200, same id,
nothing stored again) instead of 201, or 422 if its body differs.

With the Kubernetes driver, ``POST /api/v1/sandboxes`` (``{"id", "command", "image", "env"}``;
without a command, the image's ENTRYPOINT and CMD read from its registry) creates a sandbox pod
and ``DELETE /api/v1/sandboxes/{id}`` deletes it (the row and its events stay; ``driver_state``
follows the pod). Once its pod is gone the id can be created again, as the row's next
``generation``; logs are the current generation's unless ``?generation=N`` asks for an earlier one
(a follow of an earlier one ends once it has sent everything stored for it).
A request is checked by :func:`gateway.drivers.podspec.request_problem` (400 naming the field), and
every body is bounded in size (``http.max_body_bytes``, 413) and JSON nesting (400, one linear
scan) before parsing.
People authenticate with OIDC bearer tokens (``Authorization: Bearer <access token>``) when
``auth.oidc.issuer_url`` is set (:mod:`gateway.auth.oidc` verifies them, :mod:`gateway.auth.people`
says what their role lets them do): a missing or bad token is 401 with ``WWW-Authenticate``, an
issuer that cannot be asked 503, a token without an OpenShell role 403, and a role too low for the
endpoint 403. A non-admin sees and acts only on sandboxes it created or of one of its teams;
another's sandbox (and its logs and commands) is 404, as if it did not exist. ``GET /api/v1/auth``
(no token needed) tells clients the issuer and the CLI's client id. Without OIDC every caller is
admin (the configuration allows that only on loopback, or when told to).

This listener carries only ``/api/...``: probes and the Prometheus exposition are on the
operations listener (:mod:`gateway.ops`, ``ops.listen``), so that auth covers the whole API.

Every error is a JSON object ``{"error": "..."}`` with a fitting status; a follow stream that
fails after it started (the headers are gone by then) ends with such an object as its last line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import re
import signal
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.auth.oidc import TokenProblem, TokenRefused
from gateway.auth.people import NOBODY_ADMIN, REQUIRED_ROLE, Action, PeopleAuth, Person, may_see, scope_of
from gateway.config import CommandSettings, SessionSettings
from gateway.drivers import Provisioner, ProvisionError
from gateway.drivers.podspec import SandboxRequest, request_problem
from gateway.fleet import DEFAULT_LIMIT as FLEET_DEFAULT_LIMIT
from gateway.fleet import MAX_LIMIT as FLEET_MAX_LIMIT
from gateway.fleet import FleetRequest, exited_since, fleet_summary
from gateway.metrics import GatewayMetrics
from gateway.notify import Notifier
from gateway.ratelimit import RateLimitedLog
from gateway.sandbox_state import (
    Liveness,
    ReplicaLeases,
    disconnected_since,
    is_connected,
    sandbox_state,
)
from gateway.store import (
    CommandRow,
    CommandStore,
    EventStore,
    SandboxRow,
    SandboxStore,
    StoredEvent,
    StoreError,
    utcnow,
)
from gateway.store.commands import IdempotencyMismatch
from gateway.store.events import LOG_LEVELS, LogQuery
from gateway.store.schema import EVENT_KINDS
from gateway.upstream_logs import normalize_level
from openshell_wire.records import CommandKind, LogStream

log = logging.getLogger(__name__)

DEFAULT_TAIL = 100
MAX_TAIL = 10_000
#: A follower re-checks the store at least this often while notifications may be missed (this
#: replica's listening connection is down, the API runs without a notifier, or on SQLite, where
#: a writer outside this process is heard of by no one) ...
FOLLOW_WAKE_S = 1.0
#: ... and this often while they arrive: a slow poll, only for a notification lost all the same.
FOLLOW_POLL_S = 5.0
FOLLOW_PAGE = 1000
NDJSON = "application/x-ndjson"
#: The default bound on a request body (``http.max_body_bytes``); aiohttp's own default too.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
#: How deeply a request body may nest: the API's own bodies nest two levels, and Python's JSON
#: parser recurses once per level (a body of 100,000 brackets would blow its stack).
MAX_JSON_DEPTH = 32
_MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)
#: The caller of a request, set by the authentication middleware before any handler runs.
_PERSON = web.RequestKey("person", Person)
#: Paths served without a token: what a client needs to know to get one.
PUBLIC_PATHS = frozenset({"/api/v1/auth"})
#: Largest page of ``GET /api/v1/sandboxes?limit=N``.
MAX_LIST_LIMIT = 1000
#: The installed distribution whose version ``GET /api/v1/version`` answers.
DISTRIBUTION = "openshell-supervisor"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def server_version() -> str:
    """This gateway's release, from its installed package's metadata."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree never installed
        return "unknown"


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def sandbox_json(
    row: SandboxRow, now: datetime, liveness: Liveness, *, leases: ReplicaLeases | None = None
) -> dict[str, Any]:
    return {
        "id": row.id,
        "driver": row.driver,
        "state": str(sandbox_state(row, now=now, liveness=liveness, leases=leases)),
        "connected": is_connected(row, now=now, liveness=liveness, leases=leases),
        "created_at": _iso(row.created_at),
        "connected_at": _iso(row.connected_at),
        "disconnected_since": _iso(disconnected_since(row, now=now, liveness=liveness, leases=leases)),
        "last_heartbeat_at": _iso(row.last_heartbeat_at),
        "exit_code": row.exit_code,
        "exited_at": _iso(row.exited_at),
        "instance_id": row.instance_id,
        "session_id": row.session_id,
        "journal_epoch": row.journal_epoch,
        "driver_state": row.driver_state,
        "generation": row.generation,
        "created_by": row.created_by,
        "team": row.team,
    }


def event_json(event: StoredEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "sequence": event.sequence,
        "journal_epoch": event.journal_epoch,
        "timestamp_ms": event.timestamp_ms,
        "kind": event.kind,
        "stream": event.stream,
        "message": event.message,
        "data": event.data,
        "generation": event.generation,
    }


def _ndjson(objects: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(o, separators=(",", ":")) + "\n" for o in objects).encode()


class ApiError(Exception):
    """An error answer; raised by handlers, turned into ``{"error": message}`` by the middleware."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response({"error": exc.message}, status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        # aiohttp's own answers (unknown route, wrong method) come as text/plain; an API client
        # should be able to parse every error the same way.
        if exc.status < 400:
            raise
        message = exc.reason if exc.status != 404 else f"no such resource: {request.path}"
        return web.json_response({"error": message}, status=exc.status, headers=_allow(exc))
    except StoreError as exc:
        log.warning("%s %s: %s", request.method, _quoted(request.raw_path), exc)
        return web.json_response({"error": f"store unavailable: {exc}"}, status=503)
    except Exception:
        log.exception("%s %s failed", request.method, _quoted(request.raw_path))
        return web.json_response({"error": "internal error"}, status=500)


def _quoted(text: str) -> str:
    """``text`` as an RFC 7235 quoted-string's content: printable ASCII, no quote or backslash."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)[:300]


def _bearer(header: str | None) -> str:
    if header is None:
        raise TokenRefused(TokenProblem.MISSING, "this API needs a bearer token (Authorization: Bearer ...)")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenRefused(TokenProblem.MALFORMED, "the Authorization header is not 'Bearer <token>'")
    return token.strip()


def _authentication(
    auth: PeopleAuth | None, metrics: GatewayMetrics | None, refusals: RateLimitedLog
) -> Middleware:
    """The middleware that names every request's caller (``request[_PERSON]``) before its handler
    runs, or answers 401/403/503 itself; inside ``_json_errors``, so its answers are JSON too."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if auth is None or request.path in PUBLIC_PATHS:
            request[_PERSON] = NOBODY_ADMIN
            return await handler(request)
        try:
            person = await auth.person(_bearer(request.headers.get("Authorization")))
        except TokenRefused as exc:
            # The raw (still percent-encoded) path, quoted: the decoded one could hold a newline
            # that forges a log line.
            path = _quoted(request.raw_path)
            if metrics is not None:
                metrics.api_auth_failures.labels(exc.problem.value).inc()
            if exc.status == 503:
                refusals.log(logging.WARNING, "issuer", f"{request.method} {path}: 503: {exc.detail}")
                raise ApiError(503, exc.detail, headers={"Retry-After": "5"}) from None
            refusals.log(
                logging.INFO,
                (request.remote, exc.problem),
                f"{request.method} {path} from {request.remote}: 401 {exc.problem.value}: {exc.detail}",
            )
            challenge = 'Bearer realm="openshell"'
            if exc.problem is not TokenProblem.MISSING:
                # RFC 6750: a request without credentials gets the bare challenge, a bad token the error.
                challenge += f', error="invalid_token", error_description="{_quoted(exc.detail)}"'
            raise ApiError(401, exc.detail, headers={"WWW-Authenticate": challenge}) from None
        if person.role is None:
            if metrics is not None:
                metrics.api_auth_failures.labels("no_role").inc()
            raise ApiError(
                403,
                f"{person.username or 'the caller'} has no OpenShell role: none of the names at "
                f"{', '.join(auth.settings.role_claims)} is bound to a role (auth.oidc.roles)",
            )
        request[_PERSON] = person
        return await handler(request)

    return authenticate


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}, got {raw!r}")
    return value


def _bool_param(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "").lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ApiError(400, f"{name} must be 1 or 0 (true or false), got {request.query[name]!r}")


def _kinds_param(request: web.Request) -> list[str] | None:
    raw = request.query.get("kinds")
    if raw is None or raw == "":
        return None
    kinds = [k.strip() for k in raw.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in EVENT_KINDS]
    if unknown or not kinds:
        raise ApiError(400, f"kinds must be a comma-separated list of {', '.join(EVENT_KINDS)}, got {raw!r}")
    return kinds


#: A relative time, as a Go duration (kubectl's ``--since``): ``30s``, ``10m``, ``2h``, ``1h30m``.
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
#: The longest ``text`` a log query may look for.
MAX_TEXT = 1000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _time_param(request: web.Request, name: str, now: datetime) -> int | None:
    """An instant in ms since the epoch, from an RFC 3339 timestamp (with its offset) or a duration
    before ``now`` (``10m``: ten minutes ago)."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        if _DURATION.fullmatch(raw):
            seconds = sum(float(n) * _DURATION_UNIT_S[unit] for n, unit in _DURATION_PART.findall(raw))
            at = now - timedelta(seconds=seconds)
        else:
            at = datetime.fromisoformat(raw.upper())  # RFC 3339 allows a lower-case t and z
        if at.tzinfo is not None:
            # In UTC too (0001-01-01T00:00:00+01:00 is not), as the store turns it back to a datetime.
            at.astimezone(UTC)
            # Integer arithmetic: timestamp() * 1000 in floats puts some instants 1 ms early
            # (.005 s is 4.999... ms), and an inclusive until would then leave out its own record.
            return (at - _EPOCH) // timedelta(milliseconds=1)
    except (ValueError, OverflowError):
        pass
    hint = " (a '+' in a URL query must be sent as %2B)" if " " in raw else ""
    raise ApiError(
        400,
        f"{name} must be an RFC 3339 timestamp with its offset (2026-01-02T15:04:05Z) or a duration "
        f"before now (30s, 10m, 2h, 1h30m), got {raw!r}{hint}",
    )


def _streams_param(request: web.Request) -> tuple[str, ...] | None:
    raw = request.query.get("stream")
    if raw is None or raw == "":
        return None
    known = [s.value for s in LogStream]
    streams = tuple(s.strip() for s in raw.split(",") if s.strip())
    if not streams or any(s not in known for s in streams):
        raise ApiError(400, f"stream must be a comma-separated list of {', '.join(known)}, got {raw!r}")
    return streams


def _level_param(request: web.Request) -> str | None:
    raw = request.query.get("level")
    if raw is None or raw == "":
        return None
    # The spellings the store normalises pushed lines' levels with (WARN, warning: warn).
    level = normalize_level(raw)
    if level not in LOG_LEVELS:
        raise ApiError(400, f"level must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return level


def _text_param(request: web.Request) -> str | None:
    raw = request.query.get("text")
    if raw is None or raw == "":
        return None
    if len(raw) > MAX_TEXT:
        raise ApiError(400, f"text must be at most {MAX_TEXT} characters, got {len(raw)}")
    return raw


def _log_query(request: web.Request, now: datetime) -> LogQuery:
    """The filters of a logs request (see :class:`gateway.store.events.LogQuery`)."""
    since = _time_param(request, "since", now)
    until = _time_param(request, "until", now)
    if since is not None and until is not None and since > until:
        raise ApiError(
            400,
            f"since ({request.query['since']!r}) must not be later than until ({request.query['until']!r})",
        )
    return LogQuery(
        since_ms=since,
        until_ms=until,
        streams=_streams_param(request),
        min_level=_level_param(request),
        text=_text_param(request),
    )


# What the nesting check looks at: brackets, and the quotes and backslashes that say whether a
# bracket is inside a string. A plain character class: one pass, nothing to backtrack (a regex for
# whole strings retried at every quote of an unterminated one, quadratic in the body's size).
_JSON_SIGNIFICANT = re.compile(r'[\[\]{}"\\]')


def _json_depth(text: str, limit: int) -> bool:
    """Whether ``text`` nests no deeper than ``limit``: a single linear scan, no recursion, that
    skips strings (escapes included); the parser afterwards says whether it is valid JSON."""
    depth = 0
    in_string = False
    #: The position of the character a backslash escapes: it has no meaning of its own.
    escaped_at = -1
    for match in _JSON_SIGNIFICANT.finditer(text):
        at = match.start()
        if at == escaped_at:
            continue
        char = match.group()
        if in_string:
            if char == "\\":
                escaped_at = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return False
        elif char in "]}":
            depth -= 1
    return True


async def _json_body(request: web.Request) -> object:
    """The request's JSON body, or an ApiError saying what is wrong with it (size, encoding,
    nesting, syntax); never a parser's traceback."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[_MAX_BODY_BYTES]
        raise ApiError(413, f"the body is larger than {limit} bytes (http.max_body_bytes)") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not UTF-8 (byte {exc.start})") from None
    if not _json_depth(text, MAX_JSON_DEPTH):
        raise ApiError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None


def command_json(row: CommandRow) -> dict[str, Any]:
    c = row.command
    doc: dict[str, Any] = {"id": c.command_id, "sandbox_id": row.sandbox_id, "kind": c.kind.value}
    if c.kind is CommandKind.STOP:
        doc["grace_ms"] = c.grace_ms
    elif c.kind is CommandKind.SIGNAL:
        doc["signal"] = c.signal
    else:
        doc["interval_ms"] = c.interval_ms
    doc.update(
        state=row.state,
        error=row.error,
        created_at=_iso(row.created_at),
        answered_at=_iso(row.answered_at),
        expires_at=_iso(row.expires_at),
        late_result=row.late_result,
        # Written to the stream of the sandbox's live session, on that replica (None: not yet).
        delivered_at=_iso(row.delivered_at),
        delivered_by=row.delivered_by,
    )
    return doc


#: The signals a command may send: those this platform knows (the supervisor runs on Linux too).
_SIGNALS = frozenset(int(s) for s in signal.Signals)


def _sandbox_request(body: object) -> tuple[SandboxRequest, str | None]:
    """Validate a POSTed sandbox: ``{"id": "sb-1", "command": ["sh", "-c", "..."], "image": "..."}``
    (and the ``team`` it is for, optional).

    Types are checked here (each refusal names the field); what the values may hold is
    :func:`~gateway.drivers.podspec.request_problem`'s to say, the one check of every path that
    creates a sandbox.
    """
    if not isinstance(body, dict):
        raise ApiError(
            400, 'the body must be a JSON object such as {"id": "sb-1", "command": ["sleep", "60"]}'
        )
    unknown = sorted(set(body) - {"id", "command", "image", "env", "team"})
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")
    sandbox_id, command, image, env = (
        body.get("id"),
        body.get("command"),
        body.get("image"),
        body.get("env", {}),
    )
    if not isinstance(sandbox_id, str):
        raise ApiError(400, "id must be a string")
    if command is None:
        command = []  # the image's own ENTRYPOINT and CMD (drivers.kubernetes.registry)
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        raise ApiError(400, "command must be a list of strings (omitted: the image's ENTRYPOINT and CMD)")
    if image is not None and (not isinstance(image, str) or not image):
        raise ApiError(400, "image must be a non-empty string when given")
    if not isinstance(env, dict):
        raise ApiError(400, "env must be an object of string values")
    for name, value in env.items():
        if not isinstance(value, str):
            raise ApiError(400, f"env.{name[:80]!r}: must be a string (env is an object of string values)")
    team = body.get("team")
    if team is not None and (not isinstance(team, str) or not team or len(team) > 253):
        raise ApiError(400, "team must be a non-empty string of at most 253 characters when given")
    request = SandboxRequest(sandbox_id=sandbox_id, command=command, image=image, env=env)
    problem = request_problem(request)
    if problem is not None:
        raise ApiError(400, problem)
    return request, team


def _command_ttl(body: dict[str, Any], settings: CommandSettings) -> float:
    """The POSTed ``expires_in_s`` (seconds from now, within ``commands.max_ttl_s``), else the
    default ``commands.ttl_s``."""
    value = body.get("expires_in_s")
    if value is None:
        return settings.ttl_s
    if not isinstance(value, int | float) or isinstance(value, bool) or not 1 <= value <= settings.max_ttl_s:
        raise ApiError(
            400, f"expires_in_s must be a number of seconds from 1 to {settings.max_ttl_s:g}, got {value!r}"
        )
    return float(value)


#: The longest ``Idempotency-Key`` accepted (a UUID is 36 characters).
IDEMPOTENCY_KEY_MAX = 200
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]+")


def _idempotency_key(request: web.Request) -> str | None:
    """The command POST's ``Idempotency-Key`` header, if any: 1 to ``IDEMPOTENCY_KEY_MAX`` visible
    ASCII characters (no spaces), else 400."""
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    if not (len(raw) <= IDEMPOTENCY_KEY_MAX and _IDEMPOTENCY_KEY.fullmatch(raw)):
        shown = raw if len(raw) <= 80 else raw[:80] + "..."
        raise ApiError(
            400,
            f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters "
            f"(no spaces), such as a UUID; got {shown!r}",
        )
    return raw


def _request_digest(kind: CommandKind, args: dict[str, int], body: dict[str, Any]) -> str:
    """What a retry with the same idempotency key must repeat: the validated command and its
    requested expiry (as given: absent stays absent, whatever ``commands.ttl_s`` says later)."""
    given = body.get("expires_in_s")
    canonical = {"kind": kind.value, **args, "expires_in_s": None if given is None else float(given)}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _command_args(body: object) -> tuple[CommandKind, dict[str, int]]:
    """Validate a POSTed command: ``{"kind": "signal", "signal": "SIGUSR1"}`` and the like
    (``expires_in_s`` is :func:`_command_ttl`'s)."""
    if not isinstance(body, dict):
        raise ApiError(400, 'the body must be a JSON object such as {"kind": "stop"}')
    kinds = ", ".join(k.value for k in CommandKind)
    try:
        kind = CommandKind(body.get("kind"))
    except ValueError:
        raise ApiError(400, f"kind must be one of {kinds}, got {body.get('kind')!r}") from None
    field = {CommandKind.STOP: "grace_ms", CommandKind.SIGNAL: "signal"}.get(kind, "interval_ms")
    allowed = {"kind", "expires_in_s", field}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field(s) for a {kind.value} command: {', '.join(unknown)}")
    if kind is CommandKind.SIGNAL:
        raw = body.get("signal")
        try:
            number = int(signal.Signals[raw]) if isinstance(raw, str) else raw
        except KeyError:
            raise ApiError(
                400, f"signal must be a signal name like SIGTERM or a number, got {raw!r}"
            ) from None
        if not isinstance(number, int) or isinstance(number, bool) or number not in _SIGNALS:
            raise ApiError(400, f"signal must be a signal name like SIGTERM or a number, got {raw!r}")
        return kind, {"signal": number}
    field, low, default = ("grace_ms", 0, 0) if kind is CommandKind.STOP else ("interval_ms", 100, None)
    value = body.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 3_600_000:
        raise ApiError(400, f"{field} must be an integer from {low} to 3600000, got {value!r}")
    return kind, {field: value}


class _Api:
    def __init__(
        self,
        *,
        sandboxes: SandboxStore,
        events: EventStore,
        liveness: Liveness,
        now: Callable[[], datetime],
        commands: CommandStore | None = None,
        deliver: Callable[[CommandRow], Awaitable[bool]] | None = None,
        command_settings: CommandSettings | None = None,
        provisioner: Provisioner | None = None,
        auth: PeopleAuth | None = None,
        metrics: GatewayMetrics | None = None,
        leases: Callable[[], Awaitable[ReplicaLeases]] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.notifier = notifier
        self.provisioner = provisioner
        self.leases = leases
        self.auth = auth
        self.metrics = metrics
        self.sandboxes = sandboxes
        self.events = events
        self.commands = commands
        self.deliver = deliver
        self.command_settings = command_settings or CommandSettings()
        self.liveness = liveness
        self.now = now
        #: Set when the server shuts down: followers end instead of holding the shutdown up.
        self.closing = asyncio.Event()

    async def on_shutdown(self, app: web.Application) -> None:
        self.closing.set()

    def _caller(self, request: web.Request, action: Action) -> Person:
        """The caller, if its role allows ``action`` at all (403 otherwise)."""
        person = request[_PERSON]
        if not person.may(action):
            role = person.role.label if person.role is not None else "none"
            if self.metrics is not None:
                self.metrics.api_denials.labels(role, action.value).inc()
            needed = REQUIRED_ROLE[action].label
            raise ApiError(403, f"role {role} may not {action.value} (that needs {needed} or higher)")
        return person

    async def _sandbox(self, request: web.Request, action: Action = Action.READ) -> SandboxRow:
        """The sandbox the path names, if the caller may ``action`` it: one it cannot see is 404,
        exactly as one that does not exist (ids cannot be probed)."""
        person = self._caller(request, action)
        sandbox_id = request.match_info["id"]
        row = await self.sandboxes.get(sandbox_id)
        if row is None or not may_see(person, created_by=row.created_by, team=row.team):
            raise ApiError(404, f"no sandbox {sandbox_id!r}")
        return row

    async def version(self, request: web.Request) -> web.StreamResponse:
        self._caller(request, Action.READ)
        return web.json_response({"version": server_version(), "api": "v1"})

    async def auth_info(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.auth.discovery() if self.auth is not None else {"oidc": False})

    def _command_store(self) -> CommandStore:
        if self.commands is None:
            raise ApiError(501, "this API serves no commands")
        return self.commands

    async def create_command(self, request: web.Request) -> web.StreamResponse:
        store = self._command_store()
        row = await self._sandbox(request, Action.COMMAND)
        body = await _json_body(request)
        kind, args = _command_args(body)
        assert isinstance(body, dict)  # _command_args refuses anything else
        ttl_s = _command_ttl(body, self.command_settings)
        key = _idempotency_key(request)
        # Read before the command is stored: a failed read of the leases answers 503 having
        # stored nothing.
        held = is_connected(row, now=self.now(), liveness=self.liveness, leases=await self._leases())
        try:
            created = await store.create(
                row.id,
                kind,
                ttl_s=ttl_s,
                idempotency_key=key,
                request_digest=None if key is None else _request_digest(kind, args, body),
                **args,
            )
        except IdempotencyMismatch as exc:
            raise ApiError(422, str(exc)) from None
        if created.replayed:
            # A retry of a POST whose command is stored: that command, as it is now, once.
            return web.json_response(
                {**command_json(created), "delivered": created.delivered_at is not None}, status=200
            )
        # True only once the sandbox's live session (of the command's generation), on whichever
        # replica, has written it to its stream; otherwise it goes out later, unless it expires
        # first. A sandbox no live session holds (by the one state rule: a crashed owner's or a
        # stale session's does not count) is not waited for: nothing can take it within the
        # wait but a hello, which sends it anyway.
        delivered = False
        if self.deliver is not None and held:
            delivered = await self.deliver(created)
        return web.json_response({**command_json(created), "delivered": delivered}, status=201)

    async def list_commands(self, request: web.Request) -> web.StreamResponse:
        store = self._command_store()
        row = await self._sandbox(request)
        return web.json_response(
            {"sandbox_id": row.id, "commands": [command_json(c) for c in await store.list(row.id)]}
        )

    async def get_command(self, request: web.Request) -> web.StreamResponse:
        person = self._caller(request, Action.READ)
        found = await self._command_store().get(request.match_info["command_id"])
        if found is not None and not person.is_admin:
            row = await self.sandboxes.get(found.sandbox_id)
            # Another's command is answered as one that does not exist, like another's sandbox.
            if row is None or not may_see(person, created_by=row.created_by, team=row.team):
                found = None
        if found is None:
            raise ApiError(404, f"no command {request.match_info['command_id']!r}")
        return web.json_response(command_json(found))

    def _provisioner(self) -> Provisioner:
        if self.provisioner is None:
            raise ApiError(501, "this gateway creates no sandboxes (drivers.kind is not kubernetes)")
        return self.provisioner

    async def create_sandbox(self, request: web.Request) -> web.StreamResponse:
        person = self._caller(request, Action.CREATE)
        provisioner = self._provisioner()
        wanted, team = _sandbox_request(await _json_body(request))
        if team is None:
            team = person.teams[0] if person.teams else None
        elif not person.is_admin and team not in person.teams:
            raise ApiError(
                403, f"team {team!r} is not one of yours ({', '.join(person.teams) or 'you have none'})"
            )

        def may_replace(row: SandboxRow) -> bool:
            # A re-created id keeps its earlier generations' logs and commands: only someone who
            # may see the sandbox there now may take it over (an admin may take any).
            return may_see(person, created_by=row.created_by, team=row.team)

        try:
            created = await provisioner.create(
                wanted.sandbox_id,
                list(wanted.command),
                image=wanted.image,
                env=wanted.env,
                created_by=person.username,
                team=team,
                may_replace=may_replace,
            )
        except ProvisionError as exc:
            if exc.status == 409 and not person.is_admin:
                row = await self.sandboxes.get(wanted.sandbox_id)
                if row is None or not may_replace(row):
                    # Ids are one namespace, so "taken" cannot be hidden; nothing more of
                    # another's sandbox (its pod's phase, say) is told.
                    taken = f"sandbox {wanted.sandbox_id!r} is taken: choose another id"
                    raise ApiError(409, taken) from None
            raise ApiError(exc.status, str(exc)) from None
        return web.json_response(created, status=201)

    async def delete_sandbox(self, request: web.Request) -> web.StreamResponse:
        self._caller(request, Action.DELETE)
        provisioner = self._provisioner()
        row = await self._sandbox(request, Action.DELETE)
        try:
            found = await provisioner.delete(row.id)
        except ProvisionError as exc:
            raise ApiError(exc.status, str(exc)) from None
        return web.json_response({"id": row.id, "deleted": found}, status=202)

    async def list_sandboxes(self, request: web.Request) -> web.StreamResponse:
        """All the sandboxes the caller may see, or with ``limit`` a page of them in id order;
        ``next`` (the last id, when the page is full) is the next page's ``after``."""
        person = self._caller(request, Action.READ)
        limit = _int_param(request, "limit", 0, 1, MAX_LIST_LIMIT) or None
        after = request.query.get("after") or None
        rows = await self.sandboxes.list(owners=scope_of(person), limit=limit, after=after)
        leases = await self._leases()
        now = self.now()
        page_full = limit is not None and len(rows) == limit
        return web.json_response(
            {
                "sandboxes": [sandbox_json(r, now, self.liveness, leases=leases) for r in rows],
                "next": rows[-1].id if page_full else None,
            }
        )

    async def fleet(self, request: web.Request) -> web.StreamResponse:
        """The fleet summary (:mod:`gateway.fleet`): counts by state and health, the unhealthy and
        the recently exited sandboxes, the replicas' load; all of it only what the caller may list."""
        person = self._caller(request, Action.READ)
        now = self.now()
        limit = _int_param(request, "limit", FLEET_DEFAULT_LIMIT, 1, FLEET_MAX_LIMIT)
        wanted = FleetRequest(
            owners=scope_of(person),
            show_replicas=person.is_admin,
            exited_since=exited_since(_time_param(request, "since", now), now=now),
            limit=limit,
        )
        summary = await fleet_summary(
            self.sandboxes.fleet(), wanted, now=now, liveness=self.liveness, leases=await self._leases()
        )
        return web.json_response(summary)

    async def get_sandbox(self, request: web.Request) -> web.StreamResponse:
        row = await self._sandbox(request)
        leases = await self._leases()
        return web.json_response(sandbox_json(row, self.now(), self.liveness, leases=leases))

    async def _leases(self) -> ReplicaLeases | None:
        """The replicas' leases (one cached snapshot for the whole listing), or None without
        them (the API on its own: the heartbeat rule alone)."""
        return await self.leases() if self.leases is not None else None

    async def logs(self, request: web.Request) -> web.StreamResponse:
        tail = _int_param(request, "tail", DEFAULT_TAIL, 0, MAX_TAIL)
        kinds = _kinds_param(request)
        follow = _bool_param(request, "follow")
        until_exit = _bool_param(request, "until_exit")
        matching = _log_query(request, self.now())
        row = await self._sandbox(request)
        # The current sandbox's events unless an earlier one (of an id created again) is asked for.
        generation = _int_param(request, "generation", row.generation, 1, row.generation)
        if follow:
            return await self._follow(
                request, row.id, tail, kinds, until_exit, generation=generation, matching=matching
            )
        found = (
            await self.events.tail(row.id, tail, kinds=kinds, generation=generation, matching=matching)
            if tail
            else []
        )
        return web.json_response(
            {"sandbox_id": row.id, "generation": generation, "events": [event_json(e) for e in found]}
        )

    async def _follow(
        self,
        request: web.Request,
        sandbox_id: str,
        tail: int,
        kinds: list[str] | None,
        until_exit: bool,
        *,
        generation: int,
        matching: LogQuery,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            # Reverse proxies (an nginx ingress, say) would otherwise hold lines back in a buffer.
            headers={"Content-Type": NDJSON, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        try:
            # The newest id overall is read before the tail, so an event stored in between is either
            # in the tail or after the cursor: nothing falls between the two.
            newest = await self.events.tail(sandbox_id, 1)
            cursor = newest[-1].id if newest else 0
            first = (
                await self.events.tail(
                    sandbox_id, tail, kinds=kinds, generation=generation, matching=matching
                )
                if tail
                else []
            )
            if first:
                cursor = max(cursor, first[-1].id)
                await response.write(_ndjson([event_json(e) for e in first]))
            while not _gone(request) and not self.closing.is_set():
                # Read the exit before the events: the exit and its record commit together, so once
                # the exit is seen, one more empty page proves that everything up to it was sent.
                # An earlier generation ends once caught up, until_exit or not: the id has been
                # created again, and nothing new is coming for it.
                # A token before the reads: a commit after them wakes the wait below at once.
                token = self.events.watch(sandbox_id)
                exited = await self._ended(sandbox_id, generation, until_exit=until_exit)
                page, cursor = await self.events.page_after(
                    sandbox_id, cursor, FOLLOW_PAGE, kinds=kinds, generation=generation, matching=matching
                )
                if page:
                    await response.write(_ndjson([event_json(e) for e in page]))
                    if len(page) == FOLLOW_PAGE:
                        continue
                if exited:
                    break
                if not page:
                    live = self.notifier is not None and self.notifier.live
                    await self.events.wait_for_new(
                        sandbox_id, FOLLOW_POLL_S if live else FOLLOW_WAKE_S, since=token
                    )
        except ConnectionResetError:
            return response
        except StoreError as exc:
            log.warning("following the logs of %s: %s", sandbox_id, exc)
            try:
                await response.write(_ndjson([{"error": f"store unavailable: {exc}"}]))
            except ConnectionResetError:
                return response
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    async def _ended(self, sandbox_id: str, generation: int, *, until_exit: bool) -> bool:
        row = await self.sandboxes.get(sandbox_id)
        # An earlier generation has ended for good: the id was created again since.
        if row is None or row.generation != generation:
            return True
        return until_exit and row.exit_code is not None


def _gone(request: web.Request) -> bool:
    # aiohttp does not cancel a handler when its client leaves, and a quiet follower writes
    # nothing that could fail; so look at the connection before each wait.
    transport = request.transport
    return transport is None or transport.is_closing()


def build_api(
    *,
    sandboxes: SandboxStore,
    events: EventStore,
    liveness: Liveness | None = None,
    now: Callable[[], datetime] = utcnow,
    commands: CommandStore | None = None,
    deliver: Callable[[CommandRow], Awaitable[bool]] | None = None,
    command_settings: CommandSettings | None = None,
    provisioner: Provisioner | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    auth: PeopleAuth | None = None,
    metrics: GatewayMetrics | None = None,
    leases: Callable[[], Awaitable[ReplicaLeases]] | None = None,
    notifier: Notifier | None = None,
) -> web.Application:
    """The API as an aiohttp application, to run on its own or to mount under another app.

    ``liveness`` gives the bounds of the derived state (``Liveness.from_settings`` of the
    gateway's ``sessions`` settings); without it, those of the default settings.
    ``auth`` verifies people's tokens (the app owns it: closed on cleanup); without it, every
    caller is admin. ``metrics`` counts refusals. ``leases`` reads the replicas' leases (cached,
    ``gateway.replicas.LeaseView``): a sandbox whose owner's lease lapsed is not connected.
    ``notifier`` (the one the event store's notes come through) lets a follower poll slowly
    while it is live; without it, followers re-check every second."""
    if liveness is None:
        liveness = Liveness.from_settings(SessionSettings())
    api = _Api(
        sandboxes=sandboxes,
        events=events,
        liveness=liveness,
        now=now,
        commands=commands,
        deliver=deliver,
        command_settings=command_settings,
        provisioner=provisioner,
        auth=auth,
        metrics=metrics,
        leases=leases,
        notifier=notifier,
    )
    refusals = RateLimitedLog(log, concern="api-auth")
    app = web.Application(
        middlewares=[_json_errors, _authentication(auth, metrics, refusals)], client_max_size=max_body_bytes
    )

    async def close_log(app: web.Application) -> None:
        refusals.close()
        if auth is not None:
            await auth.close()  # the API owns its verifier (its HTTP client, a fetch under way)

    app.on_cleanup.append(close_log)
    app[_MAX_BODY_BYTES] = max_body_bytes
    app.on_shutdown.append(api.on_shutdown)
    app.router.add_get("/api/v1/auth", api.auth_info)
    app.router.add_get("/api/v1/version", api.version)
    app.router.add_get("/api/v1/fleet", api.fleet)
    app.router.add_get("/api/v1/sandboxes", api.list_sandboxes)
    app.router.add_post("/api/v1/sandboxes", api.create_sandbox)
    app.router.add_get("/api/v1/sandboxes/{id}", api.get_sandbox)
    app.router.add_delete("/api/v1/sandboxes/{id}", api.delete_sandbox)
    app.router.add_get("/api/v1/sandboxes/{id}/logs", api.logs)
    app.router.add_post("/api/v1/sandboxes/{id}/commands", api.create_command)
    app.router.add_get("/api/v1/sandboxes/{id}/commands", api.list_commands)
    app.router.add_get("/api/v1/commands/{command_id}", api.get_command)
    return app
