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
inactive.

What "answers something" cannot see is checked too. The chart is rendered with a fullnameOverride
(job ``sbx-gateway``: the dashboards take the job from a variable, not a name pattern), and
Prometheus scrapes replica A a second time under another release's job in the same namespace (its
series must not be added in). Early on, quiet-2's supervisor stops and REUSED's starts on its
address (a new pod given a freed IP): the sandbox dashboard drawn for REUSED must show none of
quiet-2's samples. The key panels' numbers at the end are compared with the known fleet (replicas,
sessions, the fair share, the sandboxes the API lists), and no panel or alert may sum a gauge that
every replica counts for the whole table (``TABLE_WIDE``). The answers are saved and drawn
(chaos/dashboards.py) into PNGs: into the test's temporary directory, or into
``$OPENSHELL_DASHBOARD_PICTURES`` (docs/dashboards, to update the docs' pictures).
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
from collections import Counter as Tally
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
#: The chart rendered with a fullnameOverride: its gateway Service, so the ServiceMonitor's job, is
#: ``sbx-gateway``, a name without "openshell" in it (the dashboards must not guess the job's name).
CHART_VALUES: Mapping[str, Any] = {
    "fullnameOverride": "sbx",
    # The chart refuses a NetworkPolicy without the scrapers' peers; none here.
    "networkPolicy": {"enabled": False},
    "monitoring": {"prometheusRule": {"enabled": True}, "serviceMonitor": {"enabled": True}},
}
#: Another release's gateway job in the same namespace (Prometheus scrapes replica A again under it):
#: the dashboards' panels must not add its series to the chosen release's.
OTHER_JOB = "openshell-canary-gateway"
#: What Grafana's $__rate_interval is for a 1 s scrape (4 intervals), with room for a late scrape.
RATE_INTERVAL = "10s"
#: The sandbox the sandbox dashboard is drawn for: the one whose main process exits and restarts.
BUSY = "busy"
#: A sandbox whose supervisor finds it degraded (a health change, by the fleet's counters).
DEGRADED = "low-disk"
SANDBOXES = (BUSY, DEGRADED, "quiet-1", "quiet-2")
#: Started on quiet-2's port once quiet-2's supervisor stopped: another pod given the same IP (the
#: same ``instance``); its sandbox dashboard must show none of quiet-2's samples.
REUSED = "reused"
#: The others' main process: a line every half second.
TICK = "import time\nwhile True: print('tick', flush=True); time.sleep(0.5)"
#: Targets that cannot answer here, and why (the test fails if one of them answers: then it belongs
#: with the others). Keyed by (dashboard uid, panel title, refId).
#: Every target answers in this scene (store_failures is exported at 0 per method, so the
#: "answered UNAVAILABLE" line draws 0 when no call was: tests/integration/test_db_faults.py makes
#: it rise). A target that cannot have data here is named with the reason.
NEEDS_MORE: Mapping[tuple[str, str, str], str] = {}
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


#: How the sandbox dashboard picks the chosen sandbox's series at each instant.
SANDBOX_JOIN = 'and on (instance) openshell_supervisor_info{namespace="$namespace", sandbox_id="$sandbox"}'


def load_dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))]


def rendered_monitoring() -> tuple[dict[str, Any], str]:
    """The PrometheusRule the chart renders (``CHART_VALUES``, release ``openshell`` in namespace
    ``openshell``), and the job label its ServiceMonitor's targets get: the Prometheus Operator
    names the job after the Service the endpoints belong to (the ServiceMonitor sets no jobLabel)."""
    rendered = helm_python.Chart.load(str(REPO / "helm" / "openshell")).render(
        dict(CHART_VALUES), name=RELEASE, namespace=NAMESPACE
    )
    docs = [
        d
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for d in yaml.safe_load_all(text)
        if isinstance(d, dict)
    ]
    (rule,) = [d for d in docs if d.get("kind") == "PrometheusRule"]
    (monitor,) = [d for d in docs if d.get("kind") == "ServiceMonitor"]
    assert "jobLabel" not in monitor["spec"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    (service,) = [
        d
        for d in docs
        if d.get("kind") == "Service"
        and selector.items() <= d["metadata"].get("labels", {}).items()
        and ports <= {p["name"] for p in d["spec"]["ports"]}
    ]
    return rule, service["metadata"]["name"]


def rendered_rule() -> dict[str, Any]:
    return rendered_monitoring()[0]


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
                # Every gateway query is scoped to the chosen release's gateways: its job (the
                # Service's name, whatever the release's name overrides) in the chosen namespace.
                if "openshell_gateway_" in target["expr"] or re.search(r"\bup\{", target["expr"]):
                    assert 'job="$job", namespace="$namespace"' in target["expr"], where
                assert "job=~" not in target["expr"], where
                # The sandbox's series chosen at each instant by the target naming that sandbox
                # then: an instance (a pod IP) is another sandbox's before or after.
                if uid == "openshell-sandbox":
                    assert SANDBOX_JOIN in target["expr"], where
                    selectors = set(re.findall(r"\{[^}]*\}", target["expr"]))
                    assert selectors == {
                        '{namespace="$namespace"}',
                        SANDBOX_JOIN[SANDBOX_JOIN.index("{") :],
                    }, where
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, where
        for name, variable in variables.items():
            if variable["type"] == "query":
                assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
        if uid != "openshell-sandbox":
            # One release's gateways: the job variable (one value), found in the chosen namespace.
            job = variables["job"]
            assert (
                job["query"]["query"]
                == 'label_values(openshell_gateway_build_info{namespace="$namespace"}, job)'
            )
            assert not job.get("multi") and not job.get("includeAll"), uid
            assert [*variables].index("namespace") < [*variables].index("job"), uid


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


# -- table-wide gauges: never summed over the replicas ------------------------------------------------

#: The gauges every replica counts from the whole store (docs/metrics.md, "Per replica or
#: fleet-wide"; gateway/metrics.py's help texts): each replica exports the same fleet-wide number,
#: so a sum over the replicas counts it once per replica. max, min or avg over the replicas, or a
#: panel per replica (``by (pod)``, ``by (instance)``), never a sum.
TABLE_WIDE = frozenset(
    "openshell_gateway_" + name
    for name in (
        "sandboxes",  # by state, counted from the sandboxes table
        "sandboxes_not_exited",
        "replicas_alive",  # the replicas table's live leases
        "fleet_sessions",  # every live replica's lease row
        "fair_share",  # fleet_sessions over the replicas taking sessions
        "retained_events",  # the events table after a retention run
        "retained_log_bytes",
    )
)
_AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    }
)
#: Aggregations whose value over replicas that all say the same number is that number.
_SAME_NUMBER = frozenset({"max", "min", "avg", "group"})
_PER_REPLICA = frozenset({"pod", "instance"})
_HEAD = re.compile(r"(\w+)\s*(?:(by|without)\s*\(([^)]*)\)\s*)?$")
_TAIL = re.compile(r"^\s*(by|without)\s*\(([^)]*)\)")


def _enclosing_aggregations(expr: str, at: int) -> list[tuple[str, str | None, frozenset[str]]]:
    """The aggregations whose argument holds position ``at`` of ``expr``, innermost first: (operator,
    by or without or None, its labels). Both of PromQL's forms: ``sum by (x) (...)``, ``sum(...) by (x)``."""
    found: list[tuple[str, str | None, frozenset[str]]] = []
    depth, opens = 0, []
    for i in range(at - 1, -1, -1):  # the unclosed "(" before ``at``, innermost first
        if expr[i] == ")":
            depth += 1
        elif expr[i] == "(":
            if depth:
                depth -= 1
            else:
                opens.append(i)
    for start in opens:
        head = _HEAD.search(expr[:start])
        if head is None or head.group(1) not in _AGGREGATIONS:
            continue
        modifier, labels = head.group(2), head.group(3)
        if modifier is None:
            end, depth = start, 0
            for end in range(start, len(expr)):
                depth += {"(": 1, ")": -1}.get(expr[end], 0)
                if depth == 0:
                    break
            tail = _TAIL.match(expr[end + 1 :])
            if tail is not None:
                modifier, labels = tail.groups()
        names = frozenset(n.strip() for n in (labels or "").split(",") if n.strip())
        found.append((head.group(1), modifier, names))
    return found


def summed_table_wide(expr: str) -> list[str]:
    """Where ``expr`` adds up a table-wide gauge over the replicas: under an aggregation that is
    neither one of ``_SAME_NUMBER`` nor per replica (``by`` keeping pod or instance)."""
    problems = []
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if match.group() not in TABLE_WIDE:
            continue
        for op, modifier, labels in _enclosing_aggregations(expr, match.start()):
            per_replica = modifier == "by" and bool(labels & _PER_REPLICA)
            if op not in _SAME_NUMBER and not per_replica:
                problems.append(f"{match.group()} under {op} {modifier or ''} ({', '.join(sorted(labels))})")
    return problems


def test_the_table_wide_check_finds_a_sum_over_the_replicas() -> None:
    """The check below can fail: a sum over the replicas (however written) is found, what keeps one
    number per replica or takes the same number once is not."""
    g = 'openshell_gateway_sandboxes_not_exited{job="$job"}'
    for summed in (
        f"sum({g})",
        f"sum by (namespace) ({g})",
        f"sum({g}) by (namespace)",
        f"sum without (pod, instance) ({g})",
        f"sum(max by (pod) ({g}))",
        f"count({g}) * 2",
        'sum by (state) (openshell_gateway_sandboxes{job="$job"})',
        "sum(openshell_gateway_fair_share)",
    ):
        assert summed_table_wide(summed), summed
    for fine in (
        f"max({g})",
        f"max by (pod) ({g})",
        f"sum by (pod) ({g})",
        f"sum({g}) by (instance)",
        f"avg({g}) > 0 and on () sum(openshell_gateway_sessions)",
        "sum(openshell_gateway_sandboxes_counted_timestamp_seconds)",  # each replica's own
        f"{g} > 0",
    ):
        assert not summed_table_wide(fine), fine


def test_no_dashboard_or_alert_sums_a_table_wide_gauge_over_the_replicas() -> None:
    exprs = [
        (f"{d['uid']} panel {p['id']} ({p['title']}) {t['refId']}", t["expr"])
        for d in load_dashboards()
        for p in d["panels"]
        for t in p["targets"]
    ]
    exprs += [(r["alert"], r["expr"]) for r in alert_rules(rendered_rule())]
    read = {name for _, expr in exprs for name in TABLE_WIDE if re.search(rf"\b{name}\b", expr)}
    assert read >= {"openshell_gateway_" + n for n in ("sandboxes", "sandboxes_not_exited", "replicas_alive")}
    problems = {where: found for where, expr in exprs if (found := summed_table_wide(expr))}
    assert not problems, problems
    # Each one a gauge the gateway exports.
    source = (REPO / "gateway" / "metrics.py").read_text()
    for name in TABLE_WIDE:
        assert f'PREFIX + "{name.removeprefix("openshell_gateway_")}"' in source, name


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
    #: When the REUSED supervisor was started on quiet-2's address (after quiet-2's stopped).
    reused_since: float
    #: What the API listed at the end: sandboxes by state.
    listed: Mapping[str, int]

    def at_end(self, promql: str) -> list[float]:
        """The instant values of ``promql`` at the scene's end."""
        result = self.prometheus.api("query", query=promql, time=f"{self.end:.3f}")["result"]
        return [float(s["value"][1]) for s in result]

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


def _listed(http_port: int, *, timeout: float = 10) -> dict[str, int]:
    """The sandboxes the gateway's API lists, counted by state, from a listing taken while BUSY's
    main process runs: it exits every few seconds and is down for up to its 0.5 s restart backoff,
    when the API rightly lists it exited; one listing at that instant disagreed with the panels'
    five seconds, which show it running most of the time (a CI run failed on it once)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/v1/sandboxes", timeout=10) as resp:
            body = json.loads(resp.read())
        by_id = {sandbox["id"]: sandbox["state"] for sandbox in body["sandboxes"]}
        if by_id.get(BUSY) != "exited" or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    states: dict[str, int] = {}
    for state in by_id.values():
        states[state] = states.get(state, 0) + 1
    return states


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
    rule, job = rendered_monitoring()
    assert job == "sbx-gateway"
    # The alerts read the job the ServiceMonitor's targets get.
    assert all(f'job="{job}"' in r["expr"] for r in alert_rules(rule))
    ports = {sandbox_id: free_port() for sandbox_id in SANDBOXES}
    prom = PrometheusServer(
        binary,
        root / "prometheus",
        jobs={
            job: [
                (f"127.0.0.1:{gw.ops_port}", {"namespace": NAMESPACE, "pod": f"sbx-gateway-{name}"})
                for name, gw in (("a", a), ("b", b))
            ],
            OTHER_JOB: [
                (f"127.0.0.1:{a.ops_port}", {"namespace": NAMESPACE, "pod": "openshell-canary-gateway-a"})
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
            _until(prom, f'sum(openshell_gateway_sessions{{job="{job}"}}) == 4', "every supervisor connected")
            # quiet-2's pod goes, another sandbox's pod comes up with its IP: same instance.
            # A few of its samples first (its connected session among them): what must not show.
            _until(
                prom,
                'count_over_time(openshell_supervisor_session_connected{pod="quiet-2"}[1m]) >= 3'
                ' and openshell_supervisor_session_connected{pod="quiet-2"} == 1',
                "quiet-2 scraped connected",
            )
            quiet = supervisors[SANDBOXES.index("quiet-2")]
            quiet.stop()
            wait_until(
                lambda: prom.value('up{pod="quiet-2"} == 0') is not None, timeout=30, what="quiet-2 down"
            )
            reused_since = time.time()
            supervisors.append(_supervisor(root, REUSED, proxy.grpc_address, ports["quiet-2"]))
            supervisors[-1].start()
            _until(prom, f'openshell_supervisor_info{{sandbox_id="{REUSED}"}}', "the new pod scraped")
            _until(prom, f'sum(openshell_gateway_sessions{{job="{job}"}}) == 4', "its supervisor connected")
            if election is not None:
                _until(prom, "max(openshell_gateway_leader)", "a replica leading")
            steady = time.time()
            time.sleep(STEADY_S)
            # A database blip: the connections cut (once a second, until a statement in flight
            # on one of them failed: an idle one is replaced by the pool's ping, not counted).
            # Errors counted before (a replica's start) do not count: the panel must show this rise.
            errors = f'sum(openshell_gateway_db_errors_total{{job="{job}"}})'
            before = prom.value(errors) or 0
            deadline = time.monotonic() + 20
            while (prom.value(errors) or 0) <= before:
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
            # Every supervisor back and the two replicas at their fair share: a moved supervisor
            # lands on A again a third of the time (the next move follows a rebalance interval
            # later), so "all four back" alone can hold a moment before the last move, which the
            # panels' last five seconds then straddle.
            _until(
                prom,
                f'sum(openshell_gateway_sessions{{job="{job}"}}) == 4'
                f' and max(openshell_gateway_sessions{{job="{job}"}}) == 2',
                "every supervisor back, two on each replica",
            )
            time.sleep(5)  # the last moves' rates in a few more samples
            end = time.time()
            listed = _listed(a.http_port)
            yield Scene(
                prom,
                start,
                steady,
                end,
                job,
                elected=election is not None,
                reused_since=reused_since,
                listed=listed,
            )
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


def _variables(scene: Scene, dashboard: Mapping[str, Any], *, sandbox: str = BUSY) -> dict[str, str]:
    """The dashboard's template variables as Grafana would fill them in for this scene: each query
    variable by its own query (which must answer), the namespace, release (job) and sandbox the
    scene's."""
    chosen = {"namespace": None, "job": scene.gateway_job, "sandbox": sandbox}
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


def _panel(dashboard_uid: str, title: str) -> dict[str, Any]:
    (dashboard,) = [d for d in load_dashboards() if d["uid"] == dashboard_uid]
    (panel,) = [p for p in dashboard["panels"] if p["title"] == title]
    return dict(panel)


def _last_totals(series: list[dict[str, Any]], samples: int) -> list[float]:
    """The panel's series added up at each of the last ``samples`` timestamps: what a stat panel
    of one series shows, or the total of a panel's lines."""
    totals: dict[float, float] = {}
    for s in series:
        for ts, value in s["values"]:
            totals[ts] = totals.get(ts, 0.0) + float(value)
    return [totals[ts] for ts in sorted(totals)[-samples:]]


def test_key_panels_show_the_scenes_numbers(answers: Answers, scene: Scene) -> None:
    """At the scene's end the fleet is known: two replicas up, four supervisors connected (two each
    after the rebalancing), the sandboxes the API lists. A panel that adds up a table-wide gauge over
    the replicas, or takes in another release's gateways, shows more, all the time. What is compared
    is the panel's total most often shown over the last five seconds: a session being moved is
    counted by no replica, or by two lease rows (one not yet renewed), for a moment."""
    live = len(SANDBOXES)  # quiet-2's supervisor stopped, REUSED's took its place
    listed = sum(scene.listed.values())
    not_exited = listed - scene.listed.get("exited", 0)
    assert listed == len(SANDBOXES) + 1, scene.listed  # quiet-2 left disconnected (or lost)
    expected = {
        ("openshell-gateway", "Gateway replicas up", "A"): 2,
        ("openshell-gateway", "Supervisor sessions", "A"): live,
        ("openshell-gateway", "Sandboxes not exited", "A"): not_exited,
        ("openshell-gateway", "Sandboxes by state", "A"): listed,
        ("openshell-gateway", "Sessions and reconnections", "A"): live,
        ("openshell-gateway-ha", "Replicas up", "A"): 2,
        ("openshell-gateway-ha", "Replicas alive (leases)", "A"): 2,
        ("openshell-gateway-ha", "Sessions (lease rows)", "A"): live,
        ("openshell-gateway-ha", "Sessions per replica", "A"): live,
        ("openshell-gateway-ha", "Sessions per replica", "B"): live / 2,  # the fair share
    }
    wrong = {}
    for (uid, title, ref_id), value in expected.items():
        panel = _panel(uid, title)
        index = [target["refId"] for target in panel["targets"]].index(ref_id)
        last = _last_totals(answers.by_dashboard[uid][panel["id"]][index], 5)
        ((shown, _),) = Tally(last).most_common(1)
        if shown != value:
            wrong[(uid, title, ref_id)] = (last, value)
    assert not wrong, f"(last five totals, expected): {wrong}"
    # The database blip is a rise and a fall on the errors panel, not a count that stays up.
    errors = _panel("openshell-gateway-ha", "Database errors per second")
    drawn = _last_totals(answers.by_dashboard["openshell-gateway-ha"][errors["id"]][0], 10**6)
    counted = scene.prometheus.api(
        "query",
        query=f'openshell_gateway_db_errors_total{{job="{scene.gateway_job}"}} > 0',
        time=f"{scene.end:.3f}",
    )["result"]
    assert max(drawn) > 0 and drawn[-1] == 0, (drawn, [(s["metric"], s["value"][1]) for s in counted])


def test_the_sandbox_dashboard_shows_no_other_sandbox_of_its_address(scene: Scene) -> None:
    """REUSED's supervisor listens where quiet-2's did (a new pod given a freed IP): the sandbox
    dashboard drawn for REUSED over the whole scene shows nothing from before it started, although
    quiet-2's series carry the same ``instance``."""
    (dashboard,) = [d for d in load_dashboards() if d["uid"] == "openshell-sandbox"]
    values = _variables(scene, dashboard, sandbox=REUSED)
    earlier: dict[str, float] = {}
    answered = 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            series = scene.query_range(_substituted(target["expr"], values))
            answered += _has_a_number(series)
            first = min((float(ts) for s in series for ts, _ in s["values"]), default=math.inf)
            if first < scene.reused_since:
                earlier[f"{panel['title']} {target['refId']}"] = scene.reused_since - first
    assert answered, "no panel answered for the sandbox on the reused address"
    assert not earlier, f"seconds of another sandbox's samples shown: {earlier}"


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
