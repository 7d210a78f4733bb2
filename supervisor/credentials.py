"""What the supervisor presents to its gateway: TLS material and a bearer token, read from files.

Both are read again for every connection attempt, so a rotated certificate or token is picked up
by the next attempt without a restart. Reading them is cheap: the token file is only re-read when
its stat changes, and the TLS files are a few small reads per reconnect.

A problem with a file is a :class:`CredentialError` naming the path and the reason; the session
turns it into a failed attempt (backoff, then retry, the reason in ``status.last_error``).

A gateway-minted sandbox token (a JWT with ``exp``) is renewed over the session
(``Session._refresh_credential``); the renewed token is kept here and in a file of the journal
directory (:class:`RenewedToken`), and every attempt sends the newest valid token of the two
that the gateway has not refused since it last accepted a session (both refused: the newest). A
stored token that was refused while the file's was then accepted is forgotten.
Its payload is read without verifying it (the gateway verifies; we only need to know when it
expires), so the supervisor needs no JWT library.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from supervisor.config import GatewaySettings

log = logging.getLogger(__name__)


class CredentialError(Exception):
    """A credential or TLS file cannot be used; the message names the file and why."""


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


#: The name of the renewed token's file in the journal directory.
RENEWED_TOKEN_FILE = "credential"


@dataclass(frozen=True)
class TokenTimes:
    """When a JWT was issued and expires (seconds since the epoch); ``issued_at`` is None
    without an ``iat`` claim."""

    expires_at: float
    issued_at: float | None = None


def jwt_times(token: str) -> TokenTimes | None:
    """The ``exp`` (and ``iat``) of a JWT's payload, read without verifying the signature.

    None for anything that is not a three-part JWT whose payload is base64url JSON with a
    numeric ``exp``: an opaque token, a Kubernetes token without exp (never), garbage. Such a
    token is sent as it is and never renewed. ``exp`` 0 is None too: upstream's gateway mints its
    tokens with ``exp: 0`` when their TTL is 0 (its default), meaning "never expires", not 1970;
    renewing one only brings another ``exp: 0`` token, so it is not renewed at all (upstream's own
    supervisor renews such a token every 6 h, to the same effect).
    """
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    segment = parts[1]
    try:
        raw = base64.b64decode(segment + "=" * (-len(segment) % 4), altchars=b"-_", validate=True)
        payload = json.loads(raw)
    except (binascii.Error, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    if not isinstance(payload, dict):
        return None

    def number(key: str) -> float | None:
        value = payload.get(key)
        # bool is an int to Python, not a time to a JWT.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        return float(value)

    exp = number("exp")
    if exp is None or exp == 0:
        return None
    iat = number("iat")
    return TokenTimes(expires_at=exp, issued_at=iat if iat is not None and iat < exp else None)


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be sent as a bearer token, or None."""
    if not token:
        return "empty"
    if not token.isascii() or any(c.isspace() or not c.isprintable() for c in token):
        return "it contains spaces, control or non-ASCII characters"
    return None


def newest_token(candidates: list[str], *, now: float | None = None) -> str | None:
    """The token to send of ``candidates`` (the file's first, then the renewed one).

    The valid token (not past its exp) with the largest exp; a token without exp (opaque: we
    cannot tell) is taken only when it comes first, i.e. from the credential file, which the
    operator owns. Ties go to the earlier candidate, so a rotated file that is as new wins. None
    when there is none; when all have expired, the first (the gateway says so, and the refusal
    names it).
    """
    if not candidates:
        return None
    now = time.time() if now is None else now
    first = candidates[0]
    first_times = jwt_times(first)
    if first_times is None:
        return first
    best, best_exp = first, first_times.expires_at
    for token in candidates[1:]:
        times = jwt_times(token)
        if times is not None and times.expires_at > now and times.expires_at > best_exp:
            best, best_exp = token, times.expires_at
    return best


class RenewedToken:
    """The renewed sandbox token: in memory, and in ``<journal directory>/credential`` (0600,
    written atomically) so that a restarted supervisor container still has it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.token: str | None = None
        self._loaded = False

    def load(self) -> str | None:
        """The stored token (read from the file once; a bad or unreadable file is no token)."""
        if not self._loaded:
            self._loaded = True
            try:
                text = self.path.read_text(encoding="ascii").strip()
            except FileNotFoundError:
                text = ""
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("ignoring the renewed gateway credential %s: %s", self.path, exc)
                text = ""
            if text and token_problem(text) is None and jwt_times(text) is not None:
                self.token = text
        return self.token

    def store(self, token: str) -> None:
        """Keep ``token``; a failed write is logged and the token kept in memory only."""
        self._loaded = True
        self.token = token
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                # mkstemp creates the file 0600 already; fchmod says so against an odd umask.
                os.fchmod(fd, 0o600)
                os.write(fd, token.encode("ascii") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("cannot store the renewed gateway credential in %s: %s", self.path, _reason(exc))

    def forget(self) -> None:
        """Drop the token, in memory and on disk (the gateway refused it and took another)."""
        self._loaded = True
        self.token = None
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove the refused gateway credential %s: %s", self.path, _reason(exc))


@dataclass(frozen=True)
class _Stamp:
    """What identifies one version of the token file: the target the symlinks lead to, and its stat.

    A Kubernetes projected token is replaced by an atomic swap of the ``..data`` symlink, so the
    resolved path (and the inode) changes even when the new file has the same size and mtime.
    """

    target: str
    device: int
    inode: int
    size: int
    mtime_ns: int


class TokenFile:
    """A bearer token in a file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: _Stamp | None = None
        self._token = ""
        self._last_error = ""
        self.loads = 0

    def token(self) -> str:
        """The current token; raises :class:`CredentialError` when the file cannot give one."""
        try:
            stamp = self._stat()
            if stamp != self._stamp:
                self._load(stamp)
        except CredentialError as exc:
            self._stamp = None
            self._token = ""
            if str(exc) != self._last_error:  # once per change, not once per retry
                self._last_error = str(exc)
                log.error("%s", exc)
            raise
        self._last_error = ""
        return self._token

    @property
    def stamp(self) -> _Stamp | None:
        """The version of the file the current token was read from (None: none read)."""
        return self._stamp

    def _stat(self) -> _Stamp:
        try:
            target = os.path.realpath(self.path, strict=True)
            st = os.stat(target)
        except OSError as exc:
            raise CredentialError(f"gateway credential {self.path}: {_reason(exc)}") from None
        return _Stamp(target, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self, stamp: _Stamp) -> None:
        try:
            raw = Path(stamp.target).read_bytes()
        except OSError as exc:
            raise CredentialError(f"gateway credential {self.path}: {_reason(exc)}") from None
        try:
            token = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise CredentialError(f"gateway credential {self.path}: not ASCII text") from None
        if not token:
            raise CredentialError(f"gateway credential {self.path}: the file is empty")
        if any(c.isspace() or not c.isprintable() for c in token):
            raise CredentialError(
                f"gateway credential {self.path}: the token contains spaces or control characters"
            )
        changed = self.loads > 0 and token != self._token
        self._stamp = stamp
        self._token = token
        self.loads += 1
        if changed:
            log.info("gateway credential reloaded", extra={"path": str(self.path)})
        elif self.loads == 1:
            log.info("gateway credential loaded", extra={"path": str(self.path)})


def _read_pem(what: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CredentialError(f"gateway TLS {what} {path}: {_reason(exc)}") from None
    if b"-----BEGIN " not in data:
        raise CredentialError(f"gateway TLS {what} {path}: not a PEM file")
    return data


class GatewayCredentials:
    """Channel credentials and call metadata for one connection attempt, from the settings' files."""

    def __init__(self, settings: GatewaySettings, *, renewed_path: Path | None = None) -> None:
        self._settings = settings
        self._token = TokenFile(settings.credential_file) if settings.credential_file is not None else None
        #: The renewed sandbox token (None: renewal off, or no credential file to renew).
        self.renewed = (
            RenewedToken(renewed_path)
            if renewed_path is not None and settings.credential_refresh and self._token is not None
            else None
        )
        #: Tokens the gateway said it cannot renew (UNIMPLEMENTED, FAILED_PRECONDITION, a refusal).
        self._not_renewable: set[str] = set()
        #: Tokens the gateway refused since it last accepted a session: the choice skips them while
        #: there is another, so a refused stored token does not hide a good file (and the reverse).
        self._refused: set[str] = set()
        self._tls_digest = b""
        if self._token is not None and not settings.tls:
            log.warning("the gateway credential will be sent without TLS (gateway.tls is false)")

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials read from the files now, or None for a plaintext channel."""
        s = self._settings
        if not s.tls:
            return None
        ca = _read_pem("CA bundle", s.ca_file) if s.ca_file is not None else None
        cert = key = None
        if s.cert_file is not None and s.key_file is not None:
            cert = _read_pem("client certificate", s.cert_file)
            key = _read_pem("client key", s.key_file)
        digest = hashlib.sha256(b"\0".join(part or b"" for part in (ca, cert, key))).digest()
        if self._tls_digest and digest != self._tls_digest:
            log.info("gateway TLS material reloaded")
        self._tls_digest = digest
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel_options(self) -> list[tuple[str, str]]:
        if self._settings.tls and self._settings.server_name:
            return [("grpc.ssl_target_name_override", self._settings.server_name)]
        return []

    def token(self) -> str | None:
        """The token to send now: the newest valid of the file's and the renewed one (None without
        a credential file); raises :class:`CredentialError` when there is none."""
        if self._token is None:
            return None
        stored = self.renewed.load() if self.renewed is not None else None
        try:
            from_file = self._token.token()
        except CredentialError:
            # The renewed token carries on while it is valid (a file gone with its volume).
            if stored is not None and _valid(stored):
                return stored
            raise
        candidates = [from_file, stored] if stored is not None and _valid(stored) else [from_file]
        fresh = [token for token in candidates if token not in self._refused]
        chosen = newest_token(fresh or candidates)
        return chosen if chosen is not None else from_file

    def refused(self, token: str) -> None:
        """The gateway refused ``token``: choose another while there is one, until a session is
        accepted (:meth:`accepted`)."""
        self._refused.add(token)

    def accepted(self, token: str | None) -> None:
        """The gateway accepted a session opened with ``token``: a stored token it refused
        meanwhile is forgotten (it would be chosen again, and refused, on the next reconnect)."""
        stored = self.renewed.token if self.renewed is not None else None
        if self.renewed is not None and stored is not None and stored in self._refused and stored != token:
            log.info("forgetting the renewed gateway credential: the gateway refused it")
            self.renewed.forget()
        self._refused.clear()

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The call metadata (the bearer token), or None without a credential file."""
        token = self.token()
        if token is None:
            return None
        return bearer(token)

    def file_stamp(self) -> object:
        """What identifies the credential file's current version (None when it cannot be read):
        the session watches it while a refused credential waits for a fix."""
        if self._token is None:
            return None
        try:
            return self._token._stat()
        except CredentialError:
            return None

    def loaded_stamp(self) -> object:
        """The version of the credential file whose token :meth:`token` last read (None: none),
        compared with :meth:`file_stamp`: a file rotated after that read is a new one."""
        return self._token.stamp if self._token is not None else None

    def renewable(self, token: str) -> TokenTimes | None:
        """When ``token`` expires, if it is to be renewed: renewal on, a JWT with exp, and not one
        the gateway said it cannot renew."""
        if self.renewed is None or token in self._not_renewable:
            return None
        return jwt_times(token)

    def not_renewable(self, token: str) -> None:
        self._not_renewable.add(token)

    def store_renewed(self, token: str) -> None:
        if self.renewed is not None:
            self.renewed.store(token)


def _valid(token: str) -> bool:
    times = jwt_times(token)
    return times is not None and times.expires_at > time.time()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
