"""Run the gateway's sandbox pod in ``runc``: a small kubelet for one container, for the tests.

:func:`runtime_spec_from_pod` turns the pod that ``gateway.drivers.podspec`` builds into an OCI
runtime spec the way a kubelet and container runtime would for the fields the pod uses: the
container's command and env, the user and groups of its security context, "drop ALL" as empty
capability sets, ``allowPrivilegeEscalation: false`` as no_new_privileges, a read-only root file
system, and every volume mount bound from a host directory the test provides (the image volume's
unpacked image read-only, emptyDirs group-owned by fsGroup and setgid like the kubelet makes them,
the credential Secret as files). The container joins a network namespace the test made.

Not translated: seccomp RuntimeDefault (runc would need the runtime's profile) and resource
limits (these machines' hybrid cgroups); the tests say so where it matters.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.kubelet_expansion import expand, expand_env
from tests.support.procs import wait_for_exit

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MASKED = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
]  # fmt: skip
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def runc_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "runc needs root here (rootless runc needs a user namespace set-up these tests do not make)"
    if shutil.which("runc") is None:
        return "runc is not installed (apt install runc)"
    return None


def _bind(destination: str, source: Path, *, read_only: bool) -> dict[str, Any]:
    options = ["rbind", "nosuid", "nodev", "ro" if read_only else "rw"]
    return {"destination": destination, "type": "bind", "source": str(source), "options": options}


def runtime_spec_from_pod(
    pod: Mapping[str, Any],
    *,
    rootfs: Path,
    volumes: Mapping[str, Path],
    netns: str,
    extra_mounts: Mapping[str, Path] = {},
    container_name: str | None = None,
) -> dict[str, Any]:
    """The OCI runtime spec of one of the pod's containers (init containers included; default: the
    only container); ``volumes`` maps volume name -> host dir."""
    spec = pod["spec"]
    candidates = [*spec.get("initContainers", []), *spec["containers"]]
    if container_name is None:
        (container,) = spec["containers"]
    else:
        (container,) = [c for c in candidates if c["name"] == container_name]
    pod_ctx = spec.get("securityContext", {})
    ctx = {**pod_ctx, **container.get("securityContext", {})}
    if ctx.get("capabilities", {}).get("drop") != ["ALL"]:
        raise ValueError("this little kubelet only runs containers that drop ALL capabilities")
    env = {"PATH": DEFAULT_PATH, "HOSTNAME": pod["metadata"]["name"][:63]}
    # As the kubelet does: $(NAME) and $$ in env values, command and args are its to expand.
    env = expand_env(container.get("env", []), env)
    groups = [pod_ctx["fsGroup"]] if "fsGroup" in pod_ctx else []
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
    ]  # fmt: skip
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]]
        mounts.append(_bind(mount["mountPath"], source, read_only=bool(mount.get("readOnly"))))
    for destination, source in extra_mounts.items():
        mounts.append(_bind(destination, source, read_only=True))
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": ctx["runAsUser"], "gid": ctx.get("runAsGroup", 0), "additionalGids": groups},
            "args": [expand(a, env) for a in (*container["command"], *container.get("args", []))],
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": "/",
            "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
            "noNewPrivileges": ctx.get("allowPrivilegeEscalation") is False,
        },
        "root": {"path": str(rootfs), "readonly": bool(ctx.get("readOnlyRootFilesystem"))},
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": f"/var/run/netns/{netns}"},
            ],
            "maskedPaths": MASKED,
            "readonlyPaths": READONLY,
        },
    }


def empty_dir(path: Path, fs_group: int | None) -> Path:
    """An emptyDir as the kubelet makes it: group fsGroup, group-writable, setgid."""
    path.mkdir(parents=True)
    if fs_group is not None:
        os.chown(path, 0, fs_group)
        path.chmod(0o2775)
    else:
        path.chmod(0o777)
    return path


def secret_dir(path: Path, data: Mapping[str, bytes], *, mode: int, fs_group: int | None) -> Path:
    path.mkdir(parents=True)
    for key, value in data.items():
        (path / key).write_bytes(value)
        if fs_group is not None:
            os.chown(path / key, 0, fs_group)
        (path / key).chmod(mode)
    path.chmod(0o755)
    return path


@dataclass
class RuncContainer:
    """``runc run`` in the foreground of a child process; its stdout and stderr go to ``log``."""

    container_id: str
    bundle: Path
    state_root: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self, spec: Mapping[str, Any]) -> None:
        self.bundle.mkdir(parents=True, exist_ok=True)
        (self.bundle / "config.json").write_text(json.dumps(spec, indent=1))
        self.state_root.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    "runc",
                    "--root",
                    str(self.state_root),
                    "run",
                    "--bundle",
                    str(self.bundle),
                    self.container_id,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float) -> int:
        return wait_for_exit(self.proc, timeout, what="container", log=self.log_text)

    def stop(self) -> None:
        """Kill and delete the container whatever state it is in; leaves no process behind."""
        base = ["runc", "--root", str(self.state_root)]
        subprocess.run([*base, "kill", self.container_id, "KILL"], capture_output=True, timeout=30)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        subprocess.run([*base, "delete", "--force", self.container_id], capture_output=True, timeout=30)
