"""Health of a real supervisor: samples and state changes reach the gateway, /status and /metrics
show them, and (where cgroup v2 with the memory controller is writable) a kernel OOM kill is seen."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_control import _http
from tests.support.procs import PYTHON, REPO, GatewayProcess, SupervisorProcess, free_port, wait_until

SLEEPER = textwrap.dedent(
    """
    import subprocess, sys, time
    kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    print("ready", flush=True)
    time.sleep(30)
    """
)


def test_health_samples_and_changes_reach_the_gateway_and_the_endpoints(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    gateway.start()
    port = free_port()
    sv = SupervisorProcess(
        tmp_path / "hl",
        "hl",
        gateway.address,
        [sys.executable, "-u", "-c", SLEEPER],
        settings=[
            "http.enabled=true",
            f"http.listen=127.0.0.1:{port}",
            "health.interval_s=0.5",
            "health.check_interval_s=0.2",
            f"health.disk_paths=[{tmp_path}]",
            # Any used byte on the journal's file system counts as "degraded": a change to journal.
            "health.disk_degraded_ratio=0.000001",
            "health.disk_unhealthy_ratio=1",
        ],
    )
    supervisors.append(sv)
    sv.start()
    wait_until(lambda: "ready" in gateway.log_lines("hl"), timeout=30, what="the agent is up")

    def samples() -> list[dict[str, object]]:
        return [e for e in gateway.events("hl", "health") if not e["data"]["change"]]

    # The tree is the main process and its child once both are up; later samples show both.
    wait_until(
        lambda: any(s["data"]["processes"] == 2 for s in samples()),  # type: ignore[index]
        timeout=30,
        what="a health sample of the whole tree at the gateway",
    )
    health = gateway.events("hl", "health")
    changes = [e for e in health if e["data"]["change"]]
    assert len(changes) == 1, health
    (change,) = changes
    assert change["data"]["state"] == "degraded"
    assert change["message"].startswith("health degraded: disk ")
    assert str(sv.journal_dir) in change["message"] or str(tmp_path) in change["message"]
    assert change["sequence"] < samples()[0]["sequence"], "the change came first, at once"
    sample = next(s for s in samples() if s["data"]["processes"] == 2)["data"]
    assert sample["state"] == "degraded"  # type: ignore[index]
    assert sample["rss_bytes"] > 0 and sample["threads"] >= 2 and sample["open_files"] >= 3  # type: ignore[index]
    paths = {d["path"] for d in sample["disks"]}  # type: ignore[index]
    assert paths == {str(tmp_path), str(sv.journal_dir)}

    status = _http("GET", f"http://127.0.0.1:{port}/status")[1]
    assert status["health"]["state"] == "degraded"
    assert status["health"]["sample"]["processes"] == 2
    metrics = _http("GET", f"http://127.0.0.1:{port}/metrics")[1]
    assert 'openshell_supervisor_health_state{state="degraded"} 1.0' in metrics
    assert 'openshell_supervisor_health_state{state="healthy"} 0.0' in metrics
    assert "openshell_supervisor_health_processes 2.0" in metrics
    assert f'openshell_supervisor_disk_used_bytes{{path="{tmp_path}"}}' in metrics

    assert sv.proc is not None
    sv.proc.terminate()
    assert sv.wait(timeout=60) in (0, 143, 130, -15), sv.log_text()[-3000:]


# ------------------------------------------------------------------------- OOM kill in a cgroup


def _v2_mount() -> Path | None:
    for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (mount / "cgroup.controllers").exists():
            return mount
    return None


def _own_cgroup(mount: Path) -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            candidate = mount / line[3:].strip().lstrip("/")
            if candidate.is_dir():
                return candidate
    return mount


@pytest.fixture
def oom_cgroup() -> Iterator[tuple[Path, Path]]:
    """(cgroup v2 mount, a fresh child cgroup with memory.max = 192 MiB), or skip saying why not."""
    mount = _v2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified")
    controllers = (mount / "cgroup.controllers").read_text().split()
    if "memory" not in controllers:
        pytest.skip(
            f"cgroup v2 at {mount} has no memory controller (it offers: {' '.join(controllers) or 'none'}; "
            "a hybrid layout keeps memory on cgroup v1)"
        )
    parent = _own_cgroup(mount)
    enabled_here = False
    if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
        try:
            (parent / "cgroup.subtree_control").write_text("+memory")
            enabled_here = True
        except OSError as exc:
            pytest.skip(
                f"cannot enable the memory controller for children of {parent}: {exc.strerror or exc} "
                "(not root, or the cgroup holds processes itself)"
            )
    child = parent / f"openshell-test-oom-{uuid.uuid4().hex[:8]}"
    try:
        child.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup under {parent}: {exc.strerror or exc}")
    try:
        if not (child / "memory.max").exists():
            pytest.skip(f"{child} has no memory.max although memory is enabled for it")
        (child / "memory.max").write_text(str(192 << 20))
        if (child / "memory.swap.max").exists():
            (child / "memory.swap.max").write_text("0")  # the kernel must kill, not swap
        yield mount, child
    finally:
        deadline = time.monotonic() + 20
        while True:
            try:
                child.rmdir()
                break
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                    break
                for pid in (child / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), 9)
                time.sleep(0.1)
        if enabled_here:
            with contextlib.suppress(OSError):
                (parent / "cgroup.subtree_control").write_text("-memory")


#: Grows by 16 MiB (written, so really resident) every 20 ms until the kernel kills it.
HOG = "import time\nblobs = []\nwhile True:\n    blobs.append(b'x' * (16 << 20))\n    time.sleep(0.02)\n"


def test_an_oom_kill_in_the_cgroup_is_reported_unhealthy(
    tmp_path: Path, gateway: GatewayProcess, oom_cgroup: tuple[Path, Path]
) -> None:
    mount, cgroup = oom_cgroup
    gateway.start()
    workdir = tmp_path / "oom"
    workdir.mkdir()
    # The main process is a shell that runs the hog and, once it is killed, waits a moment before
    # passing on its status: the health check (every 0.2 s) sees the kill while the supervisor,
    # which exits right after the main process, still runs.
    main = f'{PYTHON} -c "$HOG"; code=$?; sleep 2; exit $code'
    argv = [
        PYTHON, "-m", "supervisor", "run",
        "--sandbox-id", "oom",
        "--gateway", gateway.address,
        "--journal-dir", str(workdir / "journal"),
        "--log-level", "debug",
        "--set", "capture.echo=false",
        "--set", "health.interval_s=5",
        "--set", "health.check_interval_s=0.2",
        "--set", f"health.cgroup_root={mount}",
        "--", "sh", "-c", main,
    ]  # fmt: skip
    # The supervisor enters the test cgroup before it starts (its children follow it there).
    wrapper = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "wrapper", *argv]
    env = dict(os.environ, HOG=HOG, PYTHONPATH=str(REPO))
    log_path = workdir / "supervisor.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(wrapper, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    try:
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log_text = log_path.read_text(errors="replace")
    assert code == 137, log_text[-3000:]
    events = (cgroup / "memory.events").read_text()
    assert int(dict(line.split() for line in events.splitlines())["oom_kill"]) >= 1, events
    health = gateway.events("oom", "health")
    killed = [e for e in health if e["data"]["change"] and any("OOM kill" in r for r in e["data"]["reasons"])]
    assert killed, (health, log_text[-3000:])
    report = killed[0]
    assert report["data"]["state"] == "unhealthy" and "OOM kill" in report["message"], report
    assert report["data"]["oom_kills"] >= 1 and report["data"]["memory_max"] == 192 << 20
    exits = [e for e in gateway.events("oom", "lifecycle") if e["data"]["kind"] == "exited"]
    assert exits and exits[-1]["data"]["exit_code"] == 137
