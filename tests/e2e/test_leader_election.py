"""One leader for the Kubernetes driver's pod watch (issue 20 point 4), with real parts: two gateway
processes on one real PostgreSQL database, the Kubernetes driver against the real API server the
tests build (``kubeconfig`` fixture), each gateway with only the documented RBAC (the driver's
Role plus :func:`gateway.leader.lease_rules`).

- One holds the ``coordination.k8s.io/v1`` Lease (holderIdentity = its replica id) and alone runs
  the pod watch: driver-state writes carry its term (``leader_term``); the other never leads,
  yet creates and deletes sandboxes (per-request work) through its own API.
- The leader killed with SIGKILL: the other takes the Lease over (leaseTransitions + 1) and what
  changed meanwhile (a sandbox deleted, another created) shows up in driver state: nothing missed.
- The new leader paused with SIGSTOP, the first restarted: it takes over; pods change; the paused
  ex-leader wakes up and writes nothing: the rows keep the newest leader's term and the pods' real
  phases, and it says it stopped leading. What stops it here is its own renew deadline (its
  elector, woken past it, cancels the watch before the watch's first database round trip), not
  the term fence: this part passes with the fence removed.
- SIGTERM releases the Lease (no holder), so the other takes it without waiting for it to expire.

The term fence itself, with real parts: an old term's pod watch (the provisioner's own, in this
process) against the real API server and real PostgreSQL, still running after a newer term was
recorded, receives a pod's deletion and writes nothing (NotLeader ends it). That test fails with
the fence removed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import ApiError, Client
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import Pod

from gateway.config import KubernetesDriverSettings
from gateway.drivers.kubernetes import RBAC_RULES, KubernetesDriver
from gateway.leader import lease_rules
from gateway.provisioner import KubernetesProvisioner
from gateway.store import Database, SandboxStore
from gateway.store.leadership import LeadershipStore, NotLeader
from tests.integration.conftest import database, database_url, pg_server, pg_url
from tests.integration.test_store_postgres import pg, pytestmark
from tests.support import kubeaccess
from tests.support.procs import GatewayProcess, wait_until

# The PostgreSQL fixtures (tests/integration/conftest.py: this directory is outside its reach) and skip.
__all__ = ["database", "database_url", "pg", "pg_server", "pg_url", "pytestmark"]

LEASE = "openshell-gateway-leader"
LEASE_DURATION_S, RENEW_DEADLINE_S, RETRY_PERIOD_S = 4.0, 3.0, 0.5
#: A candidate takes an expired Lease at most one (jittered) retry period after it expired.
LEADING = "leading: this replica holds the leader Lease"
TAKEOVER_S = 3 * (LEASE_DURATION_S + RETRY_PERIOD_S)


@pytest.fixture(scope="module")
def namespace(admin: Client) -> Iterator[str]:
    with kubeaccess.namespace(admin, "os-leader") as name:
        yield name


def _gateway(workdir: Path, *, namespace: str, identity: Path, database_url: str) -> GatewayProcess:
    gw = GatewayProcess(workdir, database_url=database_url)
    config = workdir.parent / f"{workdir.name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "drivers": {
                    "kind": "kubernetes",
                    "kubernetes": {
                        "namespace": namespace,
                        "kubeconfig": str(identity),
                        "gateway_address": gw.address,
                        "request_timeout_s": 5,
                        "supervisor": {"image": "registry.invalid/openshell-supervisor:0.1.0"},
                        "pod": {"default_image": "registry.invalid/agent:1"},
                    },
                },
                "ha": {
                    "leader": {
                        "lease_name": LEASE,
                        "lease_duration_s": LEASE_DURATION_S,
                        "renew_deadline_s": RENEW_DEADLINE_S,
                        "retry_period_s": RETRY_PERIOD_S,
                    }
                },
            }
        )
    )
    gw.extra = ["--config", str(config)]
    return gw


def _replica_id(gw: GatewayProcess) -> str:
    return f"gateway-{gw.grpc_port}"  # GatewayProcess's ha.replica_id


def api(gw: GatewayProcess, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{gw.http_port}/api/v1{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def driver_state(gw: GatewayProcess, sandbox_id: str) -> dict[str, Any]:
    status, doc = api(gw, "GET", f"/sandboxes/{sandbox_id}")
    assert status == 200, doc
    return dict(doc["driver_state"] or {})


def lease(admin: Client, namespace: str) -> tuple[str, int]:
    """The Lease's holder and transitions ("" and -1 before it exists)."""
    try:
        spec = admin.get(Lease, LEASE, namespace=namespace).spec
    except ApiError:
        return "", -1
    assert spec is not None
    return spec.holderIdentity or "", spec.leaseTransitions or 0


def pod_phase(admin: Client, namespace: str, sandbox_id: str) -> str:
    try:
        pod = admin.get(Pod, f"sandbox-{sandbox_id}", namespace=namespace)
    except ApiError as exc:
        assert exc.status.code == 404
        return "Deleted"
    return (pod.status.phase if pod.status else None) or "Unknown"


def recorded(gw: GatewayProcess, admin: Client, namespace: str, sandbox_id: str, term: int) -> bool:
    """Whether the sandbox's driver state is its pod's phase now, written under ``term``."""
    state = driver_state(gw, sandbox_id)
    return state.get("phase") == pod_phase(admin, namespace, sandbox_id) and state.get("leader_term") == term


def create(gw: GatewayProcess, sandbox_id: str) -> None:
    status, doc = api(gw, "POST", "/sandboxes", {"id": sandbox_id, "command": ["sleep", "3600"]})
    assert status in (200, 201), doc


def test_one_leader_watches_pods_and_a_paused_ex_leader_writes_nothing(
    admin: Client, kubeconfig: Path, namespace: str, pg_url: str, tmp_path: Path
) -> None:
    identity = kubeaccess.identity_with_rules(
        admin, kubeconfig, namespace, [*RBAC_RULES, *lease_rules(LEASE)], tmp_path / "kc", name="gateway"
    )
    a = _gateway(tmp_path / "a", namespace=namespace, identity=identity, database_url=pg_url)
    b = _gateway(tmp_path / "b", namespace=namespace, identity=identity, database_url=pg_url)
    by_id = {_replica_id(a): a, _replica_id(b): b}
    try:
        a.start()
        b.start()
        holder, term1 = wait_until(
            lambda: (held := lease(admin, namespace))[0] in by_id and held, timeout=30, what="a leader"
        )
        leader = by_id[holder]
        other = b if leader is a else a
        # Per-request work runs on any replica: the follower creates the pod; the leader records it.
        create(other, "ld-1")
        wait_until(lambda: recorded(other, admin, namespace, "ld-1", term1), timeout=30, what="ld-1 recorded")
        assert LEADING in leader.log_text() and LEADING not in other.log_text(), "one pod watch"

        # The leader dies without a word; pods change before anyone watches again.
        leader.kill()
        # A delete, like a create, is per request: the replica that does not lead makes it.
        status, doc = api(other, "DELETE", "/sandboxes/ld-1")
        assert status == 202 and doc["deleted"] is True, doc
        create(other, "ld-2")
        holder, term2 = wait_until(
            lambda: (held := lease(admin, namespace))[0] == _replica_id(other) and held,
            timeout=TAKEOVER_S,
            what="the survivor holding the Lease",
        )
        assert term2 == term1 + 1, "a takeover is a new term"
        for sandbox_id in ("ld-1", "ld-2"):
            wait_until(
                lambda sid=sandbox_id: recorded(other, admin, namespace, sid, term2),  # type: ignore[misc]
                timeout=30,
                what=f"{sandbox_id} recorded by the new leader",
            )
        assert driver_state(other, "ld-1")["phase"] == "Deleted", "the deletion nobody watched is seen"

        # The new leader paused; the first comes back (a new run under the same id) and takes over.
        paused = other
        leader.start()
        assert paused.proc is not None
        paused.proc.send_signal(signal.SIGSTOP)
        try:
            holder, term3 = wait_until(
                lambda: (held := lease(admin, namespace))[0] == _replica_id(leader) and held,
                timeout=TAKEOVER_S,
                what="the restarted replica holding the Lease",
            )
            assert term3 == term2 + 1
            # Changes the paused one's watch receives into its socket, to record when it wakes.
            admin.delete(Pod, "sandbox-ld-2", namespace=namespace, grace_period=0)
            create(leader, "ld-3")
            for sandbox_id in ("ld-2", "ld-3"):
                wait_until(
                    lambda sid=sandbox_id: recorded(leader, admin, namespace, sid, term3),  # type: ignore[misc]
                    timeout=30,
                    what=f"{sandbox_id} recorded by the third term",
                )
        finally:
            paused.proc.send_signal(signal.SIGCONT)
        wait_until(
            lambda: "stopped leading" in paused.log_text() or "leadership lost" in paused.log_text(),
            timeout=15,
            what="the woken ex-leader saying it stopped leading",
        )
        time.sleep(2 * RETRY_PERIOD_S)  # let whatever it still had to deliver run
        for sandbox_id in ("ld-2", "ld-3"):
            assert recorded(leader, admin, namespace, sandbox_id, term3), driver_state(leader, sandbox_id)
        assert lease(admin, namespace) == (_replica_id(leader), term3), "the woken one did not take it back"

        # A drain (SIGTERM) releases the Lease: the other takes it at its next try, a new term.
        leader.stop()
        assert "leader Lease released" in leader.log_text()
        holder, term4 = wait_until(
            lambda: (held := lease(admin, namespace))[0] == _replica_id(paused) and held,
            timeout=TAKEOVER_S,
            what="the Lease taken after the release",
        )
        assert term4 == term3 + 1
        create(paused, "ld-4")
        wait_until(
            lambda: recorded(paused, admin, namespace, "ld-4", term4), timeout=30, what="ld-4 recorded"
        )
    finally:
        for gw in (a, b):
            if gw.proc is not None:
                gw.proc.send_signal(signal.SIGCONT)
            gw.stop()


async def test_an_old_terms_pod_watch_writes_nothing_once_a_newer_term_is_recorded(
    admin: Client, kubeconfig: Path, namespace: str, pg: Database
) -> None:
    """The term fence with real parts (review finding 1): the SIGSTOP case above never reaches it,
    because the woken ex-leader's elector stops the watch first. Here nothing stops the old
    term's watch but the fence: it lists and watches the real API server, a newer term is recorded
    in the real PostgreSQL database and the newer leader's list is recorded; then a pod is
    deleted. The old watch receives that event, its write raises NotLeader (which ends the watch)
    and the row keeps the newer term's record. With the fence removed it records the deletion
    under the old term and watches on."""
    settings = KubernetesDriverSettings.model_validate(
        {
            "namespace": namespace,
            "kubeconfig": str(kubeconfig),
            "gateway_address": "gw:7070",
            "request_timeout_s": 5,
            "supervisor": {"image": "registry.invalid/openshell-supervisor:0.1.0"},
            "pod": {"default_image": "registry.invalid/agent:1"},
        }
    )
    sandboxes, terms = SandboxStore(pg), LeadershipStore(pg)
    old_leader = KubernetesProvisioner(settings, sandboxes, driver=KubernetesDriver(settings))
    new_leader = KubernetesProvisioner(settings, sandboxes, driver=KubernetesDriver(settings))
    watch: asyncio.Task[None] | None = None
    try:
        await old_leader.create("fence-1", ["sleep", "3600"], image=None, env={})
        old = await terms.claim(f"{namespace}/{LEASE}", holder="gw-old", term=1)
        assert old is not None
        watch = asyncio.create_task(old_leader._follow(old))

        async def term_of_row() -> object:
            row = await sandboxes.get("fence-1")
            return (row.driver_state or {}).get("leader_term") if row is not None else None

        async with asyncio.timeout(30):
            while await term_of_row() != 1:  # the old term's list recorded the pod
                assert not watch.done(), watch
                await asyncio.sleep(0.1)
        new = await terms.claim(f"{namespace}/{LEASE}", holder="gw-new", term=2)
        assert new is not None
        await new_leader._catch_up(new)
        recorded = await sandboxes.get("fence-1")
        assert recorded is not None and recorded.driver_state is not None
        assert recorded.driver_state["leader_term"] == 2
        # A change only the old watch is there to see.
        await asyncio.to_thread(admin.delete, Pod, "sandbox-fence-1", namespace=namespace, grace_period=0)
        done, _ = await asyncio.wait({watch}, timeout=20)
        row = await sandboxes.get("fence-1")
        assert row is not None and row.driver_state == recorded.driver_state, (
            "the old term's watch wrote after a newer term was recorded"
        )
        assert watch in done and isinstance(watch.exception(), NotLeader), "NotLeader ends the old watch"
    finally:
        if watch is not None and not watch.done():
            watch.cancel()
            await asyncio.wait({watch})
        await old_leader.close()
        await new_leader.close()
