"""The CLI's tokens: where a person's bearer token comes from, how it is kept fresh, and the login.

Every call the CLI makes to the HTTP API sends ``Authorization: Bearer <token>`` when it has a
token, taken from the first of:

1. ``--token-file FILE``: a file holding the token (alone, or a token endpoint's JSON answer with
   ``access_token``); never refreshed: when the gateway refuses it, the CLI says so and stops;
2. ``$OPENSHELL_TOKEN``: the same, from the environment;
3. the ``token_file`` of the context whose API is called (:mod:`gateway.ctl.contexts`), the same;
4. the login cache, ``~/.config/openshell/tokens.json`` (``$XDG_CONFIG_HOME`` honoured), written
   by ``openshell-gateway login --api URL``: one entry per API URL with its issuer, client,
   access and refresh tokens. An access token within :data:`REFRESH_MARGIN_S` of its expiry is
   refreshed before the call, and a call answered 401 is refreshed and sent again, once.

Without any of them the call goes without a token (a gateway without OIDC takes it); a 401 then
says to log in. The login is the OAuth 2.0 device authorization grant (RFC 8628): the API's
unauthenticated ``GET /api/v1/auth`` names the issuer and the CLI's client id, the issuer's
discovery document its device and token endpoints; the CLI prints the verification URI and the
user code, and polls the token endpoint at the interval the issuer asks for (``slow_down`` adds 5 s,
``authorization_pending`` waits, ``expired_token`` and ``access_denied`` end the login with what to
do). The device request carries a PKCE S256 challenge and the polls its verifier, as upstream's CLI
does: an issuer that enforces PKCE on the client (the realm in docs/keycloak does) takes the login,
and one that does not ignores them.

Tokens for a plain ``http://`` API URL, and a login through one, are refused unless the host is
loopback or ``--insecure`` is given: they would cross the network readable.

The cache is written 0600 (a new file, never through a link) in a directory of the user's that is
made or tightened to 0700 (one of another user's is refused), replaced atomically, under a lock:
a logout is final (a command refreshing meanwhile fails rather than write the login back); two commands
refreshing at once do not both spend the refresh token (Keycloak's rotation would revoke the
login). A bad token file or cache is a :class:`ClientAuthError` that says what is wrong and what to
run, never a traceback, and no message holds a token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import socket
import stat
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from gateway.config import is_loopback

TOKEN_ENV = "OPENSHELL_TOKEN"
#: An access token this close to its expiry is refreshed before a call.
REFRESH_MARGIN_S = 30.0
#: RFC 8628 section 3.5: ``slow_down`` raises the polling interval by 5 s.
SLOW_DOWN_STEP_S = 5.0
DEFAULT_INTERVAL_S = 5.0
#: A token file or the cache larger than this is not a token (a log file passed by mistake).
MAX_FILE_BYTES = 1024 * 1024
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CACHE_VERSION = 1
#: One request to the API, the issuer's discovery, device or token endpoint.
HTTP_TIMEOUT_S = 30.0
#: A follow's TCP keepalive: the first probe after this long without traffic, then one every
#: KEEPALIVE_INTERVAL_S, the connection dead after KEEPALIVE_PROBES unanswered. The gateway
#: writes nothing on a quiet follow, so a read timeout cannot tell a quiet one from a peer that
#: is gone (a host down, a NAT entry dropped); the kernel's probes, answered by the peer's TCP
#: stack whatever its program does, can.
KEEPALIVE_IDLE_S = 60
KEEPALIVE_INTERVAL_S = 15
KEEPALIVE_PROBES = 4


class ClientAuthError(Exception):
    """The CLI cannot authenticate; the message says why and what to run. Never holds a token."""


def login_hint(api_url: str) -> str:
    return f"run `openshell-gateway login --api {api_url}`"


def config_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "openshell"


def default_cache_path(env: Mapping[str, str] | None = None) -> Path:
    return config_dir(env) / "tokens.json"


def normalize_api_url(api_url: str) -> str:
    return api_url.rstrip("/")


# -- bearer tokens from a file or the environment ---------------------------------------------


def check_token(value: str, *, origin: str) -> str:
    """``value`` as a bearer token: one printable ASCII word, else a ClientAuthError naming ``origin``.
    A JSON object's ``access_token`` is taken (what ``curl`` of a token endpoint prints)."""
    text = value.strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
            raise ClientAuthError(f"{origin}: looks like JSON but does not parse") from None
        token = doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str):
            raise ClientAuthError(f"{origin}: a JSON object without a string access_token")
        text = token.strip()
    if text.lower().startswith("bearer "):
        text = text[7:].strip()
    if not text:
        raise ClientAuthError(f"{origin}: empty: it should hold an access token")
    if not text.isascii() or not text.isprintable() or any(c.isspace() for c in text):
        # Said without the value: it may be a secret of another kind.
        raise ClientAuthError(
            f"{origin}: not a bearer token (one word of printable ASCII characters expected)"
        )
    return text


def read_token_file(path: Path, *, origin: str | None = None) -> str:
    origin = origin or f"--token-file {path}"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ClientAuthError(f"{origin}: no such file") from None
    except IsADirectoryError:
        raise ClientAuthError(f"{origin}: is a directory, not a file holding a token") from None
    except OSError as exc:
        raise ClientAuthError(f"{origin}: cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ClientAuthError(f"{origin}: larger than {MAX_FILE_BYTES} bytes: not a token")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ClientAuthError(f"{origin}: not text: it should hold an access token") from None
    return check_token(text, origin=origin)


# -- the login cache ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CachedLogin:
    """One API URL's login: what the device flow gave, and where to refresh it."""

    api_url: str
    issuer: str
    client_id: str
    token_endpoint: str
    access_token: str
    #: Unix seconds, on this machine's clock (from ``expires_in``, so the issuer's clock does not matter).
    expires_at: float
    refresh_token: str | None = None
    refresh_expires_at: float | None = None
    username: str | None = None

    @classmethod
    def from_json(cls, api_url: str, doc: object) -> CachedLogin:
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        strings = ("issuer", "client_id", "token_endpoint", "access_token")
        for key in strings:
            if not isinstance(doc.get(key), str) or not doc[key]:
                raise ValueError(f"{key} missing or not a string")
        if not isinstance(doc.get("expires_at"), int | float):
            raise ValueError("expires_at missing or not a number")
        for key in ("refresh_token", "username"):
            if doc.get(key) is not None and not isinstance(doc[key], str):
                raise ValueError(f"{key} not a string")
        refresh_expires_at = doc.get("refresh_expires_at")
        if refresh_expires_at is not None and not isinstance(refresh_expires_at, int | float):
            raise ValueError("refresh_expires_at not a number")
        return cls(
            api_url=api_url,
            issuer=doc["issuer"],
            client_id=doc["client_id"],
            token_endpoint=doc["token_endpoint"],
            access_token=doc["access_token"],
            expires_at=float(doc["expires_at"]),
            refresh_token=doc.get("refresh_token"),
            refresh_expires_at=None if refresh_expires_at is None else float(refresh_expires_at),
            username=doc.get("username"),
        )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["api_url"]  # the key it is stored under
        return doc


class TokenCache:
    """``tokens.json``: ``{"version": 1, "logins": {API URL: entry}}``."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_cache_path()

    @property
    def _lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _directory(self) -> None:
        """The cache's directory, made 0700 if missing, tightened to 0700 if it is the user's, and
        refused if it is someone else's (they could swap the files in it)."""
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
        if info.st_uid != os.getuid():
            raise ClientAuthError(
                f"the login cache's directory {directory} belongs to another user: refusing to keep "
                "tokens there (set XDG_CONFIG_HOME to a directory of yours)"
            )
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(directory, 0o700)

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Held across a read, a refresh and the write, so that concurrent commands take turns."""
        self._directory()
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            # flock blocks; in a thread the event loop (and a Ctrl-C) is not held up meanwhile.
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> dict[str, Any]:
        """The whole document; ``{}`` when there is none. ValueError when it is not ours."""
        try:
            with self.path.open("rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ClientAuthError(
                f"the login cache {self.path} cannot be read: {exc.strerror or exc}"
            ) from None
        if len(raw) > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except RecursionError:
            raise ValueError("nested too deeply to be a login cache") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("logins", {}), dict):
            raise ValueError("not an object with a logins object")
        if doc.get("version", CACHE_VERSION) != CACHE_VERSION:
            raise ValueError(f"version {doc.get('version')!r}, this CLI reads {CACHE_VERSION}")
        return doc

    def load(self, api_url: str) -> CachedLogin | None:
        api_url = normalize_api_url(api_url)
        try:
            entry = self._read().get("logins", {}).get(api_url)
            return None if entry is None else CachedLogin.from_json(api_url, entry)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ClientAuthError(
                f"the login cache {self.path} is damaged ({exc}): {login_hint(api_url)} to write it again"
            ) from None

    def _write(self, doc: dict[str, Any]) -> None:
        self._directory()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # a crashed run's (or a planted link: unlinking removes the link only)
        # Never through a link, never an existing file: the tokens go into a file made here.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)  # whatever the umask
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _read_for_update(self) -> dict[str, Any]:
        """The document to change; a damaged one is kept aside (``tokens.json.damaged-<time>``) and
        started afresh, so a login always works and nothing is silently lost."""
        try:
            return self._read()
        except (ValueError, UnicodeDecodeError):
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            os.replace(self.path, aside)
            return {}

    def store(self, login: CachedLogin) -> None:
        """Call under :meth:`locked`."""
        doc = self._read_for_update()
        logins = doc.setdefault("logins", {})
        logins[login.api_url] = login.to_json()
        doc["version"] = CACHE_VERSION
        self._write(doc)

    def remove(self, api_url: str) -> bool:
        """Call under :meth:`locked`."""
        doc = self._read_for_update()
        found = doc.get("logins", {}).pop(normalize_api_url(api_url), None) is not None
        if found:
            self._write(doc)
        return found


# -- what a call sends ----------------------------------------------------------------------


class Credentials(Protocol):
    """Where a call's bearer token comes from."""

    async def authorization(self, http: aiohttp.ClientSession) -> str | None:
        """The Authorization header value to send, or None for none."""
        ...

    async def after_unauthorized(self, http: aiohttp.ClientSession, message: str) -> None:
        """A call was answered 401 with ``message``: get a new token (the call is sent again once)
        or raise ClientAuthError saying what to do."""
        ...


class NoCredentials:
    """No token anywhere: the call goes without one (a gateway without OIDC takes it)."""

    def __init__(self, api_url: str) -> None:
        self.api_url = normalize_api_url(api_url)

    async def authorization(self, http: aiohttp.ClientSession) -> str | None:
        return None

    async def after_unauthorized(self, http: aiohttp.ClientSession, message: str) -> None:
        raise ClientAuthError(
            f"the gateway at {self.api_url} asks for a login ({message}): {login_hint(self.api_url)}, "
            f"or pass --token-file FILE or set {TOKEN_ENV}"
        )


class StaticToken:
    """A token given as it is (file or environment): used as it is, never refreshed."""

    def __init__(self, token: str, *, origin: str, api_url: str) -> None:
        self._token = token
        self.origin = origin
        self.api_url = normalize_api_url(api_url)

    async def authorization(self, http: aiohttp.ClientSession) -> str | None:
        return f"Bearer {self._token}"

    async def after_unauthorized(self, http: aiohttp.ClientSession, message: str) -> None:
        raise ClientAuthError(
            f"the gateway at {self.api_url} refused the token from {self.origin} ({message}): get a new "
            f"token there, or {login_hint(self.api_url)} and use the login instead"
        )


async def _post_form(
    http: aiohttp.ClientSession, url: str, form: Mapping[str, str]
) -> tuple[int, dict[str, Any]]:
    """A form POST to the issuer; its JSON answer (``{}`` for a non-JSON one)."""
    async with http.post(url, data=dict(form), headers={"Accept": "application/json"}) as resp:
        try:
            doc = await resp.json(content_type=None)
        except ValueError:
            doc = None
        return resp.status, doc if isinstance(doc, dict) else {}


def _oauth_error(doc: Mapping[str, Any], status: int) -> str:
    error = doc.get("error")
    description = doc.get("error_description")
    if isinstance(error, str) and isinstance(description, str) and description:
        return f"{error}: {description}"
    return error if isinstance(error, str) else f"HTTP {status}"


def _jwt_claim(token: str, name: str) -> object:
    """A claim of a JWT read without verifying it: only for what the CLI shows or guesses (the
    gateway verifies); None when the token is not a JWT."""
    try:
        payload = token.split(".")[1]
        doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    return doc.get(name) if isinstance(doc, dict) else None


def login_from_token_answer(
    doc: Mapping[str, Any], *, api_url: str, issuer: str, client_id: str, token_endpoint: str,
    now: float, previous_refresh: str | None = None,
) -> CachedLogin:  # fmt: skip
    """A token endpoint's answer as a cache entry; ValueError when it holds no usable token."""
    access = doc.get("access_token")
    if not isinstance(access, str) or not access:
        raise ValueError("the answer holds no access_token")
    token_type = doc.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise ValueError(f"token_type {token_type!r}, not Bearer")
    expires_in = doc.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
        expires_at = now + float(expires_in)
    else:
        # No expires_in: the token's own exp (on the issuer's clock), else a minute.
        exp = _jwt_claim(access, "exp")
        expires_at = float(exp) if isinstance(exp, int | float) else now + 60.0
    refresh = doc.get("refresh_token")
    refresh_in = doc.get("refresh_expires_in")
    username = _jwt_claim(access, "preferred_username")
    return CachedLogin(
        api_url=normalize_api_url(api_url),
        issuer=issuer,
        client_id=client_id,
        token_endpoint=token_endpoint,
        access_token=access,
        expires_at=expires_at,
        # An answer without a new refresh token keeps the old one (RFC 6749 section 6).
        refresh_token=refresh if isinstance(refresh, str) and refresh else previous_refresh,
        refresh_expires_at=now + float(refresh_in)
        if isinstance(refresh_in, int | float) and not isinstance(refresh_in, bool) and refresh_in > 0
        else None,
        username=username if isinstance(username, str) else None,
    )


class CachedCredentials:
    """The login cache's entry for an API URL: refreshed near expiry and after a 401 (once)."""

    def __init__(
        self, cache: TokenCache, login: CachedLogin, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.cache = cache
        self.login = login
        self._clock = clock

    async def authorization(self, http: aiohttp.ClientSession) -> str | None:
        if self.login.expires_at - self._clock() < REFRESH_MARGIN_S:
            await self.refresh(http)
        return f"Bearer {self.login.access_token}"

    async def after_unauthorized(self, http: aiohttp.ClientSession, message: str) -> None:
        await self.refresh(http, force=True)

    async def refresh(self, http: aiohttp.ClientSession, *, force: bool = False) -> None:
        api_url = self.login.api_url
        async with self.cache.locked():
            # Another command may have refreshed meanwhile: its token is as good as ours would be.
            current = self.cache.load(api_url)
            if current is None:
                # Logged out since this command read the cache: refreshing would write the login
                # back, and the logout would not stick.
                raise ClientAuthError(f"logged out of {api_url} meanwhile: {login_hint(api_url)}")
            if current.access_token != self.login.access_token:
                self.login = current
                if current.expires_at - self._clock() >= REFRESH_MARGIN_S:
                    return
            elif not force and self.login.expires_at - self._clock() >= REFRESH_MARGIN_S:
                return
            refresh = self.login.refresh_token
            expired = "expired" if self.login.expires_at <= self._clock() else "about to expire"
            if not refresh:
                raise ClientAuthError(f"the login for {api_url} has {expired}: {login_hint(api_url)}")
            now = self._clock()
            try:
                status, doc = await _post_form(
                    http,
                    self.login.token_endpoint,
                    {
                        "grant_type": "refresh_token",
                        "refresh_token": refresh,
                        "client_id": self.login.client_id,
                    },
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise ClientAuthError(
                    f"the login for {api_url} needs a refresh, but the issuer at {self.login.token_endpoint} "
                    f"cannot be reached: {exc or type(exc).__name__}"
                ) from None
            if status != 200:
                # invalid_grant: the refresh token expired, was revoked or the session ended.
                raise ClientAuthError(
                    f"the login for {api_url} could not be refreshed ({_oauth_error(doc, status)}): "
                    f"{login_hint(api_url)}"
                )
            try:
                login = login_from_token_answer(
                    doc, api_url=api_url, issuer=self.login.issuer, client_id=self.login.client_id,
                    token_endpoint=self.login.token_endpoint, now=now, previous_refresh=refresh,
                )  # fmt: skip
            except ValueError as exc:
                raise ClientAuthError(
                    f"the issuer's refresh answer is unusable ({exc}): {login_hint(api_url)}"
                ) from None
            self.cache.store(login)
            self.login = login


def plain_http_host(url: str) -> str | None:
    """The host of a plain ``http://`` URL to a host that is not loopback (a bearer token sent
    there can be read on the path), else None."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "http":
        return None
    host = parsed.hostname or ""
    return None if is_loopback(f"{host}:0") else host


def _refuse_plain_http(url: str, what: str, insecure: bool, *, risk: str = "read it") -> None:
    host = plain_http_host(url)
    if host is not None and not insecure:
        raise ClientAuthError(
            f"refusing to {what} over plain http to {host} ({url}): anyone on the path could {risk}; "
            "use https, or pass --insecure to do it anyway"
        )


def credentials_for(
    api_url: str,
    *,
    token_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    cache: TokenCache | None = None,
    insecure: bool = False,
    context_token_file: Path | None = None,
    context: str | None = None,
) -> Credentials:
    """The first of ``--token-file``, ``$OPENSHELL_TOKEN``, the token file of the ``context`` the
    API URL came from, the login cache, or none. A token for a plain-http API URL on a host that
    is not loopback is refused unless ``insecure``."""
    found = _credentials_for(
        api_url, token_file=token_file, env=env, cache=cache,
        context_token_file=context_token_file, context=context,
    )  # fmt: skip
    if not isinstance(found, NoCredentials):
        _refuse_plain_http(api_url, "send a bearer token", insecure)
    return found


def _credentials_for(
    api_url: str,
    *,
    token_file: Path | None,
    env: Mapping[str, str] | None,
    cache: TokenCache | None,
    context_token_file: Path | None = None,
    context: str | None = None,
) -> Credentials:
    env = os.environ if env is None else env
    if token_file is not None:
        return StaticToken(read_token_file(token_file), origin=f"--token-file {token_file}", api_url=api_url)
    value = env.get(TOKEN_ENV)
    if value:
        return StaticToken(check_token(value, origin=TOKEN_ENV), origin=TOKEN_ENV, api_url=api_url)
    if context_token_file is not None:
        origin = f"context {context}'s token_file {context_token_file}"
        token = read_token_file(context_token_file, origin=origin)
        return StaticToken(token, origin=origin, api_url=api_url)
    cache = cache or TokenCache(default_cache_path(env))
    login = cache.load(api_url)
    if login is not None:
        return CachedCredentials(cache, login)
    return NoCredentials(api_url)


# -- calls to the API -----------------------------------------------------------------------


class ApiClient:
    """The HTTP API with the caller's credentials: a 401 gets one new token and one retry."""

    def __init__(self, api_url: str, credentials: Credentials, *, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        self.api_url = normalize_api_url(api_url)
        self.credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        self._http = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: object = None,
        params: Mapping[str, str | int] | None = None,
    ) -> tuple[int, Any]:
        """``(status, parsed JSON or {"error": text})``; aiohttp errors and TimeoutError pass through."""
        assert self._http is not None, "use ApiClient as an async context manager"
        for attempt in (1, 2):
            headers: dict[str, str] = {}
            authorization = await self.credentials.authorization(self._http)
            if authorization is not None:
                headers["Authorization"] = authorization
            async with self._http.request(
                method, f"{self.api_url}/api/v1{path}", json=json_body, params=params, headers=headers
            ) as resp:
                try:
                    doc: Any = await resp.json(content_type=None)
                except ValueError:
                    doc = {"error": (await resp.text())[:500]}
                status = resp.status
            if status != 401:
                return status, doc
            error = doc.get("error") if isinstance(doc, dict) else None
            message = error if isinstance(error, str) else "HTTP 401"
            if attempt == 2:
                # Refreshed and still refused: the login itself is no good here (another issuer,
                # a role removed, the wrong audience); only a new login can tell.
                raise ClientAuthError(
                    f"the gateway at {self.api_url} refused the refreshed token too ({message}): "
                    f"{login_hint(self.api_url)}"
                )
            await self.credentials.after_unauthorized(self._http, message)
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def stream(
        self, path: str, *, params: Mapping[str, str | int] | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A GET whose body is read as it arrives (a log follow): no overall deadline, only for
        connecting. A 401 gets one new token and one retry, as :meth:`request`; any other status
        is the caller's to read."""
        assert self._http is not None, "use ApiClient as an async context manager"
        # Only the connection is bounded: a quiet follow may send nothing for hours.
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout.total, sock_read=None)
        for attempt in (1, 2):
            headers: dict[str, str] = {}
            authorization = await self.credentials.authorization(self._http)
            if authorization is not None:
                headers["Authorization"] = authorization
            async with self._http.get(
                f"{self.api_url}/api/v1{path}", params=params, headers=headers, timeout=timeout
            ) as resp:
                if resp.status != 401:
                    _keep_alive(resp)
                    yield resp
                    return
                try:
                    doc: Any = await resp.json(content_type=None)
                except ValueError:
                    doc = None
            error = doc.get("error") if isinstance(doc, dict) else None
            message = error if isinstance(error, str) else "HTTP 401"
            if attempt == 2:
                raise ClientAuthError(
                    f"the gateway at {self.api_url} refused the refreshed token too ({message}): "
                    f"{login_hint(self.api_url)}"
                )
            await self.credentials.after_unauthorized(self._http, message)


def _keep_alive(resp: aiohttp.ClientResponse) -> None:
    """TCP keepalive on ``resp``'s connection (see KEEPALIVE_IDLE_S), where the platform has it."""
    transport = resp.connection.transport if resp.connection is not None else None
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        option = getattr(socket, name, None)
        if option is not None:  # Linux has all three; elsewhere the system's timing applies
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


# -- the login: OAuth 2.0 device authorization grant ------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthInfo:
    issuer: str
    client_id: str


async def _get_json(http: aiohttp.ClientSession, url: str, what: str) -> dict[str, Any]:
    try:
        async with http.get(url, headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise ClientAuthError(f"{what} at {url} answered HTTP {resp.status}")
            doc = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ClientAuthError(f"cannot reach {what} at {url}: {exc or type(exc).__name__}") from None
    except ValueError:
        raise ClientAuthError(f"{what} at {url} did not answer JSON") from None
    if not isinstance(doc, dict):
        raise ClientAuthError(f"{what} at {url} did not answer a JSON object")
    return doc


def _first_string(doc: Mapping[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = doc.get(key)
        if isinstance(value, str) and value:
            return value
    return None


async def auth_info(
    http: aiohttp.ClientSession, api_url: str, *, issuer: str | None = None, client_id: str | None = None
) -> AuthInfo:
    """The issuer and the CLI's client id: the flags when given, else the API's ``GET /api/v1/auth``."""
    if issuer and client_id:
        return AuthInfo(issuer.rstrip("/"), client_id)
    doc = await _get_json(http, f"{normalize_api_url(api_url)}/api/v1/auth", "the gateway's auth settings")
    issuer = issuer or _first_string(doc, "issuer", "issuer_url")
    client_id = client_id or _first_string(doc, "client_id", "cli_client_id")
    if not issuer:
        raise ClientAuthError(
            f"the gateway at {api_url} takes no OIDC tokens (its auth.oidc.issuer_url is unset): "
            "no login is needed, or pass --issuer"
        )
    return AuthInfo(issuer.rstrip("/"), client_id or "openshell-cli")


def pkce_pair() -> tuple[str, str]:
    """A PKCE verifier (RFC 7636: 43 to 128 unreserved characters) and its S256 challenge."""
    verifier = secrets.token_urlsafe(64)[:96]
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


async def device_login(
    api_url: str,
    *,
    cache: TokenCache,
    out: Callable[[str], None],
    issuer: str | None = None,
    client_id: str | None = None,
    scope: str = "openid",
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Any] = asyncio.sleep,
    insecure: bool = False,
) -> CachedLogin:
    """Runs the device flow, stores the login in ``cache`` and returns it. Over plain http to a
    host that is not loopback (the API's answer naming the issuer, the issuer itself) it is
    refused unless ``insecure``: an on-path attacker could name their own login page."""
    api_url = normalize_api_url(api_url)
    if issuer is None:
        # The API's unauthenticated answer names the issuer: over http, anyone's login page.
        _refuse_plain_http(
            api_url,
            "ask which issuer to log in to",
            insecure,
            risk="name their own login page (--issuer names it yourself)",
        )
    else:
        _refuse_plain_http(issuer, "log in", insecure, risk="read the tokens")
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        info = await auth_info(http, api_url, issuer=issuer, client_id=client_id)
        _refuse_plain_http(info.issuer, "log in", insecure, risk="read the tokens")
        discovery = await _get_json(
            http, f"{info.issuer}/.well-known/openid-configuration", "the issuer's discovery document"
        )
        if discovery.get("issuer") != info.issuer:
            raise ClientAuthError(
                f"the discovery document at {info.issuer} names another issuer "
                f"({discovery.get('issuer')!r}): check auth.oidc.issuer_url"
            )
        device_endpoint = discovery.get("device_authorization_endpoint")
        token_endpoint = discovery.get("token_endpoint")
        if not isinstance(device_endpoint, str) or not isinstance(token_endpoint, str):
            raise ClientAuthError(
                f"the issuer {info.issuer} publishes no device authorization endpoint: enable the OAuth 2.0 "
                "device authorization grant (see docs/auth.md)"
            )
        verifier, challenge = pkce_pair()
        try:
            status, device = await _post_form(
                http,
                device_endpoint,
                {
                    "client_id": info.client_id,
                    "scope": scope,
                    "code_challenge": challenge,
                    "code_challenge_method": "S256",
                },
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClientAuthError(f"cannot reach {device_endpoint}: {exc or type(exc).__name__}") from None
        if status != 200:
            raise ClientAuthError(
                f"the issuer refused the device login for client {info.client_id!r} "
                f"({_oauth_error(device, status)}): is the device grant enabled on that client?"
            )
        device_code, user_code = device.get("device_code"), device.get("user_code")
        verification_uri = device.get("verification_uri") or device.get("verification_url")
        if not all(isinstance(v, str) and v for v in (device_code, user_code, verification_uri)):
            raise ClientAuthError(
                "the issuer's device authorization answer lacks a code or a verification URI"
            )
        assert isinstance(device_code, str) and isinstance(user_code, str)
        interval = device.get("interval")
        wait_s = float(interval) if isinstance(interval, int | float) and interval > 0 else DEFAULT_INTERVAL_S
        expires_in = device.get("expires_in")
        deadline = clock() + (float(expires_in) if isinstance(expires_in, int | float) else 600.0)
        out(f"To log in, open {verification_uri} and enter the code: {user_code}")
        complete = device.get("verification_uri_complete")
        if isinstance(complete, str) and complete:
            out(f"(or open {complete})")
        out("Waiting for the login to be approved ...")
        while True:
            await sleep(wait_s)
            if clock() > deadline:
                raise ClientAuthError("the code expired before the login was approved: run the login again")
            now = clock()
            try:
                status, doc = await _post_form(
                    http,
                    token_endpoint,
                    {
                        "grant_type": DEVICE_GRANT,
                        "device_code": device_code,
                        "client_id": info.client_id,
                        "code_verifier": verifier,
                    },
                )
            except (aiohttp.ClientError, TimeoutError):
                continue  # the issuer is away for a moment: ask again at the next interval
            if status == 200:
                try:
                    login = login_from_token_answer(
                        doc, api_url=api_url, issuer=info.issuer, client_id=info.client_id,
                        token_endpoint=token_endpoint, now=now,
                    )  # fmt: skip
                except ValueError as exc:
                    raise ClientAuthError(f"the issuer's token answer is unusable: {exc}") from None
                async with cache.locked():
                    cache.store(login)
                return login
            error = doc.get("error")
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                wait_s += SLOW_DOWN_STEP_S
                continue
            if error == "expired_token":
                raise ClientAuthError("the code expired before the login was approved: run the login again")
            if error == "access_denied":
                raise ClientAuthError("the login was refused at the issuer (access denied)")
            if status >= 500:
                continue
            raise ClientAuthError(f"the issuer refused the login: {_oauth_error(doc, status)}")


async def logout(api_url: str, *, cache: TokenCache) -> bool:
    """Forgets the API URL's login here (the issuer's session ends on its own)."""
    async with cache.locked():
        return cache.remove(api_url)
