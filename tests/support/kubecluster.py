"""A real, local Kubernetes control plane for tests: etcd + kube-apiserver, kube-controller-manager,
kube-scheduler, and kwok for fake nodes.

The binaries are built from the Go module proxy by ``tests/cluster/build.sh`` (pinned in
``tests/cluster/go.mod`` and ``tests/cluster/kwok/go.mod``) into a cache keyed by their ``go.sum``; this
module generates a throwaway PKI, starts the processes on free 127.0.0.1 ports with a temporary data
directory, writes an admin KUBECONFIG and waits for ``/readyz``. There is no kubelet and no container
runtime: kwok's fake nodes take scheduled pods to ``Running`` (and give them made-up IPs) without running
anything, so a pod's spec is checked by the real API server, admission and scheduler, never executed.
For pods that really run, ``tests/support/kubenode.py`` adds a real node to this control plane.

    python -m tests.support.kubecluster build   # build (or find) the binaries, print their directory
    python -m tests.support.kubecluster up      # start a control plane, print KUBECONFIG, wait for Ctrl-C

The ``kubeconfig`` pytest fixture (tests/conftest.py) uses ``$KUBECONFIG`` when it is set (any cluster:
kind, k3s, a cloud one), else starts a :class:`LocalControlPlane`, else skips with the reason.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "cluster" / "build.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
KWOK_STAGES = "kwok-stages.yaml"
FAKE_NODE_LABEL = ("type", "kwok")

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"  # virtual IPs; routed only on a real node (kube-proxy)
SERVICE_API_IP = "10.96.0.1"  # the kubernetes Service: the first address of the range
READY_TIMEOUT = 30.0
BUILD_TIMEOUT = 3600.0


class BuildError(RuntimeError):
    """The binaries could not be built; ``reason`` is one line."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason + (f"\n{detail}" if detail else ""))
        self.reason = reason


class ControlPlaneError(RuntimeError):
    """A process did not start or did not become ready; the message ends with the tail of its log."""


# --- building -------------------------------------------------------------------------------------


def build(
    *, target: str = "plane", cache: Path | None = None, timeout: float = BUILD_TIMEOUT, quiet: bool = True
) -> Path:
    """Run ``build.sh TARGET`` (a no-op when the cache already has the binaries) and return the bin
    directory. Targets: ``plane`` (this module's processes) and ``node`` (tests/support/kubenode.py)."""
    env = dict(os.environ)
    if cache is not None:
        env["OPENSHELL_CLUSTER_CACHE"] = str(cache)
    try:
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT), target],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if quiet else None,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"build.sh did not finish within {timeout:.0f}s") from exc
    err = proc.stderr or ""
    if proc.returncode != 0:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        reason = next((ln for ln in lines if ln.startswith("build.sh:")), lines[-1] if lines else "")
        raise BuildError(reason or f"build.sh exited {proc.returncode}", "\n".join(lines[-20:]))
    out = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not out:
        raise BuildError("build.sh printed no bin directory")
    bin_dir = Path(out[-1])
    missing = [b for b in (BINARIES if target == "plane" else ()) if not (bin_dir / b).is_file()]
    if missing:
        raise BuildError(f"build.sh left no {', '.join(missing)} in {bin_dir}")
    return bin_dir


# --- certificates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_public_key: Path
    sa_private_key: Path


def make_certs(directory: Path, *, days: int = 1, extra_ips: Sequence[str] = ()) -> Certs:
    """A CA, an apiserver serving cert (127.0.0.1, localhost, the kubernetes service names, and
    ``extra_ips``), an admin client cert in ``system:masters`` and the service-account token signing
    key pair (EC P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    def write_key(key: ec.EllipticCurvePrivateKey, name: str) -> Path:
        path = directory / name
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
        return path

    def write_cert(cert: x509.Certificate, name: str) -> Path:
        path = directory / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def usage(*, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True,
            key_cert_sign=ca,
            crl_sign=ca,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            encipher_only=False,
            decipher_only=False,
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "openshell-test-kube-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(
        subject: x509.Name, eku: x509.ObjectIdentifier, sans: list[x509.GeneralName] | None = None
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"]
    dns.append("kubernetes.default.svc.cluster.local")
    serving, serving_key = issue(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName(d) for d in dns]
        + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", *extra_ips)],
    )
    admin, admin_key = issue(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, "openshell-test-admin"),
            ]
        ),
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    sa_key = ec.generate_private_key(ec.SECP256R1())
    sa_public = directory / "sa.pub"
    sa_public.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Certs(
        ca_cert=write_cert(ca, "ca.crt"),
        ca_key=write_key(ca_key, "ca.key"),
        serving_cert=write_cert(serving, "apiserver.crt"),
        serving_key=write_key(serving_key, "apiserver.key"),
        admin_cert=write_cert(admin, "admin.crt"),
        admin_key=write_key(admin_key, "admin.key"),
        sa_public_key=sa_public,
        sa_private_key=write_key(sa_key, "sa.key"),
    )


def issue_client_cert(
    certs: Certs, directory: Path, name: str, *, cn: str, orgs: Sequence[str] = ()
) -> tuple[Path, Path]:
    """A client certificate for ``cn`` in groups ``orgs``, signed by the plane's CA: (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    subject.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(ca.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def write_kubeconfig(
    path: Path,
    server: str,
    certs: Certs,
    *,
    name: str = "openshell-test",
    client: tuple[Path, Path] | None = None,
) -> Path:
    """A KUBECONFIG for ``server`` trusting the plane's CA, as the admin or as ``client`` (cert, key)."""
    cert, key = client or (certs.admin_cert, certs.admin_key)
    config: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": server, "certificate-authority": str(certs.ca_cert)}}
        ],
        "users": [{"name": "user", "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": "user", "namespace": "default"}}],
        "current-context": name,
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Child side of Popen: a process group of its own, and SIGKILL when the test process dies."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def stop_group(popen: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM to the process group of ``popen`` (started in a session of its own), SIGKILL to the
    group after ``grace`` seconds: whatever the process forked goes with it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=5)


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    log_file: IO[bytes]


class LocalControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on 127.0.0.1, in a temporary directory.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. ``stop`` is idempotent, also runs
    at interpreter exit, and kills whole process groups (SIGTERM, then SIGKILL).
    """

    def __init__(
        self,
        bin_dir: Path | None = None,
        *,
        workdir: Path | None = None,
        controller_manager: bool = True,
        scheduler: bool = True,
        fake_nodes: int = 1,
        ready_timeout: float = READY_TIMEOUT,
        extra_apiserver_args: Sequence[str] = (),
        address: str = "127.0.0.1",
    ) -> None:
        self._bin_dir = bin_dir
        # Where the API server listens and what it advertises: 127.0.0.1 unless a real node (in a
        # namespace of its own, tests/support/kubenode.py) must reach it over a veth.
        self.address = address
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="openshell-kube-"))
        self.controller_manager = controller_manager
        self.scheduler = scheduler
        self.fake_nodes = fake_nodes
        self.ready_timeout = ready_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self._procs: list[_Proc] = []
        self.kubeconfig = self.workdir / "kubeconfig"
        self.server = ""
        self.certs: Certs | None = None
        self.startup_seconds = 0.0

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = build()
        return self._bin_dir

    def __enter__(self) -> LocalControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- start --

    def start(self) -> LocalControlPlane:
        bin_dir = self.bin_dir  # builds if needed, before the clock starts
        began = time.monotonic()
        atexit.register(self.stop)
        try:
            extra_ips = [] if self.address == "127.0.0.1" else [self.address, SERVICE_API_IP]
            self.certs = certs = make_certs(self.workdir / "pki", extra_ips=extra_ips)
            etcd_url = self._start_etcd(bin_dir)
            port = free_port()
            self.server = f"https://{self.address}:{port}"
            write_kubeconfig(self.kubeconfig, self.server, certs)
            self._start_apiserver(bin_dir, certs, etcd_url, port)
            self._wait_ready(began)
            if self.controller_manager:
                self._start_controller_manager(bin_dir, certs)
            if self.scheduler:
                self._start_scheduler(bin_dir)
            if self.fake_nodes:
                self._start_kwok(bin_dir)
                for i in range(self.fake_nodes):
                    self.create_fake_node(f"kwok-node-{i}")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _spawn(self, name: str, argv: list[str]) -> _Proc:
        log = self.workdir / f"{name}.log"
        log_file = log.open("ab")
        log_file.write(("$ " + " ".join(argv) + "\n").encode())
        log_file.flush()
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - setsid + PDEATHSIG, no threads involved
        )
        proc = _Proc(name, popen, log, log_file)
        self._procs.append(proc)
        return proc

    def _fail(self, proc: _Proc, what: str) -> ControlPlaneError:
        code = proc.popen.poll()
        state = f"exited {code}" if code is not None else "still running"
        return ControlPlaneError(
            f"{proc.name} {what} ({state}); last lines of {proc.log}:\n{log_tail(proc.log)}"
        )

    def _start_etcd(self, bin_dir: Path) -> str:
        client, peer = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        proc = self._spawn(
            "etcd",
            [
                str(bin_dir / "etcd"),
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",  # throwaway data: no fsync keeps it fast on slow disks
                "--log-level=warn",
            ],
        )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if proc.popen.poll() is not None:
                raise self._fail(proc, "did not start")
            try:
                with urllib.request.urlopen(f"{client_url}/health", timeout=1) as resp:
                    if b'"health":"true"' in resp.read():
                        return client_url
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise self._fail(proc, f"was not healthy within {self.ready_timeout:.0f}s")
            time.sleep(0.1)

    def _start_apiserver(self, bin_dir: Path, certs: Certs, etcd_url: str, port: int) -> None:
        self._spawn(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={certs.serving_cert}",
                f"--tls-private-key-file={certs.serving_key}",
                f"--client-ca-file={certs.ca_cert}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={certs.sa_public_key}",
                f"--service-account-signing-key-file={certs.sa_private_key}",
                f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--authorization-mode=Node,RBAC",
                # PodSecurity is in the default set since 1.25; naming it makes sure it is on.
                "--enable-admission-plugins=NodeRestriction,PodSecurity",
                # Privileged pods pass validation, so a refusal in a restricted namespace is PodSecurity's.
                "--allow-privileged=true",
                # 127.0.0.1 is not a valid endpoint address; with a real node, pods reach the API server
                # through the kubernetes Service, so its endpoint is kept up to date.
                "--endpoint-reconciler-type=" + ("none" if self.address == "127.0.0.1" else "lease"),
                # Logs and exec of real pods: the API server calls the kubelet as the admin.
                f"--kubelet-client-certificate={certs.admin_cert}",
                f"--kubelet-client-key={certs.admin_key}",
                "--kubelet-preferred-address-types=InternalIP",  # node names are not in any DNS here
                "--profiling=false",
                *self.extra_apiserver_args,
            ],
        )

    def _start_controller_manager(self, bin_dir: Path, certs: Certs) -> None:
        """Namespace deletion, the default ServiceAccount, Jobs, ReplicaSets, garbage collection."""
        self._spawn(
            "kube-controller-manager",
            [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={self.workdir / 'kcm-certs'}",
                f"--service-account-private-key-file={certs.sa_private_key}",
                f"--root-ca-file={certs.ca_cert}",
                f"--cluster-signing-cert-file={certs.ca_cert}",
                f"--cluster-signing-key-file={certs.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                "--controllers=*",
            ],
        )

    def _start_scheduler(self, bin_dir: Path) -> None:
        self._spawn(
            "kube-scheduler",
            [
                str(bin_dir / "kube-scheduler"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={self.workdir / 'scheduler-certs'}",
                "--leader-elect=false",
            ],
        )

    def _start_kwok(self, bin_dir: Path) -> None:
        """kwok plays the kubelet for nodes labelled type=kwok: marks them Ready, keeps them alive and moves
        pods bound to them to Running (then Succeeded/deleted like kwokctl's "fast" stages)."""
        stages = bin_dir / KWOK_STAGES
        if not stages.is_file():
            raise ControlPlaneError(f"{stages} is missing: rebuild with tests/cluster/build.sh")
        self._spawn(
            "kwok",
            [
                str(bin_dir / "kwok"),
                f"--kubeconfig={self.kubeconfig}",
                f"--config={stages}",
                f"--manage-nodes-with-label-selector={FAKE_NODE_LABEL[0]}={FAKE_NODE_LABEL[1]}",
                "--node-ip=127.0.0.1",  # status only: nothing connects to a fake node
                "--cidr=10.244.0.0/16",  # status only: made-up pod IPs, nothing routes to them
            ],
        )

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """A JSON request as the admin; raises urllib.error.HTTPError on a non-2xx answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.server}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10, context=self.ssl_context()) as resp:
            return json.loads(resp.read() or b"null")

    def create_fake_node(self, name: str) -> None:
        """A Node that kwok manages (it fills in status: Ready, capacity, addresses)."""
        self.api(
            "POST",
            "/api/v1/nodes",
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {
                        FAKE_NODE_LABEL[0]: FAKE_NODE_LABEL[1],
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                    },
                    "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                },
            },
        )

    def ssl_context(self) -> ssl.SSLContext:
        assert self.certs is not None
        ctx = ssl.create_default_context(cafile=str(self.certs.ca_cert))
        ctx.load_cert_chain(str(self.certs.admin_cert), str(self.certs.admin_key))
        return ctx

    def _wait_ready(self, began: float) -> None:
        apiserver = next(p for p in self._procs if p.name == "kube-apiserver")
        ctx = self.ssl_context()
        last = ""
        while True:
            for proc in self._procs:
                if proc.popen.poll() is not None:
                    raise self._fail(proc, "exited before the API server was ready")
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", timeout=2, context=ctx) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = exc.read().decode(errors="replace")[-2000:]
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            if time.monotonic() - began > self.ready_timeout:
                raise self._fail(
                    apiserver, f"was not ready within {self.ready_timeout:.0f}s (last /readyz: {last})"
                )
            time.sleep(0.2)

    # -- stop --

    def stop(self, grace: float = 10.0) -> None:
        """One at a time, in reverse start order: kube-apiserver shuts down in about a second while
        etcd is up, but waits out its grace period when etcd went first."""
        procs, self._procs = list(reversed(self._procs)), []
        for proc in procs:
            stop_group(proc.popen, grace)
            proc.log_file.close()
        atexit.unregister(self.stop)

    def cleanup(self) -> None:
        """Stop, then remove the temporary directory (keeps it when the caller gave the workdir)."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# --- pytest ---------------------------------------------------------------------------------------


def kube_cluster_fixture() -> Iterator[Path]:
    """Body of the session fixture ``kubeconfig``: yields a KUBECONFIG path.

    ``$KUBECONFIG`` set: that cluster, as it is (its first file when it lists several). Otherwise a
    LocalControlPlane, built on first use; where that cannot be built or started, the test skips with the
    first line of the reason. The control plane is stopped when the session ends, failed tests included.
    """
    import pytest

    given = os.environ.get("KUBECONFIG", "")
    if given:
        yield Path(given.split(os.pathsep)[0])
        return
    try:
        bin_dir = build()
    except BuildError as exc:
        pytest.skip(f"no local Kubernetes control plane: {exc.reason}")
    keep = os.environ.get("OPENSHELL_KEEP_CLUSTER_LOGS") == "1"
    plane = LocalControlPlane(bin_dir)
    try:
        plane.start()
    except ControlPlaneError as exc:
        # Built but not started: a regression of ours (or of this machine), not a missing tool, so it
        # fails the tests that need it rather than hiding them behind a skip.
        plane.cleanup()
        pytest.fail(f"the local Kubernetes control plane was built but did not start: {exc}")
    except BaseException:
        plane.cleanup()
        raise
    try:
        yield plane.kubeconfig
    finally:
        if keep:
            plane.stop()
        else:
            plane.cleanup()


# --- CLI ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.kubecluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build (or find in the cache) etcd and kube-apiserver; print the bin dir")
    up = sub.add_parser("up", help="start a local control plane, print its KUBECONFIG, run until Ctrl-C")
    up.add_argument("--bin-dir", type=Path, help="use these binaries instead of building")
    up.add_argument("--workdir", type=Path, help="keep certificates, logs and data here (kept on exit)")
    up.add_argument("--no-controller-manager", action="store_true")
    up.add_argument("--no-scheduler", action="store_true")
    up.add_argument("--fake-nodes", type=int, default=1, help="kwok nodes to create (0: no kwok)")
    up.add_argument(
        "--apiserver-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra kube-apiserver flag, e.g. --apiserver-arg=--feature-gates=SomeGate=true (repeatable)",
    )
    args = parser.parse_args(argv)

    try:
        bin_dir = args.bin_dir if getattr(args, "bin_dir", None) else build(quiet=False)
    except BuildError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return 1
    if args.command == "build":
        print(bin_dir)
        return 0

    workdir = args.workdir.resolve() if args.workdir else None
    if workdir:
        workdir.mkdir(parents=True, exist_ok=True)
    plane = LocalControlPlane(
        bin_dir,
        workdir=workdir,
        controller_manager=not args.no_controller_manager,
        scheduler=not args.no_scheduler,
        fake_nodes=args.fake_nodes,
        extra_apiserver_args=args.apiserver_arg,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        plane.start()
        print(f"ready in {plane.startup_seconds:.1f}s; logs in {plane.workdir}", file=sys.stderr)
        print(f"export KUBECONFIG={plane.kubeconfig}", file=sys.stderr)
        print(plane.kubeconfig, flush=True)
        while all(p.popen.poll() is None for p in plane._procs):
            time.sleep(1)
        dead = next(p for p in plane._procs if p.popen.poll() is not None)
        print(f"error: {dead.name} exited; last lines:\n{log_tail(dead.log)}", file=sys.stderr)
        return 1
    except ControlPlaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if workdir:
            plane.stop()
        else:
            plane.cleanup()


if __name__ == "__main__":
    sys.exit(main())
