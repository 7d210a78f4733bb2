"""The proof on a real node (issue 20 point 7b): the chart with three gateway replicas on PostgreSQL
(the Kubernetes driver, its leader Lease, the RBAC the chart renders, its NetworkPolicies), twenty
sandboxes whose main processes write numbered lines, then a rollout while they write: ``helm
upgrade`` with a changed pod annotation, so the chart's pre-upgrade migration hook runs against the
serving replicas and the Deployment then replaces all three pods one by one (maxSurge 1,
maxUnavailable 0; each old pod refuses new sessions and leaves the Service, then drains: it asks
its sessions to reconnect to another replica at a paced rate, and stops once none is left; a move
that short is no outage, so the supervisors journal no RECONNECTED: the sandbox's owner changing
proves it). All along, commands (a SIGUSR1 the main process counts, a heartbeat interval) are
POSTed through the gateway Service, so most reach a replica that does not hold the session.

The scenario runs once (a module fixture); each invariant is its own test over what it left in the
database and the cluster: every line exactly once and in order, every main process the one that
started (one STARTED record, its PID in every line, its container never restarted), every command
posted meanwhile applied and none after its expiry, every replica's own API showing every sandbox
connected, one replica leading (the Lease's holder, the term recorded in the database, the only
one whose log says it leads), and the migration hook run by the upgrade.

Where: the local cluster with one real node (``tests/support/kubenode.py``) and a PostgreSQL on the
host its pods reach, as ``test_chart_on_node.py`` has them; it skips with the reason where they
cannot be had, and with ``KUBECONFIG`` set (it reads the database directly). Run it under
``flock /tmp/openshell-node.lock`` on a shared machine, with ``-s`` to see what was measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python
import pytest
from lightkube import ApiError, Client
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import Event, Namespace, Pod, Secret

from gateway.drivers import podspec
from tests.support import gatewayimage, kubeaccess, kubecluster, kubenode, openshelldeploy
from tests.support.postgres import PgServer, PostgresUnavailable, running_postgres
from tests.support.procs import REPO

asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install asyncpg)")

pytestmark = pytest.mark.timeout(1500)

CHART = REPO / "helm" / "openshell"
RELEASE = "openshell"
REPLICAS = 3
#: Twenty fit this node: each sandbox pod asks for SANDBOX_REQUESTS (the chart's default, 100m CPU
#: each, would not fit twenty on a two-core node beside the gateways).
SANDBOXES = 20
SANDBOX_REQUESTS = {"cpu": "10m", "memory": "48Mi"}
COMMAND_EVERY_S = 0.5
#: Printed first, as written (single quotes): what the sandbox was asked to print. The variable is
#: in the sandbox's env (ENV).
AS_WRITTEN = "as written: $$ $(GREETING)"
ENV = {"GREETING": "expanded"}
#: The main process: AS_WRITTEN, then ``<pid> <i>`` every 0.2 s; SIGUSR1s counted; SIGTERM ends it
#: with one last line saying how many it received. (The supervisor signals the process group:
#: ``sleep`` dies of them, the shell runs the trap and goes on.) The PID is read from /proc, not
#: ``$$``, which the kubelet turns into ``$`` (see test_the_command_reaches_the_main_process_as_written).
WRITER = (
    f"echo '{AS_WRITTEN}'; read -r pid _ < /proc/self/stat; n=0; i=0; trap 'n=$((n+1))' USR1; "
    "trap 'echo \"done $pid signals $n\"; exit 0' TERM; "
    'while :; do echo "$pid $i"; i=$((i+1)); sleep 0.2; done'
)
#: Waits, not speeds asserted: every session moved and storing lines again, the rollout done.
SETTLE_S = 120.0


@dataclass
class Posted:
    sandbox_id: str
    status: int
    body: dict[str, Any]
    phase: str


@dataclass
class Proof:
    """What the scenario left behind: the database read once every main process had exited, and
    what the cluster said just before they were stopped."""

    sandbox_ids: list[str]
    events: dict[str, list[dict[str, Any]]]
    commands: dict[str, dict[str, Any]]
    posted: list[Posted]
    post_errors: list[str]
    exits: dict[str, Any]
    restarts: dict[str, int]
    owners_before: dict[str, str]
    owners_after: dict[str, str]
    old_pods: set[str]
    new_pods: set[str]
    #: GET /sandboxes on each gateway pod's own API (the pod proxy), after the rollout.
    views: dict[str, dict[str, str]]
    lease: dict[str, Any]
    leadership: dict[str, Any]
    leading: dict[str, bool]
    #: The migration Job runs seen (distinct Jobs that completed), at install and after the upgrade.
    migrations_before: int
    migrations_after: int
    measured: dict[str, Any] = field(default_factory=dict)

    def output(self, sandbox_id: str) -> list[str]:
        """Everything the main process printed."""
        return [
            e["message"] for e in self.events[sandbox_id] if e["kind"] == "log" and e["stream"] == "stdout"
        ]

    def lines(self, sandbox_id: str) -> list[str]:
        """The numbered lines and the summary: the output after its first line (AS_WRITTEN)."""
        return self.output(sandbox_id)[1:]

    def lifecycle(self, sandbox_id: str, kind: str) -> list[dict[str, Any]]:
        return [
            e["data"]
            for e in self.events[sandbox_id]
            if e["kind"] == "lifecycle" and e["data"]["kind"] == kind
        ]


# -- the database, read directly from the host ------------------------------------------------


def _sql(dsn: str, query: str, *args: object) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def _line_counts(dsn: str) -> dict[str, int]:
    rows = _sql(
        dsn, "SELECT sandbox_id, count(*) FROM events WHERE kind = 'log' AND stream = 'stdout' GROUP BY 1"
    )
    return {r[0]: int(r[1]) for r in rows}


def _owners(dsn: str) -> dict[str, str]:
    """Each connected sandbox's owner (a gateway pod's name)."""
    return {r[0]: r[1] for r in _sql(dsn, "SELECT id, owner FROM sandboxes WHERE connected")}


# -- the cluster ---------------------------------------------------------------------------


@dataclass
class Node:
    kubeconfig: Path
    admin: Client
    images: openshelldeploy.Images
    pg: PgServer
    values: dict[str, Any]


@pytest.fixture(scope="module")
def node(bundle: Path, rootfs: Path) -> Iterator[Node]:
    if os.environ.get("KUBECONFIG"):
        pytest.skip("runs on the local node only: it reads the gateway's database from the host")
    reason = kubenode.node_unavailable() or gatewayimage.unavailable()
    if reason:
        pytest.skip(f"no local cluster with a real node: {reason}")
    try:
        plane_bin, node_bin = kubecluster.build(), kubenode.build_node()
    except kubecluster.BuildError as exc:
        pytest.skip(f"no local cluster with a real node: {exc.reason}")
    cluster = kubenode.LocalCluster(plane_bin, node_bin)
    try:
        cluster.start()
        assert cluster.network is not None and cluster.registry is not None
        with running_postgres(listen=cluster.network.host_ip, trust_cidrs=[cluster.network.pod_cidr]) as pg:
            pushed = openshelldeploy.push_images(
                cluster.registry.host, bundle=bundle, sandbox_rootfs=rootfs, tag="test"
            )
            values = openshelldeploy.merged(
                openshelldeploy.chart_values(pushed), openshelldeploy.network_policy_values(cluster, pg.port)
            )
            yield Node(cluster.kubeconfig, kubeaccess.admin_client(cluster.kubeconfig), pushed, pg, values)
    except PostgresUnavailable as exc:
        pytest.skip(f"the gateway's database cannot run here: {exc}")
    finally:
        cluster.cleanup()


def _ready(pod: Pod) -> bool:
    status = pod.status
    if status is None or status.conditions is None or (pod.metadata and pod.metadata.deletionTimestamp):
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions)


def _gateway_pods(admin: Client, namespace: str) -> list[Pod]:
    labels: dict[str, Any] = {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": "gateway"}
    return list(admin.list(Pod, namespace=namespace, labels=labels))


def _names(pods: list[Pod]) -> set[str]:
    return {p.metadata.name for p in pods if p.metadata and p.metadata.name}


def _migrations(admin: Client, namespace: str) -> int:
    """Distinct migration Jobs that completed (their Events outlive the hook's deletion of them)."""
    events = admin.list(Event, namespace=namespace, fields={"involvedObject.kind": "Job"})
    return len(
        {
            e.involvedObject.uid
            for e in events
            if e.reason == "Completed" and (e.involvedObject.name or "").endswith("-migrate")
        }
    )


def _leading(admin: Client, namespace: str, pod: str) -> bool:
    """Whether ``pod``'s own log says it leads now: its last word on leadership."""
    leads = False
    for line in admin.log(pod, namespace=namespace, container="gateway"):
        if "leading: this replica holds the leader Lease" in line:
            leads = True
        elif "stopped leading" in line or "leadership lost" in line:
            leads = False
    return leads


def _pod_logs(admin: Client, namespace: str, lines: int = 30) -> str:
    out = []
    for pod in admin.list(Pod, namespace=namespace):
        if pod.metadata is None or pod.metadata.name is None or pod.spec is None:
            continue
        for container in pod.spec.containers:
            try:
                text = "".join(
                    admin.log(
                        pod.metadata.name, namespace=namespace, container=container.name, tail_lines=lines
                    )
                )
            except Exception as exc:  # a report, best effort
                text = f"(no log: {exc})"
            out.append(f"--- {pod.metadata.name}/{container.name}\n{text}")
    return "\n".join(out)


class CommandPoster:
    """POSTs a command every COMMAND_EVERY_S through the gateway Service (the API server's service
    proxy picks one of its endpoints per request), to each sandbox in turn, alternating a SIGUSR1
    and a heartbeat interval, in a thread owned by the scenario with a client of its own."""

    def __init__(self, kubeconfig: Path, namespace: str, sandbox_ids: list[str]) -> None:
        admin = kubeaccess.admin_client(kubeconfig)
        self._api = f"/api/v1/namespaces/{namespace}/services/{RELEASE}-gateway:7080/proxy/api/v1"
        self._http = admin._client._client
        self._ids = sandbox_ids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="command-poster", daemon=True)
        self.phase = "before"
        self.posted: list[Posted] = []
        self.errors: list[str] = []

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(COMMAND_EVERY_S):
            sandbox_id = self._ids[i % len(self._ids)]
            body: dict[str, Any] = (
                {"kind": "signal", "signal": "SIGUSR1"}
                if i % 2 == 0
                else {"kind": "heartbeat", "interval_ms": 2000}
            )
            i += 1
            try:
                response = self._http.post(
                    f"{self._api}/sandboxes/{sandbox_id}/commands", json=body, timeout=30
                )
            except Exception as exc:  # cut mid-request: whether it was stored is unknown
                self.errors.append(f"{self.phase}: {sandbox_id}: {exc!r}")
                continue
            try:
                answer = response.json()
            except ValueError:
                answer = {"text": response.text[:500]}
            self.posted.append(Posted(sandbox_id, response.status_code, answer, self.phase))

    def __enter__(self) -> CommandPoster:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.fixture(scope="module")
def proof(node: Node) -> Iterator[Proof]:
    admin = node.admin
    namespace = kubeaccess.unique("os-ha")
    sandboxes = f"{namespace}-sb"
    dsn = f"postgresql://{node.pg.user}@127.0.0.1:{node.pg.port}/postgres"
    values = openshelldeploy.merged(
        node.values,
        {
            "database": {"existingSecret": "openshell-db", "existingSecretKey": "url"},
            "gateway": {"replicas": REPLICAS, "logLevel": "info"},
            "sandboxes": {
                "namespace": sandboxes,
                "createNamespace": True,
                "pod": {"resources": {"requests": SANDBOX_REQUESTS, "limits": {"memory": "256Mi"}}},
            },
        },
    )
    helm = helm_python.Config(kubeconfig_path=node.kubeconfig, namespace=namespace)
    call = openshelldeploy.gateway_api(admin, namespace, RELEASE)
    ids = [f"ha-{i:02d}" for i in range(SANDBOXES)]
    measured: dict[str, Any] = {}
    try:
        admin.create(Namespace(metadata=ObjectMeta(name=namespace)))
        admin.create(
            Secret(
                metadata=ObjectMeta(name="openshell-db", namespace=namespace),
                stringData={"url": node.pg.url("postgres")},
            )
        )
        began = time.monotonic()
        try:
            helm.install(str(CHART), RELEASE, values, namespace=namespace, timeout=600)
            openshelldeploy.wait_rolled_out(admin, namespace, RELEASE)
        except (helm_python.HelmError, AssertionError) as exc:
            raise AssertionError(f"install failed: {exc}\n{_pod_logs(admin, namespace)}") from exc
        measured["install to three Ready replicas (s)"] = round(time.monotonic() - began, 1)

        began = time.monotonic()
        for sandbox_id in ids:
            call(
                "POST",
                "/sandboxes",
                {"id": sandbox_id, "command": ["sh", "-c", WRITER], "image": node.images.sandbox, "env": ENV},
            )

        def all_writing(at_least: int, since: dict[str, int], pods: set[str] | None = None) -> bool:
            counts, owners = _line_counts(dsn), _owners(dsn)
            return all(
                counts.get(s, 0) >= since.get(s, 0) + at_least and (pods is None or owners.get(s) in pods)
                for s in ids
            )

        def sandbox_detail() -> Any:
            states = Counter(s["state"] for s in call("GET", "/sandboxes")["sandboxes"])
            pending = [
                p.metadata.name
                for p in admin.list(Pod, namespace=sandboxes)
                if p.metadata and p.status and p.status.phase != "Running"
            ]
            return f"states {dict(states)}, pods not running {pending}"

        kubeaccess.wait_for(
            lambda: all_writing(10, {}), timeout=300, what="every sandbox writing", detail=sandbox_detail
        )
        measured["twenty sandboxes writing (s)"] = round(time.monotonic() - began, 1)
        old_pods = _names([p for p in _gateway_pods(admin, namespace) if _ready(p)])
        owners_before = _owners(dsn)
        measured["sessions per replica before"] = sorted(
            Counter(owners_before.values()).values(), reverse=True
        )
        lease_before = admin.get(Lease, f"{RELEASE}-gateway-leader", namespace=namespace).spec
        migrations_before = _migrations(admin, namespace)

        with CommandPoster(node.kubeconfig, namespace, ids) as poster:
            time.sleep(5)  # some commands while nothing moves
            poster.phase = "rollout"
            before = _line_counts(dsn)
            began = time.monotonic()
            rolled = openshelldeploy.merged(
                values, {"gateway": {"podAnnotations": {"openshell.test/rollout": "1"}}}
            )
            try:
                helm.upgrade(str(CHART), RELEASE, rolled, namespace=namespace, timeout=600)
            except helm_python.HelmError as exc:
                raise AssertionError(f"helm upgrade failed: {exc}\n{_pod_logs(admin, namespace)}") from exc
            measured["helm upgrade, its migration hook included (s)"] = round(time.monotonic() - began, 1)
            during_hook = _line_counts(dsn)
            measured["lines stored while the hook ran"] = sum(during_hook.values()) - sum(before.values())
            openshelldeploy.wait_rolled_out(admin, namespace, RELEASE, timeout=SETTLE_S * 3)
            measured["upgrade to rolled out (s)"] = round(time.monotonic() - began, 1)
            new_pods = _names(_gateway_pods(admin, namespace))
            rolled_out = _line_counts(dsn)
            kubeaccess.wait_for(
                lambda: all_writing(10, rolled_out, new_pods),
                timeout=SETTLE_S,
                what="every sandbox writing through a new replica",
                detail=lambda: (_owners(dsn), _pod_logs(admin, namespace)),
            )
            measured["upgrade to every session on a new replica (s)"] = round(time.monotonic() - began, 1)
            poster.phase = "after"
            time.sleep(5)  # some commands once everything settled
        owners_after = _owners(dsn)
        measured["sessions per replica after"] = sorted(Counter(owners_after.values()).values(), reverse=True)

        # Every command posted meanwhile answered (routing, redelivery at hello or by the round).
        kubeaccess.wait_for(
            lambda: not _sql(dsn, "SELECT id FROM commands WHERE state = 'pending'"),
            timeout=30,
            what="every command answered",
        )
        views = {
            pod: {
                s["id"]: s["state"]
                for s in openshelldeploy.pod_api(admin, namespace, pod)("GET", "/sandboxes")["sandboxes"]
            }
            for pod in sorted(new_pods)
        }
        lease_spec = admin.get(Lease, f"{RELEASE}-gateway-leader", namespace=namespace).spec
        assert lease_spec is not None and lease_before is not None
        lease = {
            "holder": lease_spec.holderIdentity,
            "transitions": lease_spec.leaseTransitions,
            "transitions before": lease_before.leaseTransitions,
            "holder before": lease_before.holderIdentity,
        }
        (row,) = _sql(dsn, "SELECT holder, term FROM leadership")
        leadership = {"holder": row["holder"], "term": int(row["term"])}
        leading = {pod: _leading(admin, namespace, pod) for pod in sorted(new_pods)}
        migrations_after = _migrations(admin, namespace)

        # Every main process ends (SIGTERM through the Service): its last line counts its SIGUSR1s.
        for sandbox_id in ids:
            call("POST", f"/sandboxes/{sandbox_id}/commands", {"kind": "signal", "signal": "SIGTERM"})
        kubeaccess.wait_for(
            lambda: all(
                s["state"] == "exited" for s in call("GET", "/sandboxes")["sandboxes"] if s["id"] in ids
            ),
            timeout=120,
            what="every main process to exit",
            detail=sandbox_detail,
        )
        exits = {s["id"]: s.get("exit_code") for s in call("GET", "/sandboxes")["sandboxes"]}
        restarts = {}
        for sandbox_id in ids:
            pod = admin.get(Pod, podspec.pod_name(sandbox_id), namespace=sandboxes)
            assert pod.status is not None and pod.status.containerStatuses
            restarts[sandbox_id] = sum(c.restartCount for c in pod.status.containerStatuses)

        events: dict[str, list[dict[str, Any]]] = {s: [] for s in ids}
        query = (
            "SELECT sandbox_id, journal_epoch, sequence, kind, stream, message, data FROM events "
            "WHERE sandbox_id = ANY($1) ORDER BY id"
        )
        for r in _sql(dsn, query, ids):
            events[r[0]].append(
                {"epoch": r[1], "sequence": r[2], "kind": r[3], "stream": r[4], "message": r[5],
                 "data": json.loads(r[6]) if r[6] else None}
            )  # fmt: skip
        commands = {
            r["id"]: dict(r)
            for r in _sql(
                dsn,
                "SELECT id, sandbox_id, kind, args, state, created_at, answered_at, expires_at, delivered_by "
                "FROM commands WHERE sandbox_id = ANY($1)",
                ids,
            )
        }
        result = Proof(
            sandbox_ids=ids,
            events=events,
            commands=commands,
            posted=poster.posted,
            post_errors=poster.errors,
            exits=exits,
            restarts=restarts,
            owners_before=owners_before,
            owners_after=owners_after,
            old_pods=old_pods,
            new_pods=new_pods,
            views=views,
            lease=lease,
            leadership=leadership,
            leading=leading,
            migrations_before=migrations_before,
            migrations_after=migrations_after,
            measured=measured,
        )
        _measure(result)
        print(
            "\nHA proof on the node, measured:", json.dumps(measured, indent=1, default=str), file=sys.stderr
        )
        yield result
    finally:
        with contextlib.suppress(Exception):
            helm.uninstall(RELEASE, timeout=300, ignore_not_found=True)
        for name in (namespace, sandboxes):
            with contextlib.suppress(ApiError):
                admin.delete(Namespace, name)


def _measure(proof: Proof) -> None:
    m = proof.measured
    m["lines stored"] = sum(len(proof.lines(s)) for s in proof.sandbox_ids)
    outages = sorted(d["duration_ms"] for s in proof.sandbox_ids for d in proof.lifecycle(s, "reconnected"))
    m["reconnections"] = len(outages)
    if outages:
        m["outage ms (min/median/max)"] = (outages[0], outages[len(outages) // 2], outages[-1])
    m["commands posted meanwhile"] = len(proof.posted)
    m["posts failed"] = len(proof.post_errors)
    m["commands by state"] = dict(Counter(c["state"] for c in proof.commands.values()))
    m["delivered: true at the POST"] = sum(1 for p in proof.posted if p.body.get("delivered"))
    m["leader Lease transitions during the rollout"] = (proof.lease["transitions"] or 0) - (
        proof.lease["transitions before"] or 0
    )


# -- the invariants ---------------------------------------------------------------------------


def test_the_rollout_replaced_every_replica_and_moved_every_session(proof: Proof) -> None:
    assert len(proof.old_pods) == REPLICAS and len(proof.new_pods) == REPLICAS, proof.measured
    assert not proof.old_pods & proof.new_pods, "every gateway pod was replaced"
    assert len(set(proof.owners_before.values())) >= 2, (
        f"the Service spread the sessions: {proof.owners_before}"
    )
    assert set(proof.owners_after.values()) <= proof.new_pods, proof.owners_after
    # A drained session moves on a reconnect hint and its supervisor journals no RECONNECTED for a
    # move that short, so the move is proven by the owner: an old pod before, a new one after.
    # ("reconnections" in the measurements counts the real outages, ~0 through a drain.)
    for sandbox_id in proof.sandbox_ids:
        before, after = proof.owners_before.get(sandbox_id), proof.owners_after.get(sandbox_id)
        assert before in proof.old_pods and after in proof.new_pods, (
            f"{sandbox_id} moved with its replica: owner {before} before, {after} after"
        )


def test_every_line_arrives_exactly_once_and_in_order(proof: Proof) -> None:
    for sandbox_id in proof.sandbox_ids:
        assert proof.exits.get(sandbox_id) == 0, (sandbox_id, proof.exits.get(sandbox_id))
        lines = proof.lines(sandbox_id)
        assert len(lines) > 1, sandbox_id
        last = lines[-1].split()
        assert last[0] == "done", f"{sandbox_id}: the last line is the main process's summary: {lines[-1]}"
        pid = last[1]
        assert lines[:-1] == [f"{pid} {i}" for i in range(len(lines) - 1)], (
            f"{sandbox_id}: every numbered line once, in order, nothing after the summary"
        )
        sequences = [e["sequence"] for e in proof.events[sandbox_id]]
        assert sequences == sorted(set(sequences)), (
            f"{sandbox_id}: every record stored once, in journal order"
        )
        assert len({e["epoch"] for e in proof.events[sandbox_id]}) == 1, (
            f"{sandbox_id}: one journal throughout"
        )


def test_every_main_process_keeps_its_pid(proof: Proof) -> None:
    for sandbox_id in proof.sandbox_ids:
        starts, exits = proof.lifecycle(sandbox_id, "started"), proof.lifecycle(sandbox_id, "exited")
        assert len(starts) == 1 and len(exits) == 1, (
            f"{sandbox_id}: one STARTED, one EXITED: {starts} {exits}"
        )
        started, exited = starts[0], exits[0]
        assert len(proof.lifecycle(sandbox_id, "supervisor_started")) == 1, "the supervisor never restarted"
        assert proof.restarts[sandbox_id] == 0, f"{sandbox_id}: its container never restarted"
        pids = {
            line.split()[1] if line.startswith("done") else line.split()[0]
            for line in proof.lines(sandbox_id)
        }
        assert pids == {str(started["pid"])}, f"{sandbox_id}: every line from the process that started"
        assert exited["pid"] == started["pid"] and exited["exit_code"] == 0


def test_every_command_posted_through_the_service_is_applied(proof: Proof) -> None:
    """Every POST through the Service during the rollout answered 201 and stored; every command
    ends applied (routed to the owning replica, or redelivered at the next hello), none after its
    expiry; the main process saw the signals (at most one per applied SIGUSR1: the kernel merges
    signals sent together)."""
    rollout = [p for p in proof.posted if p.phase == "rollout"]
    assert rollout, "commands were posted during the rollout"
    assert not proof.post_errors, proof.post_errors
    for p in proof.posted:
        assert p.status == 201, f"a POST through the Service was refused: {p}"
        assert p.body["id"] in proof.commands, f"a command acknowledged at its POST is stored: {p}"
    not_applied = {i: c["state"] for i, c in proof.commands.items() if c["state"] != "applied"}
    assert not not_applied, f"{len(not_applied)} of {len(proof.commands)} not applied: {not_applied}"
    late = [i for i, c in proof.commands.items() if c["answered_at"] > c["expires_at"]]
    assert not late, f"applied after their expiry: {late}"
    for sandbox_id in proof.sandbox_ids:
        signals = sum(
            1
            for c in proof.commands.values()
            if c["sandbox_id"] == sandbox_id
            and c["kind"] == "signal"
            and json.loads(c["args"]).get("signal") == 10
        )
        received = int(proof.lines(sandbox_id)[-1].split()[-1])
        assert received <= signals and (received > 0) == (signals > 0), (sandbox_id, received, signals)


def test_every_replica_shows_every_sandbox_connected(proof: Proof) -> None:
    assert set(proof.views) == proof.new_pods
    for pod, states in proof.views.items():
        assert all(states.get(i) == "connected" for i in proof.sandbox_ids), (pod, states)


def test_exactly_one_replica_leads(proof: Proof) -> None:
    """The Lease names one live replica, the database's term is that holder's, and that replica
    alone says it leads."""
    holder = proof.lease["holder"]
    assert holder in proof.new_pods, proof.lease
    assert proof.leadership["holder"] == holder, (proof.leadership, proof.lease)
    assert proof.leadership["term"] >= (proof.lease["transitions"] or 0), (proof.leadership, proof.lease)
    assert [pod for pod, leads in proof.leading.items() if leads] == [holder], proof.leading


def test_the_upgrade_ran_the_migration_hook(proof: Proof) -> None:
    assert proof.migrations_before >= 1, "the install ran it"
    assert proof.migrations_after == proof.migrations_before + 1, (
        proof.migrations_before,
        proof.migrations_after,
    )
    assert proof.measured["lines stored while the hook ran"] > 0, "the sandboxes wrote while it ran"


def test_the_command_reaches_the_main_process_as_written(proof: Proof) -> None:
    """The same command runs the same on every driver: ``$$`` and ``$(NAME)`` in it are the
    shell's, not Kubernetes' variable references."""
    firsts = Counter(proof.output(s)[0] for s in proof.sandbox_ids)
    assert firsts == {AS_WRITTEN: len(proof.sandbox_ids)}, firsts
