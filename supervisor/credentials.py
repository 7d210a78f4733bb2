"""What the supervisor presents to its gateway: TLS material and a bearer token, read from files.

Both are read again for every connection attempt, so a rotated certificate or token is picked up
by the next attempt without a restart. Reading them is cheap: the token file is only re-read when
its stat changes, and the TLS files are a few small reads per reconnect.

A problem with a file is a :class:`CredentialError` naming the path and the reason; the session
turns it into a failed attempt (backoff, then retry, the reason in ``status.last_error``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from supervisor.config import GatewaySettings

log = logging.getLogger(__name__)


class CredentialError(Exception):
    """A credential or TLS file cannot be used; the message names the file and why."""


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


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

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._token = TokenFile(settings.credential_file) if settings.credential_file is not None else None
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

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The call metadata (the bearer token), or None without a credential file."""
        if self._token is None:
            return None
        return (("authorization", f"Bearer {self._token.token()}"),)
