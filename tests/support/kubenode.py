"""A local Kubernetes cluster with one real node: the control plane of ``kubecluster.py`` plus kubelet,
containerd (runc), a CNI bridge, kube-proxy (nftables) and kube-router's NetworkPolicy controller, and a
registry the node pulls from.

The node is what the control plane alone lacks: pods really run (containerd pulls their images from a
real registry, runc starts them, the runtime mounts image volumes), Services route (kube-proxy) and
NetworkPolicies are enforced (kube-router's firewall, the one k3s embeds: iptables-nft + ipset; the SIG
Network kube-network-policies needs the kernel's nft ``queue`` expression, which these machines lack).
Everything of the node lives in a network namespace ``osnode-<tag>`` (the bridge, the pods' veths,
kube-proxy's and kube-router's rules) and, for containerd and the kubelet, a mount namespace of their
own in which the paths they insist on (/var/lib/kubelet, /var/log/pods, /var/log/containers,
/var/lib/cni, /run/containerd) are directories of the node's work directory. The host keeps one veth
and one route; the API server and the registry listen on the host's end of that veth:

    host: API server, registry, tests   10.86.<k>.1 ── veth ── 10.86.<k>.2   node namespace
                                                                  └─ cni0 10.89.<k>.1/24 ── pods

There is no cluster DNS: name the gateway by a ClusterIP (the chart's ``gateway.service.clusterIP``).

    python -m tests.support.kubenode up     # start one, print KUBECONFIG and the registry; Ctrl-C stops

What the node changes on the host and gives back at stop: the kubelet sets six kernel settings
(vm.overcommit_memory, kernel.panic, ...; a network namespace does not isolate them), which ``stop``
restores, and containerd's cgroups of our containers.

Binaries: ``tests/cluster/build.sh`` (plane) and ``tests/cluster/build.sh node``. Needs root, runc,
iproute2, nftables, iptables, ipset, util-linux (unshare, nsenter), docker-registry, skopeo and umoci
(installed with apt when missing).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support import gvisor, images, kubecluster
from tests.support.registry import Registry, running_registry

LINK_PREFIX = "10.86"  # host <-> node veth, a /30 per cluster
POD_PREFIX = "10.89"  # the node's pods, a /24 per cluster
NODE_NAME = "node-0"
READY_TIMEOUT = 120.0
APT_TOOLS = {
    "runc": "runc",
    "ip": "iproute2",
    "nft": "nftables",
    "iptables": "iptables",
    "ipset": "ipset",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
    "umoci": "umoci",
}
# Paths containerd, the CNI plugins and the kubelet use whatever their configuration says (device plugin
# sockets, container log links, IPAM leases and result caches, shim sockets): in the node's mount
# namespace each is a directory of the work directory.
PRIVATE_PATHS = (
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/containerd",
)
# Set by the kubelet at start (setupKernelTunables); restored by LocalNode.stop.
KERNEL_TUNABLES = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)


class NodeError(RuntimeError):
    """The node could not be set up or did not become Ready; the message says which part and why."""


def node_unavailable() -> str | None:
    """Why a local node cannot run on this machine (a missing right or tool), or None. Installs missing
    tools with apt first when it can."""
    if sys.platform != "linux":
        return "a local node needs Linux"
    if os.geteuid() != 0:
        return "a local node needs root (network and mount namespaces, runc)"
    missing = [tool for tool in APT_TOOLS if shutil.which(tool) is None]
    if missing and shutil.which("apt-get"):
        packages = sorted({APT_TOOLS[t] for t in missing})
        apt = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300"]
        subprocess.run(
            [*apt, *packages],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            check=False,
            timeout=900,
        )
        missing = [tool for tool in APT_TOOLS if shutil.which(tool) is None]
    if missing:
        packages = " ".join(sorted({APT_TOOLS[t] for t in missing}))
        return f"a local node needs {', '.join(missing)} (apt install {packages})"
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise NodeError(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()}")
    return done


# --- network --------------------------------------------------------------------------------------


@dataclass
class NodeNetwork:
    """The node's network namespace, its veth to the host, and the host's route to the pod range."""

    name: str
    host_ip: str
    node_ip: str
    pod_cidr: str
    host_veth: str

    @classmethod
    def create(cls) -> NodeNetwork:
        taken = _run("ip", "-4", "route", "show", "table", "all").stdout + _run("ip", "-4", "addr").stdout
        for _ in range(50):
            tag = secrets.token_hex(3)
            k = int(tag, 16) % 250 + 1
            # Another cluster of ours (or anything else) on these ranges: pick again.
            if f"{LINK_PREFIX}.{k}." not in taken and f"{POD_PREFIX}.{k}." not in taken:
                break
        else:
            raise NodeError(f"no free {LINK_PREFIX}.K.0/30 and {POD_PREFIX}.K.0/24 pair on this host")
        net = cls(
            name=f"osnode-{tag}",
            host_ip=f"{LINK_PREFIX}.{k}.1",
            node_ip=f"{LINK_PREFIX}.{k}.2",
            pod_cidr=f"{POD_PREFIX}.{k}.0/24",
            host_veth=f"onh{tag}",
        )
        node_veth = f"onn{tag}"
        try:
            _run("ip", "netns", "add", net.name)
            _run("ip", "link", "add", net.host_veth, "type", "veth", "peer", "name", node_veth)
            _run("ip", "link", "set", node_veth, "netns", net.name)
            _run("ip", "addr", "add", f"{net.host_ip}/30", "dev", net.host_veth)
            _run("ip", "link", "set", net.host_veth, "up")
            _run("ip", "-n", net.name, "addr", "add", f"{net.node_ip}/30", "dev", node_veth)
            _run("ip", "-n", net.name, "link", "set", node_veth, "up")
            _run("ip", "-n", net.name, "link", "set", "lo", "up")
            _run("ip", "-n", net.name, "route", "add", "default", "via", net.host_ip)
            _run("ip", "route", "add", net.pod_cidr, "via", net.node_ip, "dev", net.host_veth)
            # Per namespace: the node routes between its pods and the host; the host's own stays as is.
            _run("ip", "netns", "exec", net.name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        except BaseException:
            net.delete()
            raise
        return net

    def prefix(self) -> list[str]:
        """Runs a command in the node's network namespace."""
        return ["nsenter", f"--net=/run/netns/{self.name}", "--"]

    def delete(self) -> None:
        # Our veth takes our route with it; nothing here names a route or address another owner may hold.
        _run("ip", "link", "del", self.host_veth, check=False)
        _run("ip", "netns", "del", self.name, check=False)


# --- node -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeBinaries:
    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    def missing(self) -> list[str]:
        names = ["kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "kube-router", "pause"]
        names += [f"cni/{p}" for p in ("bridge", "host-local", "loopback", "portmap")]
        return [n for n in names if not os.access(self.dir / n, os.X_OK)]


def containerd_config(workdir: Path, *, pause_image: str, runsc: gvisor.Runtime | None = None) -> str:
    """containerd's config; with ``runsc``, a second runtime, handler ``runsc`` (gVisor), beside the
    default runc (opt-in: ``LocalCluster(..., gvisor=...)``)."""
    root = workdir / "containerd"
    extra = "" if runsc is None else "\n" + runsc.containerd_section(root)
    base = textwrap.dedent(
        f"""\
        version = 3
        root = "{root / "root"}"
        state = "{root / "state"}"

        [grpc]
          address = "{root / "containerd.sock"}"

        [ttrpc]
          address = "{root / "containerd.sock.ttrpc"}"

        [plugins.'io.containerd.cri.v1.images']
          snapshotter = "overlayfs"
          [plugins.'io.containerd.cri.v1.images'.pinned_images]
            sandbox = "{pause_image}"
          [plugins.'io.containerd.cri.v1.images'.registry]
            config_path = "{root / "certs.d"}"

        [plugins.'io.containerd.cri.v1.runtime']
          # Lowering oom_score_adj (the kubelet asks -998 for the pause container) needs CAP_SYS_RESOURCE,
          # which root in these VMs lacks: clamp to ours instead of failing every pod.
          restrict_oom_score_adj = true
          # Pod network namespaces under our state directory, not /var/run/netns.
          netns_mounts_under_state_dir = true
          [plugins.'io.containerd.cri.v1.runtime'.cni]
            bin_dirs = ["{workdir / "cni-bin"}"]
            conf_dir = "{workdir / "cni"}"
          [plugins.'io.containerd.cri.v1.runtime'.containerd]
            default_runtime_name = "runc"
            [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
              runtime_type = "io.containerd.runc.v2"
              [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
                BinaryName = "{shutil.which("runc") or "runc"}"
                Root = "{root / "runc"}"
                SystemdCgroup = false

        [plugins.'io.containerd.nri.v1.nri']
          disable = true
        """
    )
    return base + extra


def cni_config(pod_cidr: str) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "openshell-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,  # the host routes the pod range back to the node: no NAT needed
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class LocalNode:
    """containerd, kubelet, kube-proxy and kube-router for one node, in ``network``'s namespace."""

    network: NodeNetwork
    binaries: NodeBinaries
    workdir: Path
    kubelet_kubeconfig: Path  # system:node:<name> in system:nodes
    admin_kubeconfig: Path  # kube-proxy and kube-router (they need cluster-wide reads)
    ca_cert: Path
    pause_image: str
    registries: Sequence[str] = ()  # HOST:PORT served over plain HTTP
    name: str = NODE_NAME
    gvisor: gvisor.Runtime | None = None  # the runtime handler ``runsc`` too (tests/support/gvisor.py)
    _procs: list[_Proc] = field(default_factory=list)
    _holder: subprocess.Popen[str] | None = None  # keeps the node's mount namespace
    _made_dirs: list[Path] = field(default_factory=list)  # mount points created on the host
    _tunables: dict[str, str] = field(default_factory=dict)  # kernel settings before the kubelet
    _containers: set[str] = field(default_factory=set)

    @property
    def socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> _Proc:
        assert self._holder is not None, "the mount namespace comes first"
        log = self.workdir / f"{name}.log"
        enter = [
            "nsenter",
            f"--mount=/proc/{self._holder.pid}/ns/mnt",
            f"--net=/run/netns/{self.network.name}",
        ]
        with log.open("ab") as out:
            out.write(("$ " + " ".join(argv) + "\n").encode())
            popen = subprocess.Popen(
                [*enter, "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        proc = _Proc(name, popen, log)
        self._procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for proc in self._procs:
            if proc.popen.poll() is not None:
                raise NodeError(
                    f"{proc.name} exited ({proc.popen.returncode}); last lines of {proc.log}:\n"
                    f"{kubecluster.log_tail(proc.log)}"
                )

    def start(self) -> None:
        """containerd, the kubelet and kube-proxy; :meth:`start_network_policies` once the Node exists."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_mount_namespace()
        self._start_containerd()
        self._tunables = {key: (Path("/proc/sys") / key).read_text().strip() for key in KERNEL_TUNABLES}
        self._start_kubelet()
        self._start_kube_proxy()

    def _start_mount_namespace(self) -> None:
        """A process holding a mount namespace (slave of the host's: host mounts show inside, ours stay
        inside) in which PRIVATE_PATHS are bind mounts of our directories. Everything the node mounts
        (overlay snapshots, volumes, network namespace files) goes away with it."""
        binds = []
        for path in map(Path, PRIVATE_PATHS):
            if not path.exists():
                path.mkdir(parents=True)
                self._made_dirs.append(path)
            source = self.workdir / "private" / path.relative_to("/")
            source.mkdir(parents=True, exist_ok=True)
            binds.append(f"mount --bind {source} {path}")
        script = "set -e; " + "; ".join(binds) + "; echo ready; exec sleep 2147483647"
        self._holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self._holder.stdout is not None
        if self._holder.stdout.readline().strip() != "ready":
            error = self._holder.stderr.read() if self._holder.stderr else ""
            raise NodeError(f"could not set up the node's mount namespace: {error.strip()}")

    def _start_containerd(self) -> None:
        for host in self.registries:
            d = self.workdir / "containerd" / "certs.d" / host
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts.toml").write_text(
                f'server = "http://{host}"\n\n[host."http://{host}"]\n  capabilities = ["pull", "resolve"]\n'
            )
        # CNI plugins from one directory: ours (bin/cni); containerd looks for nothing else.
        cni_bin = self.workdir / "cni-bin"
        if not cni_bin.exists():
            cni_bin.symlink_to(self.binaries.path("cni"))
        cni_conf = self.workdir / "cni"
        cni_conf.mkdir(exist_ok=True)
        (cni_conf / "10-openshell.conflist").write_text(
            json.dumps(cni_config(self.network.pod_cidr), indent=2)
        )
        config = self.workdir / "containerd" / "config.toml"
        config.write_text(containerd_config(self.workdir, pause_image=self.pause_image, runsc=self.gvisor))
        if self.gvisor is not None:
            self.gvisor.write_files(self.workdir / "containerd")
        path = f"{self.binaries.dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"  # the shim
        proc = self._spawn(
            "containerd", [str(self.binaries.path("containerd")), "--config", str(config)], {"PATH": path}
        )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                self.check_alive()
                raise NodeError(f"containerd did not open {self.socket} within 30 s (log: {proc.log})")
            time.sleep(0.1)

    def _start_kubelet(self) -> None:
        d = self.workdir / "kubelet"
        d.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.ca_cert)},
            },
            "authorization": {"mode": "Webhook"},
            "address": self.network.node_ip,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",  # the node namespace's loopback
            "cgroupDriver": "cgroupfs",
            # These VMs mount cgroup v1 controllers (hybrid layout); 1.35+ refuses that unless told.
            "failCgroupV1": False,
            # Pods get their cgroups from runc; no QoS hierarchy or node allocatable to enforce here.
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "clusterDomain": "cluster.local",
            "resolvConf": "",  # no cluster DNS, and the host's resolver is not the pods' business
            "serializeImagePulls": False,
            # A test machine's disk is often fuller than a node's: evict only when it is really full.
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
        }
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        self._spawn(
            "kubelet",
            [
                str(self.binaries.path("kubelet")),
                f"--config={d / 'config.yaml'}",
                f"--kubeconfig={self.kubelet_kubeconfig}",
                f"--root-dir={d / 'root'}",
                f"--cert-dir={d / 'pki'}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.network.node_ip}",
                "--v=1",
            ],
        )

    def _start_kube_proxy(self) -> None:
        d = self.workdir / "kube-proxy"
        d.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.admin_kubeconfig)},
            "mode": "nftables",
            "clusterCIDR": self.network.pod_cidr,
            "hostnameOverride": self.name,
            "bindAddress": self.network.node_ip,
            "healthzBindAddress": "127.0.0.1:10256",  # the node namespace's loopback: no clash
            "metricsBindAddress": "127.0.0.1:10249",
            "conntrack": {"maxPerCore": 0},  # leave the kernel's conntrack sizing alone
        }
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        self._spawn(
            "kube-proxy", [str(self.binaries.path("kube-proxy")), f"--config={d / 'config.yaml'}", "--v=1"]
        )

    def start_network_policies(self) -> None:
        # Only the NetworkPolicy controller ("firewall"): pod networking is the bridge's and Services are
        # kube-proxy's. (GHSA-phqm-jgc3-qf8g, reported for this version, is about the proxy module,
        # which does not run here.) It looks its Node up at start, so it starts after the kubelet
        # registered the node.
        self._spawn(
            "kube-router",
            [
                str(self.binaries.path("kube-router")),
                f"--kubeconfig={self.admin_kubeconfig}",
                f"--hostname-override={self.name}",
                "--run-firewall=true",
                "--run-router=false",
                "--run-service-proxy=false",
                "--enable-cni=false",
                "--enable-ipv6=false",
                "--health-port=0",
                "--v=1",
            ],
        )

    def stop(self) -> None:
        """Stop the daemons, then take down every container and shim of the node, its mount namespace
        and cgroups, and put back the kernel settings the kubelet changed."""
        for proc in reversed(self._procs):
            kubecluster.stop_group(proc.popen, grace=10)
        self._procs.clear()
        self._remove_containers()
        self._kill_shims()
        if self._holder is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._holder.pid, signal.SIGKILL)
            self._holder.wait(5)
            self._holder = None
        self._remove_cgroups()
        for key, value in self._tunables.items():
            with contextlib.suppress(OSError):
                if (Path("/proc/sys") / key).read_text().strip() != value:
                    (Path("/proc/sys") / key).write_text(value)
        self._tunables.clear()
        for path in reversed(self._made_dirs):
            with contextlib.suppress(OSError):
                path.rmdir()
        self._made_dirs.clear()

    def _remove_containers(self) -> None:
        if self.gvisor is not None:
            self._containers.update(self.gvisor.delete_containers(self.workdir / "containerd"))
        runc, root = shutil.which("runc"), self.workdir / "containerd" / "runc"
        if runc is None or not root.exists():
            return
        for namespace in root.iterdir():
            listed = _run(runc, "--root", str(namespace), "list", "-q", check=False).stdout.split()
            for container in listed:
                self._containers.add(container)
                _run(runc, "--root", str(namespace), "delete", "--force", container, check=False)

    def _kill_shims(self) -> None:
        """Shims outlive containerd by design; ours are the ones started with our socket's address."""
        address = str(self.socket).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a == b"-address" and b == address for a, b in itertools.pairwise(argv)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry.name), signal.SIGKILL)

    def _remove_cgroups(self) -> None:
        """The cgroups runc made for our containers (under containerd's k8s.io parent, per v1
        controller or in the v2 tree); the parent too when that leaves it empty."""
        root = Path("/sys/fs/cgroup")
        for parent in [*root.glob("k8s.io"), *root.glob("*/k8s.io")]:
            for container in self._containers:
                with contextlib.suppress(OSError):
                    (parent / container).rmdir()
            with contextlib.suppress(OSError):
                parent.rmdir()


def mounts_below(directory: Path) -> list[str]:
    """Mount points under ``directory`` in this process's mount namespace."""
    prefix = str(directory).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    return [p for p in points if p.startswith(prefix)]


# --- the whole cluster ----------------------------------------------------------------------------


def build_node(*, quiet: bool = True) -> Path:
    """``tests/cluster/build.sh node``: the node's binaries (cached); raises kubecluster.BuildError."""
    return kubecluster.build(target="node", quiet=quiet)


class LocalCluster:
    """A control plane, one real node and a registry on the node's link; see the module docstring."""

    def __init__(
        self,
        plane_bin: Path,
        node_bin: Path,
        *,
        workdir: Path | None = None,
        gvisor: gvisor.Runtime | None = None,
    ) -> None:
        """``gvisor``: runsc (``tests.support.gvisor.Runtime(gvisor.build())``) as the node's runtime
        handler ``runsc`` too. None (the default): runc only."""
        self.gvisor = gvisor
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="openshell-node-"))
        self.workdir.chmod(0o755)  # pods' files (e.g. projected tokens) live below it
        self.plane_bin, self.node_bin = plane_bin, NodeBinaries(node_bin)
        self._stack = contextlib.ExitStack()
        self.network: NodeNetwork | None = None
        self.plane: kubecluster.LocalControlPlane | None = None
        self.registry: Registry | None = None
        self.node: LocalNode | None = None
        self.images = self.workdir / "oci"
        self.startup_seconds = 0.0

    @property
    def kubeconfig(self) -> Path:
        assert self.plane is not None
        return self.plane.kubeconfig

    def start(self) -> LocalCluster:
        missing = self.node_bin.missing()
        if missing:
            raise NodeError(f"node binaries missing from {self.node_bin.dir}: {', '.join(missing)}")
        began = time.monotonic()
        atexit.register(self.cleanup)  # a stray exit still gives back the host's namespaces and settings
        try:
            self.network = network = NodeNetwork.create()
            self._stack.callback(network.delete)
            self.plane = plane = kubecluster.LocalControlPlane(
                self.plane_bin, workdir=self.workdir / "plane", fake_nodes=0, address=network.host_ip
            )
            self._stack.callback(plane.stop)
            plane.start()
            self.registry = self._stack.enter_context(
                running_registry(self.workdir / "registry", address=network.host_ip)
            )
            pause = self.push_files(
                "pause", "3.10", {"pause": self.node_bin.path("pause")}, entrypoint=["/pause"]
            )
            assert plane.certs is not None
            node_dir = self.workdir / "node"
            cert, key = kubecluster.issue_client_cert(
                plane.certs, node_dir / "pki", "kubelet", cn=f"system:node:{NODE_NAME}", orgs=["system:nodes"]
            )
            self.node = node = LocalNode(
                network=network,
                binaries=self.node_bin,
                workdir=node_dir,
                kubelet_kubeconfig=kubecluster.write_kubeconfig(
                    node_dir / "kubelet.kubeconfig", plane.server, plane.certs, client=(cert, key)
                ),
                admin_kubeconfig=plane.kubeconfig,
                ca_cert=plane.certs.ca_cert,
                pause_image=pause,
                registries=[self.registry.host],
                gvisor=self.gvisor,
            )
            self._stack.callback(node.stop)
            node.start()
            self._wait_node_ready()
            node.start_network_policies()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _wait_node_ready(self) -> None:
        assert self.plane is not None and self.node is not None
        deadline = time.monotonic() + READY_TIMEOUT
        last = "not registered"
        while time.monotonic() < deadline:
            self.node.check_alive()
            try:
                node = self.plane.api("GET", f"/api/v1/nodes/{self.node.name}")
                conditions = {c["type"]: c for c in node.get("status", {}).get("conditions", [])}
                ready = conditions.get("Ready", {})
                if ready.get("status") == "True":
                    return
                last = f"Ready={ready.get('status')}: {ready.get('message', '')}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            time.sleep(0.5)
        raise NodeError(
            f"node {self.node.name} not Ready within {READY_TIMEOUT:.0f} s ({last}); kubelet log: "
            f"{self.node.workdir / 'kubelet.log'}\n{kubecluster.log_tail(self.node.workdir / 'kubelet.log')}"
        )

    def push_dir(self, repository: str, tag: str, rootfs: Path, **config: Any) -> str:
        """``rootfs`` as an image in the cluster's registry; returns the reference pods name."""
        assert self.registry is not None
        name = f"{repository.replace('/', '-')}-{tag}"
        source = images.build_from_dir(self.images, name, rootfs, **config)
        return images.push(source, self.registry.host, repository, tag)

    def push_files(self, repository: str, tag: str, files: dict[str, Path], **config: Any) -> str:
        """An image of just ``files`` (path in the image -> file here), e.g. one static binary."""
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            root = Path(tmp) / "rootfs"
            for inside, source in files.items():
                target = root / inside.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
            return self.push_dir(repository, tag, root, **config)

    def stop(self) -> None:
        self._stack.close()
        atexit.unregister(self.cleanup)

    def cleanup(self) -> None:
        self.stop()
        if not self._own_workdir:
            return
        left = mounts_below(self.workdir)
        if left:  # removing the tree would reach through them into what they mount
            print(f"kubenode: {self.workdir} kept: still mounted: {', '.join(left)}", file=sys.stderr)
            return
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def local_cluster(
    *, workdir: Path | None = None, gvisor: gvisor.Runtime | None = None
) -> Iterator[LocalCluster]:
    """Build (cached) and start a LocalCluster; stop it after, and remove its directory unless
    ``workdir`` was given. Raises kubecluster.BuildError when a binary cannot be built and NodeError
    when the node cannot run or start."""
    reason = node_unavailable()
    if reason:
        raise NodeError(reason)
    plane_bin = kubecluster.build()
    node_bin = build_node()
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(plane_bin, node_bin, workdir=workdir, gvisor=gvisor)
    try:
        yield cluster.start()
    finally:
        cluster.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.kubenode", description=__doc__)
    parser.add_argument("command", choices=["up", "build"])
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the cluster's files here (kept on exit); cluster.json in it names the KUBECONFIG and "
        "the registry, for `python -m tests.support.openshelldeploy DIR`",
    )
    parser.add_argument(
        "--gvisor",
        action="store_true",
        help="also register gVisor's runsc as the runtime handler `runsc` (tests/support/gvisor.py)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # before start: a stop mid-start cleans up too
    try:
        if args.command == "build":
            print(build_node(quiet=False))
            return 0
        workdir = args.workdir.resolve() if args.workdir else None
        if workdir is not None and workdir.exists() and any(workdir.iterdir()):
            # A cluster's state from before (etcd, containerd, sockets) would be taken for this one's.
            print(f"error: {workdir} is not empty: remove it or name another --workdir", file=sys.stderr)
            return 2
        with local_cluster(
            workdir=workdir,
            gvisor=gvisor.Runtime(gvisor.build(quiet=False), shim=gvisor.default_shim())
            if args.gvisor
            else None,
        ) as cluster:
            assert cluster.registry is not None and cluster.network is not None
            info = {
                "kubeconfig": str(cluster.kubeconfig),
                "registry": cluster.registry.host,
                "host_ip": cluster.network.host_ip,
                "pod_cidr": cluster.network.pod_cidr,
            }
            info_file = cluster.workdir / "cluster.json"
            info_file.write_text(json.dumps(info, indent=2) + "\n")
            atexit.register(info_file.unlink, missing_ok=True)  # a stopped cluster is no deploy target
            print(f"ready in {cluster.startup_seconds:.1f}s; logs in {cluster.workdir}", file=sys.stderr)
            print(f"registry (plain HTTP): {cluster.registry.host}", file=sys.stderr)
            print(f"export KUBECONFIG={cluster.kubeconfig}", file=sys.stderr)
            print(cluster.kubeconfig, flush=True)
            assert cluster.node is not None
            while True:
                cluster.node.check_alive()
                time.sleep(1)
    except (kubecluster.BuildError, NodeError, kubecluster.ControlPlaneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
