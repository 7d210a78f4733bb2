"""TLS of the gateway's listeners (``grpc.tls``, ``http.tls``), read again from disk when it changes.

A renewed certificate (cert-manager, a Kubernetes Secret volume that swaps its ``..data``
symlink) is served to new connections without a restart; connections already open keep the
material they were made with.

- **When it is read again.** At each new handshake the files' (resolved path, inode, size,
  mtime) are compared with those of the material in use: a few ``stat`` calls, no reading while
  nothing changed. The resolved path catches a symlink swap whose target has the same size and
  time.
- **What is accepted.** The files are read, and read again if they changed while being read; the
  certificate chain and key must parse (PEM, unencrypted key) and the key must be the leaf
  certificate's; the client CA bundle, when configured, must hold at least one certificate. Only
  then do new handshakes use them, all three at once.
- **A broken rotation** (a half-written file, a key of another certificate, a missing file) keeps
  the last good material in use: an error is logged once for those files, and they are tried
  again when they change, or ``RETRY_S`` later (a file system with coarse modification times).
- **At start** the same checks are fatal: the gateway does not start on files it cannot use.

gRPC uses ``grpc.dynamic_ssl_server_credentials``, whose fetcher gRPC calls before each
handshake; the HTTP API an ``ssl.SSLContext`` whose ``sni_callback`` (run for every ClientHello,
with or without a server name) moves the connection onto the context built from the newest good
material. With ``client_ca_file`` a client certificate signed by that bundle is required (mTLS);
which CA bundle is trusted follows the file too. On the HTTP API that holds because mTLS turns
session resumption off there (TLS 1.3 only, no session tickets, see ``HttpTls._context``): a
resumed session is not verified again and is served from the listener's first context, so a client
of a CA removed from the file could otherwise go on resuming. gRPC builds a new SSL context (cache
and ticket keys) for each new configuration, so a resumption there meets the new bundle.

The HTTP API's check runs in the ``sni_callback``, on the event loop: a few ``stat`` calls per
handshake (about 0.1 ms), and reading, checking and loading the files when they changed (about
1.5 ms). That is accepted for a local disk or a Secret volume; a TLS file on a file system that
hangs (NFS, a FUSE secret store) would stall the loop, and gRPC with it. gRPC's check runs in a
gRPC core thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.config import TlsSettings

log = logging.getLogger(__name__)

#: Files found broken are read again after this long even if they look unchanged.
RETRY_S = 10.0


class TlsError(Exception):
    """The TLS files cannot be used; the message names the listener, the file and why."""


@dataclass(frozen=True)
class FileStamp:
    path: Path  # resolved: a swapped symlink changes it
    inode: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Material:
    cert_chain: bytes
    key: bytes
    client_ca: bytes | None
    stamps: tuple[FileStamp, ...]


def _stamp(path: Path) -> FileStamp:
    resolved = path.resolve()
    st = resolved.stat()
    return FileStamp(resolved, st.st_ino, st.st_size, st.st_mtime_ns)


class TlsFiles:
    """One listener's TLS files: the material in use, and the check for a newer one.

    ``changed`` may be called from gRPC's threads and from the event loop at once: a lock keeps
    one reader at a time."""

    def __init__(
        self, settings: TlsSettings, *, listener: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        assert settings.cert_file is not None and settings.key_file is not None
        self._paths: tuple[tuple[str, Path], ...] = (
            ("certificate", settings.cert_file),
            ("key", settings.key_file),
            *((("client CA", settings.client_ca_file),) if settings.client_ca_file is not None else ()),
        )
        self.listener = listener
        self._clock = clock
        self._lock = threading.Lock()
        # The stamps last found broken, and when: logged once, tried again on a change or RETRY_S.
        self._failed: tuple[tuple[FileStamp, ...] | None, float] | None = None
        self.material = self._read()

    @property
    def mutual(self) -> bool:
        return len(self._paths) == 3

    def _stamps(self) -> tuple[FileStamp, ...]:
        stamps = []
        for what, path in self._paths:
            try:
                stamps.append(_stamp(path))
            except OSError as exc:
                raise TlsError(self._where(what, path, exc.strerror or str(exc))) from None
        return tuple(stamps)

    def _where(self, what: str, path: Path, why: str) -> str:
        return f"cannot use the {self.listener} TLS {what} {path}: {why}"

    def _read(self) -> Material:
        """Read and check the files; raise TlsError saying what is wrong."""
        for _ in range(3):
            before = self._stamps()
            data: list[bytes] = []
            for (what, path), stamp in zip(self._paths, before, strict=True):
                try:
                    data.append(stamp.path.read_bytes())
                except OSError as exc:
                    raise TlsError(self._where(what, path, exc.strerror or str(exc))) from None
            if self._stamps() == before:
                break
        else:
            raise TlsError(f"the {self.listener} TLS files kept changing while being read")
        material = Material(data[0], data[1], data[2] if self.mutual else None, before)
        self._check(material)
        return material

    def _check(self, material: Material) -> None:
        (_, cert_path), (_, key_path) = self._paths[0], self._paths[1]
        try:
            chain = x509.load_pem_x509_certificates(material.cert_chain)
        except ValueError as exc:
            raise TlsError(
                self._where("certificate", cert_path, f"not a PEM certificate chain ({exc})")
            ) from None
        try:
            key = serialization.load_pem_private_key(material.key, password=None)
        except (ValueError, TypeError) as exc:
            raise TlsError(
                self._where("key", key_path, f"not an unencrypted PEM private key ({exc})")
            ) from None
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if chain[0].public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise TlsError(
                self._where("key", key_path, f"it is not the key of the certificate in {cert_path}")
            )
        if material.client_ca is not None:
            ca_path = self._paths[2][1]
            try:
                x509.load_pem_x509_certificates(material.client_ca)
            except ValueError as exc:
                raise TlsError(
                    self._where("client CA", ca_path, f"not a PEM certificate bundle ({exc})")
                ) from None

    def changed(self) -> Material | None:
        """The newer material when the files changed and are good, else None (nothing changed, or
        the change is broken: logged once, the material in use stays)."""
        with self._lock:
            error: TlsError | None
            try:
                stamps: tuple[FileStamp, ...] | None = self._stamps()
            except TlsError as exc:
                stamps, error = None, exc
            else:
                if stamps == self.material.stamps:
                    return None
                error = None
            now = self._clock()
            if self._failed is not None and self._failed[0] == stamps and now - self._failed[1] < RETRY_S:
                return None
            if error is None:
                try:
                    material = self._read()
                except TlsError as exc:
                    error = exc
                else:
                    self.material, self._failed = material, None
                    log.info("%s TLS: new certificate files in use for new connections", self.listener)
                    return material
            if self._failed is None or self._failed[0] != stamps:
                log.error("%s; new connections keep the last good certificate and key", error)
            self._failed = (stamps, now)
            return None


def load(settings: TlsSettings, *, listener: str) -> TlsFiles | None:
    """The listener's TLS files, checked (TlsError otherwise), or None for plaintext."""
    if not settings.enabled:
        return None
    files = TlsFiles(settings, listener=listener)
    log.info("%s over TLS%s", listener, " with client certificates required (mTLS)" if files.mutual else "")
    return files


def grpc_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials whose certificate (and client CA) follow the files."""

    def configuration(material: Material) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(material.key, material.cert_chain)], root_certificates=material.client_ca
        )

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each handshake, in its own thread: never raise into it.
        try:
            material = files.changed()
        except Exception:
            log.exception("%s TLS: checking the certificate files failed", files.listener)
            return None
        return configuration(material) if material is not None else None

    # gRPC's fetcher may answer None ("no change"); its stubs say otherwise.
    return grpc.dynamic_ssl_server_credentials(
        configuration(files.material),
        fetch,  # type: ignore[arg-type]
        require_client_authentication=files.mutual,
    )


@contextlib.contextmanager
def _as_files(material: Material) -> Iterator[tuple[str, str]]:
    """Paths OpenSSL can load the checked bytes from: memory-backed files where the system has
    them (the key never touches a disk, and what is loaded is exactly what was checked), else the
    files the bytes were read from."""
    if not hasattr(os, "memfd_create"):
        yield str(material.stamps[0].path), str(material.stamps[1].path)
        return
    fds = []
    try:
        for data in (material.cert_chain, material.key):
            fd = os.memfd_create("openshell-tls", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
        yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
    finally:
        for fd in fds:
            os.close(fd)


def _no_password() -> bytes:
    # The key was checked to be unencrypted; never let OpenSSL prompt on a terminal.
    raise TlsError("the TLS key is encrypted")


class HttpTls:
    """The HTTP API's server context: new connections get the newest good material."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._current = self._context(files.material)
        #: What the listener is given; its ``sni_callback`` moves each new connection onto the
        #: context of the newest good material.
        self.context = self._current

    def _context(self, material: Material) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if material.client_ca is not None:
            # A resumed handshake does not verify the client certificate again, and resumption is
            # served from the listener's first context (OpenSSL's session context: its session
            # cache and ticket keys), which never follows the files: a client of a CA removed
            # from client_ca_file could go on resuming. So no resumption with mTLS: TLS 1.3 only
            # (TLS 1.2 resumes by session ID from a cache Python cannot turn off), and no
            # session tickets (TLS 1.3's only way to resume; OP_NO_TICKET alone would make
            # OpenSSL issue stateful ones).
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.options |= ssl.OP_NO_TICKET
            ctx.num_tickets = 0
        try:
            with _as_files(material) as (cert, key):
                ctx.load_cert_chain(cert, key, password=_no_password)
            if material.client_ca is not None:
                ctx.load_verify_locations(cadata=material.client_ca.decode("ascii", "replace"))
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (ssl.SSLError, OSError, TlsError) as exc:
            raise TlsError(f"cannot use the {self._files.listener} TLS files: {exc}") from None
        ctx.sni_callback = self._on_hello
        return ctx

    def _on_hello(
        self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext
    ) -> None:
        try:
            material = self._files.changed()
            if material is not None:
                self._current = self._context(material)
        except Exception as exc:  # a handshake must not fail for a rotation gone wrong
            log.error("%s TLS: %s; new connections keep the last good certificate", self._files.listener, exc)
        if conn.context is not self._current:
            conn.context = self._current
