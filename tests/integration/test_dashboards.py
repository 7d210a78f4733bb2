"""The chart's Grafana dashboards and alert rules, evaluated by a real Prometheus on real data.

The scene (one module-scoped run, about 40 seconds): two gateway replicas on one real PostgreSQL
server, behind Debian's haproxy standing in for their Service; four real ``python -m supervisor
run`` processes dialing haproxy, with their /metrics listeners on (the sandbox dashboard's source);
a real Prometheus (Debian's package) scraping every gateway and supervisor each second, with the
chart's PrometheusRule loaded as its rule file. The static labels of its scrape configs stand in
for what the chart's ServiceMonitor (and a PodMonitor) add: ``job`` the gateway Service's name,
``namespace``, ``pod``.

What happens meanwhile, so that every panel has something to draw: one sandbox's main process
writes lines fast, exits 3 every few seconds and is restarted by its supervisor (lifecycle records,
restarts, an exit code); another's supervisor finds its disk "nearly full" (a 0.1 % bound: a
health change to degraded); every supervisor journals health records twice a second; replica A
admits at most 3 sessions (``admission.max_sessions``). Where the tests' Kubernetes API server runs
(the session's ``kubeconfig`` fixture), the replicas run the Kubernetes driver with its leader
election, so one of them leads. After a steady stretch, the database server ends every gateway
connection (a blip: database errors counted). Then replica B gets SIGTERM: it drains (its sessions
are hinted away and reconnect through haproxy to A, which refuses the fourth: admission's and
SessionRejected's counters, while B's target is down: the replicas-down alert goes pending). B is
started again, and A's rebalancer moves its excess to B (rebalance hints, reconnections, the
backlog at the hello).

Then every target of every panel of every dashboard under helm/openshell/dashboards/ is asked of
Prometheus's HTTP API as Grafana asks it (``/api/v1/query_range`` over the scene, its template
variables resolved by their own ``label_values`` queries, ``$__rate_interval`` as
``RATE_INTERVAL``), and must answer at least one series with a number in it, except the few in
``NEEDS_MORE``, which say why. Every series an alert rule reads must exist (Prometheus evaluated the
rules all along without an error), and the alerts that must not fire on a healthy fleet stay
inactive. The answers are saved and drawn (chaos/dashboards.py) into PNGs: into the test's temporary
directory, or into ``$OPENSHELL_DASHBOARD_PICTURES`` (docs/dashboards, to update the docs' pictures).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from gateway.drivers.kubernetes import RBAC_RULES
from gateway.leader import lease_rules
from tests.integration.test_prometheus import _find_or_install
from tests.support import kubeaccess
from tests.support.haproxy import Backend, running_haproxy
from tests.support.postgres import PgServer, pg_bindir
from tests.support.procs import REPO, GatewayProcess, SupervisorProcess, free_port, wait_until, writer_command

pytestmark = pytest.mark.skipif(
    pg_bindir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl, postgres) not found"
)

DASHBOARDS = REPO / "helm" / "openshell" / "dashboards"
RELEASE, NAMESPACE, SANDBOX_NAMESPACE = "openshell", "openshell", "openshell-sandboxes"
#: What Grafana's $__rate_interval is for a 1 s scrape (4 intervals), with room for a late scrape.
RATE_INTERVAL = "10s"
#: The sandbox the sandbox dashboard is drawn for: the one whose main process exits and restarts.
BUSY = "busy"
#: A sandbox whose supervisor finds it degraded (a health change, by the fleet's counters).
DEGRADED = "low-disk"
SANDBOXES = (BUSY, DEGRADED, "quiet-1", "quiet-2")
#: The others' main process: a line every half second.
TICK = "import time\nwhile True: print('tick', flush=True); time.sleep(0.5)"
#: Targets that cannot answer here, and why (the test fails if one of them answers: then it belongs
#: with the others). Keyed by (dashboard uid, panel title, refId).
NEEDS_MORE: Mapping[tuple[str, str, str], str] = {
    ("openshell-gateway-ha", "Database errors", "B"): (
        "a cut connection is replaced and the statement retried: a gRPC call is answered UNAVAILABLE "
        "only while the database stays away (tests/integration/test_db_faults.py)"
    ),
}
#: Without the tests' Kubernetes API server (the ``kubeconfig`` fixture skips), no election runs.
WITHOUT_KUBERNETES: Mapping[tuple[str, str, str], str] = {
    ("openshell-gateway-ha", "Leader", "A"): (
        "the leader gauge exists only with the Kubernetes driver's election (a Lease on an API server)"
    ),
}
LEASE = "openshell-gateway-leader"
#: Alerts a healthy fleet must not fire, pending included, over the whole scene.
QUIET_ALERTS = (
    "OpenShellGatewayDown",
    "OpenShellGatewaySlowEventStore",
    "OpenShellNoSupervisorSessions",
    "OpenShellSupervisorRecordsLost",
)
#: A steady stretch before the drain, so that the pictures show the rates settled.
STEADY_S = 6


def load_dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))]


def rendered_rule() -> dict[str, Any]:
    """The PrometheusRule the chart renders for release ``openshell`` in namespace ``openshell``."""
    rendered = helm_python.Chart.load(str(REPO / "helm" / "openshell")).render(
        {"monitoring": {"prometheusRule": {"enabled": True}}}, name=RELEASE, namespace=NAMESPACE
    )
    docs = [
        d
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for d in yaml.safe_load_all(text)
        if isinstance(d, dict)
    ]
    (rule,) = [d for d in docs if d.get("kind") == "PrometheusRule"]
    return rule


def alert_rules(rule: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]


# -- the dashboards' model, checked without Prometheus --------------------------------------------


def test_every_dashboard_is_grafana_json_with_targets_on_the_datasource_variable() -> None:
    dashboards = load_dashboards()
    uids = {d["uid"] for d in dashboards}
    assert uids == {"openshell-gateway", "openshell-gateway-ha", "openshell-sandbox"}
    for dashboard in dashboards:
        uid = dashboard["uid"]
        assert dashboard["schemaVersion"] >= 39, uid
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert "namespace" in variables, uid
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{uid}: panel ids repeat"
        for panel in dashboard["panels"]:
            where = f"{uid} panel {panel['id']} ({panel['title']})"
            assert panel["type"] in ("stat", "timeseries"), where
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["targets"], f"{where} has no targets"
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), where
            for target in panel["targets"]:
                assert target["expr"].strip(), where
                assert target.get("datasource", panel["datasource"]) == panel["datasource"], where
                # Every gateway query is scoped to the chosen namespace's gateways.
                if "openshell_gateway_" in target["expr"] or "up{" in target["expr"]:
                    assert 'namespace="$namespace"' in target["expr"], where
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, where
        for name, variable in variables.items():
            if variable["type"] == "query":
                assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name


def test_the_chart_renders_one_configmap_per_dashboard_under_its_whole_name() -> None:
    """``openshell-gateway`` and ``openshell-gateway-ha`` once made one name (the file name was cut
    to 12 characters): two ConfigMaps of one name, and Kubernetes keeps only the last."""
    rendered = helm_python.Chart.load(str(REPO / "helm" / "openshell")).render(
        {"monitoring": {"grafanaDashboards": {"enabled": True}}}, name=RELEASE, namespace=NAMESPACE
    )
    maps = [
        d
        for path, text in rendered.items()
        if path.endswith("dashboards.yaml")
        for d in yaml.safe_load_all(text)
        if isinstance(d, dict)
    ]
    names = [m["metadata"]["name"] for m in maps]
    assert len(names) == len(set(names)) == len(load_dashboards()), names
    for config_map in maps:
        ((key, text),) = config_map["data"].items()
        assert config_map["metadata"]["name"].endswith(key.removesuffix(".json"))
        assert json.loads(text) == json.loads((DASHBOARDS / key).read_text())


# -- the scene --------------------------------------------------------------------------------------


@dataclass
class PrometheusServer:
    """Prometheus scraping the given jobs every second, the chart's rules loaded."""

    binary: str
    workdir: Path
    jobs: Mapping[str, list[tuple[str, dict[str, str]]]]
    rules: Mapping[str, Any]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "rules.yml").write_text(yaml.safe_dump(self.rules))
        config = {
            # scrape_timeout must not exceed the interval; rules evaluated as often as scraped.
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(self.workdir / "rules.yml")],
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [{"targets": [target], "labels": labels} for target, labels in targets],
                }
                for job, targets in self.jobs.items()
            ],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        with (self.workdir / "prometheus.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_until(self._ready, timeout=30, what="prometheus ready")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log_text()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def log_text(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)

    def api(self, path: str, **params: str | list[str]) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, promql: str) -> float | None:
        """The instant value of a query of one series (None: no series)."""
        result = self.api("query", query=promql)["result"]
        return float(result[0]["value"][1]) if result else None


@dataclass
class Scene:
    prometheus: PrometheusServer
    start: float
    #: Every supervisor connected, every target scraped (before it, no gateway has been scraped
    #: yet, and absent(up == 1) is true for a moment).
    steady: float
    end: float
    gateway_job: str
    #: The replicas ran the Kubernetes driver's leader election.
    elected: bool

    def query_range(self, promql: str, *, start: float | None = None) -> list[dict[str, Any]]:
        since = self.start if start is None else start
        result: list[dict[str, Any]] = self.prometheus.api(
            "query_range", query=promql, start=f"{since:.3f}", end=f"{self.end:.3f}", step="1"
        )["result"]
        return result

    def label_values(self, query: str) -> list[str]:
        """Grafana's ``label_values(selector, label)`` variable query, through the series API."""
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
        assert match is not None, f"not a label_values query: {query}"
        selector, label = match.groups()
        series = self.prometheus.api(
            "series", **{"match[]": selector, "start": f"{self.start:.3f}", "end": f"{self.end:.3f}"}
        )
        return sorted({s[label] for s in series if label in s})


def _supervisor(root: Path, sandbox_id: str, address: str, port: int) -> SupervisorProcess:
    if sandbox_id == BUSY:
        # Lines fast, then exit 3: restarted by the on-failure policy every few seconds.
        command = writer_command(30, prefix="busy", delay=0.1, exit_code=3)
        settings = [
            "process.restart=on-failure",
            "process.restart_limit=1000",
            "process.restart_backoff_initial_s=0.2",
            "process.restart_backoff_max_s=0.5",
        ]
    elif sandbox_id == DEGRADED:
        # Degraded from its first check: its disk (the journal's) "nearly full" at a 0.1 % bound.
        command, settings = [sys.executable, "-u", "-c", TICK], ["health.disk_degraded_ratio=0.001"]
    else:
        command = [sys.executable, "-u", "-c", TICK]
        settings = []
    return SupervisorProcess(
        root / sandbox_id,
        sandbox_id,
        address,
        command,
        settings=[
            "http.enabled=true",
            f"http.listen=127.0.0.1:{port}",
            "health.check_interval_s=0.5",
            "health.interval_s=1",
            *settings,
        ],
    )


@dataclass(frozen=True)
class Election:
    """The Kubernetes driver against the tests' API server, and its leader election (a Lease)."""

    namespace: str
    identity: Path


def _replica(
    root: Path, name: str, database_url: str, *extra: str, election: Election | None
) -> GatewayProcess:
    gw = GatewayProcess(
        root / name,
        database_url=database_url,
        extra=[
            "--set", f"ha.replica_id=gw-{name}",
            "--set", "ha.lease_s=3",
            "--set", "ha.renew_interval_s=0.5",
            "--set", "rebalance.interval_s=1",
            "--log-level", "info",
            *extra,
        ],
    )  # fmt: skip
    if election is not None:
        # As tests/e2e/test_leader_election.py runs its replicas: the pod watch is the leader's.
        config = root / f"{name}.yaml"
        kubernetes = {
            "namespace": election.namespace,
            "kubeconfig": str(election.identity),
            "gateway_address": gw.address,
            "request_timeout_s": 5,
            "supervisor": {"image": "registry.invalid/openshell-supervisor:0.1.0"},
            "pod": {"default_image": "registry.invalid/agent:1"},
        }
        leader = {
            "lease_name": LEASE,
            "lease_duration_s": 4.0,
            "renew_deadline_s": 3.0,
            "retry_period_s": 0.5,
        }
        config.write_text(
            yaml.safe_dump(
                {"drivers": {"kind": "kubernetes", "kubernetes": kubernetes}, "ha": {"leader": leader}}
            )
        )
        gw.extra = [*gw.extra, "--config", str(config)]
    return gw


@contextlib.contextmanager
def _election(request: pytest.FixtureRequest, root: Path) -> Iterator[Election | None]:
    """The tests' Kubernetes API server (the session's ``kubeconfig``), with a namespace and the
    gateway's documented RBAC; None where there is none (the test then says the leader panel has
    nothing to show)."""
    try:
        kubeconfig: Path = request.getfixturevalue("kubeconfig")
    except pytest.skip.Exception:
        yield None
        return
    admin = kubeaccess.admin_client(kubeconfig)
    with kubeaccess.namespace(admin, "os-dashboards") as namespace:
        rules = [*RBAC_RULES, *lease_rules(LEASE)]
        identity = kubeaccess.identity_with_rules(
            admin, kubeconfig, namespace, rules, root / "kc", name="gateway"
        )
        yield Election(namespace, identity)


def _cut_connections(server: PgServer) -> None:
    """Every gateway connection to the database ended by the server (as a failover or a restart
    ends them): the statements in flight on them fail."""
    asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install asyncpg)")

    async def cut() -> None:
        conn = await asyncpg.connect(
            host=server.host, port=server.port, user=server.user, database="postgres"
        )
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND datname = 'postgres'"
            )
        finally:
            await conn.close()

    asyncio.run(cut())


def _until(prom: PrometheusServer, promql: str, what: str, *, timeout: float = 45) -> None:
    wait_until(lambda: (prom.value(promql) or 0) > 0, timeout=timeout, what=f"{what} ({promql})")


@pytest.fixture(scope="module")
def scene(
    pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Scene]:
    binary = _find_or_install("prometheus")
    root = tmp_path_factory.mktemp("dashboards")
    with _election(request, root) as election:
        yield from _scene(binary, root, pg_server, election)


def _scene(binary: str, root: Path, pg_server: PgServer, election: Election | None) -> Iterator[Scene]:
    url = pg_server.url("postgres")  # the module's own server: its default database is ours alone
    a = _replica(root, "a", url, "--set", "admission.max_sessions=3", election=election)
    # B stays a while in its drain (settle) before it hints, and hints one session a second, the
    # supervisors coming back within 2 s: scraped draining, and again while it hints.
    drain = (
        "drain.settle_s=2",
        "drain.max_hints_per_s=1",
        "drain.min_hints_per_s=1",
        "drain.hint_spread_s=2",
    )
    b = _replica(root, "b", url, *[f for item in drain for f in ("--set", item)], election=election)
    rule = rendered_rule()
    job = re.search(r'job="([^"]+)"', alert_rules(rule)[0]["expr"])
    assert job is not None
    ports = {sandbox_id: free_port() for sandbox_id in SANDBOXES}
    prom = PrometheusServer(
        binary,
        root / "prometheus",
        jobs={
            job.group(1): [
                (f"127.0.0.1:{gw.ops_port}", {"namespace": NAMESPACE, "pod": f"openshell-gateway-{name}"})
                for name, gw in (("a", a), ("b", b))
            ],
            "openshell-supervisor": [
                (f"127.0.0.1:{port}", {"namespace": SANDBOX_NAMESPACE, "pod": sandbox_id})
                for sandbox_id, port in ports.items()
            ],
        },
        rules=rule["spec"],
    )
    supervisors: list[SupervisorProcess] = []
    try:
        a.start()  # migrates the database; B finds the schema in place
        b.start()
        backends = [Backend(n, gw.grpc_port, gw.http_port, gw.ops_port) for n, gw in (("a", a), ("b", b))]
        with running_haproxy(root / "haproxy", backends) as proxy:
            prom.start()
            start = time.time()
            for sandbox_id, port in ports.items():
                supervisors.append(_supervisor(root, sandbox_id, proxy.grpc_address, port))
                supervisors[-1].start()
            _until(prom, "sum(openshell_gateway_sessions) == 4", "every supervisor connected")
            if election is not None:
                _until(prom, "max(openshell_gateway_leader)", "a replica leading")
            steady = time.time()
            time.sleep(STEADY_S)
            # A database blip: the connections cut (once a second, until a statement in flight
            # on one of them failed: an idle one is replaced by the pool's ping, not counted).
            deadline = time.monotonic() + 20
            while not prom.value("sum(openshell_gateway_db_errors_total)"):
                assert time.monotonic() < deadline, "no database error counted with the connections cut"
                _cut_connections(pg_server)
                time.sleep(1)
            _until(prom, "openshell_supervisor_main_process_restarts_total{pod='busy'}", "a restart")
            _until(prom, "sum(openshell_gateway_supervisor_health_changes_total)", "a health change")
            # B drains: its sessions go to A, which takes 3 and refuses the fourth.
            b.signal(signal.SIGTERM)
            _until(prom, "sum(openshell_gateway_draining)", "B draining")
            assert b.proc is not None
            b.proc.wait(60)
            _until(prom, "sum(openshell_gateway_admission_refusals_total)", "A refusing over max_sessions")
            _until(prom, 'ALERTS{alertname="OpenShellGatewayReplicasDown"}', "replicas-down pending")
            b.start()
            _until(prom, 'sum(openshell_gateway_reconnect_hints_total{reason="rebalance"})', "a move")
            _until(prom, "sum(openshell_gateway_sessions) == 4", "every supervisor connected again")
            time.sleep(5)  # the last moves' rates in a few more samples
            end = time.time()
            yield Scene(prom, start, steady, end, job.group(1), elected=election is not None)
    except BaseException:
        print(prom.log_text()[-3000:], a.log_text()[-3000:], b.log_text()[-3000:], sep="\n---\n")
        raise
    finally:
        prom.stop()
        for sv in supervisors:
            sv.stop()
        b.stop()
        a.stop()


# -- every query answers ----------------------------------------------------------------------------


def _variables(scene: Scene, dashboard: Mapping[str, Any]) -> dict[str, str]:
    """The dashboard's template variables as Grafana would fill them in for this scene: each query
    variable by its own query (which must answer), the namespace and sandbox the scene's."""
    chosen = {"namespace": None, "sandbox": BUSY}
    values: dict[str, str] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        for name, value in values.items():
            query = query.replace(f"${name}", value)
        found = scene.label_values(query)
        assert found, f"{dashboard['uid']}: variable {variable['name']} ({query}) has no values"
        name = variable["name"]
        if name == "namespace":
            expected = SANDBOX_NAMESPACE if dashboard["uid"] == "openshell-sandbox" else NAMESPACE
            assert found == [expected], (name, found)
            values[name] = expected
        elif chosen.get(name) is not None:
            assert chosen[name] in found, (name, found)
            values[name] = str(chosen[name])
        else:
            # A multi-value variable at "All": Grafana writes the regex of every value.
            values[name] = "(" + "|".join(re.escape(v) for v in found) + ")" if len(found) > 1 else found[0]
    return values


def _substituted(expr: str, values: Mapping[str, str]) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    # Longest names first: $sandbox must not eat a prefix of another name.
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
    assert "$" not in expr, f"a variable is left in {expr}"
    return expr


def _has_a_number(series: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(v)) for s in series for _, v in s["values"])


@dataclass(frozen=True)
class Answers:
    """What Prometheus answered to every target, as ``chaos.dashboards`` takes it, and the targets
    that answered no number (their substituted query)."""

    by_dashboard: dict[str, dict[int, list[list[dict[str, Any]]]]]
    empty: dict[tuple[str, str, str], str]
    elected: bool


@pytest.fixture(scope="module")
def answers(scene: Scene) -> Answers:
    by_dashboard: dict[str, dict[int, list[list[dict[str, Any]]]]] = {}
    empty: dict[tuple[str, str, str], str] = {}
    for dashboard in load_dashboards():
        values = _variables(scene, dashboard)
        panels = by_dashboard.setdefault(dashboard["uid"], {})
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                promql = _substituted(target["expr"], values)
                result = scene.query_range(promql)
                panels.setdefault(panel["id"], []).append(result)
                if not _has_a_number(result):
                    empty[(dashboard["uid"], panel["title"], target["refId"])] = promql
    return Answers(by_dashboard, empty, scene.elected)


def test_every_dashboard_query_returns_data(answers: Answers) -> None:
    needs_more = {**NEEDS_MORE, **({} if answers.elected else WITHOUT_KUBERNETES)}
    unexpected = {key: q for key, q in answers.empty.items() if key not in needs_more}
    assert not unexpected, f"queries without data: {json.dumps([*map(list, unexpected.items())], indent=1)}"
    answered = set(needs_more) - set(answers.empty)
    assert not answered, f"these answer now, take them out of NEEDS_MORE: {answered}"


def test_pictures_of_the_dashboards(answers: Answers, tmp_path: Path) -> None:
    """What ``python -m chaos.dashboards`` draws from the saved answers: one PNG per dashboard, in
    ``$OPENSHELL_DASHBOARD_PICTURES`` when set (docs/dashboards), else in the test's directory."""
    saved = tmp_path / "answers.json"
    saved.write_text(json.dumps({"dashboards": load_dashboards(), "answers": answers.by_dashboard}))
    pytest.importorskip("matplotlib", reason="matplotlib draws the pictures (pip install -e '.[chaos]')")
    from chaos.dashboards import render_saved

    out = Path(os.environ.get("OPENSHELL_DASHBOARD_PICTURES") or tmp_path)
    written = render_saved(json.loads(saved.read_text()), out)
    assert sorted(p.name for p in written) == sorted(f"{d['uid']}.png" for d in load_dashboards())
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        assert path.stat().st_size > 20_000, f"{path}: too small for a picture of panels with data"


# -- the alert rules ------------------------------------------------------------------------------

_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")


def test_every_alert_reads_series_that_exist_and_a_healthy_fleet_fires_none(scene: Scene) -> None:
    rules = scene.prometheus.api("rules")["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"] if r["type"] == "alerting"}
    expected = alert_rules(rendered_rule())
    assert set(loaded) == {r["alert"] for r in expected}
    for name, rule in loaded.items():
        # Prometheus evaluated each rule every second of the scene without an error.
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule.get("lastError"))
    for rule in expected:
        selectors = {f"{m.group(1)}{{{m.group(2)}}}" for m in _SELECTOR.finditer(rule["expr"])}
        assert selectors, rule["alert"]
        for selector in selectors:
            # What the comparison reads: present, so the alert can fire when the value says so.
            assert scene.query_range(selector), f"{rule['alert']} reads {selector}, which no target exports"
    # Firing or pending at any moment since the fleet was up: ALERTS has a series for it.
    for name in QUIET_ALERTS:
        went_off = scene.query_range(f'ALERTS{{alertname="{name}"}}', start=scene.steady + 3)
        assert not went_off, f"{name} went off on a healthy fleet: {went_off}"
    # B's target was down through its restart: that one did go pending (its for: 10m keeps it there).
    pending = scene.query_range('ALERTS{alertname="OpenShellGatewayReplicasDown", alertstate="pending"}')
    assert pending, "the replicas-down alert never went pending while B was down"
