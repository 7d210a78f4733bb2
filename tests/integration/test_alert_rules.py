"""The chart's page alert, OpenShellNoSupervisorSessions, unit-tested by ``promtool test rules`` (the
Prometheus project's own rule tester) on the PrometheusRule the chart renders: it fires when the
replicas hold no supervisor session for ``for`` while sandboxes (not exited) exist, and not when a
session is held, when only exited sandboxes remain, before ``for`` has passed, or when no gateway
reports at all (OpenShellGatewayDown's case); the value turns it off and ``for``/``severity`` apply.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import yaml

from tests.integration.test_prometheus import _promtool
from tests.support.procs import REPO

ALERT = "OpenShellNoSupervisorSessions"


def rendered_rule(values: dict[str, Any]) -> dict[str, Any]:
    rendered = helm_python.Chart.load(str(REPO / "helm" / "openshell")).render(
        {"monitoring": {"prometheusRule": {"enabled": True, **values}}},
        name="openshell",
        namespace="openshell",
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


def alert_of(rule: dict[str, Any]) -> dict[str, Any] | None:
    found = [r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == ALERT]
    return found[0] if found else None


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    body = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{body}}}", "values": values}


def test_the_page_alert_fires_only_without_sessions_while_sandboxes_exist(tmp_path: Path) -> None:
    rule = rendered_rule({})
    alert = alert_of(rule)
    assert alert is not None, "on by default with the PrometheusRule"
    assert alert["for"] == "5m" and alert["labels"] == {"severity": "critical"}
    job = re.search(r'job="([^"]+)"', alert["expr"])
    assert job is not None
    common = {"job": job.group(1), "namespace": "openshell"}
    replica_a = {**common, "instance": "10.0.0.1:7090", "pod": "gw-a"}
    replica_b = {**common, "instance": "10.0.0.2:7090", "pod": "gw-b"}

    def sandboxes(replica: dict[str, str], values: str) -> dict[str, str]:
        """Sandboxes not exited, as a replica counts them (every replica counts the whole table)."""
        return series("openshell_gateway_sandboxes_not_exited", values, **replica)

    def sessions(replica: dict[str, str], values: str) -> dict[str, str]:
        return series("openshell_gateway_sessions", values, **replica)

    def expected(count: int) -> list[dict[str, Any]]:
        annotations = {
            key: text.replace("{{ $value }}", str(count)) for key, text in alert["annotations"].items()
        }
        return [{"exp_labels": {"severity": "critical"}, "exp_annotations": annotations}]

    tests = [
        {
            # Both replicas count 3 sandboxes not exited (one of them a count behind at first)
            # and hold no session.
            "interval": "1m",
            "input_series": [
                sandboxes(replica_a, "3x20"),
                sandboxes(replica_b, "2 3x19"),
                sessions(replica_a, "0x20"),
                sessions(replica_b, "0x20"),
            ],
            "alert_rule_test": [
                {"eval_time": "4m", "alertname": ALERT, "exp_alerts": []},  # not yet: for 5m
                {"eval_time": "10m", "alertname": ALERT, "exp_alerts": expected(3)},
            ],
        },
        {
            # One session held on one replica: no page.
            "interval": "1m",
            "input_series": [
                sandboxes(replica_a, "6x20"),
                sessions(replica_a, "1x20"),
                sessions(replica_b, "0x20"),
            ],
            "alert_rule_test": [{"eval_time": "10m", "alertname": ALERT, "exp_alerts": []}],
        },
        {
            # Only exited sandboxes: nothing to connect.
            "interval": "1m",
            "input_series": [sandboxes(replica_a, "0x20"), sessions(replica_a, "0x20")],
            "alert_rule_test": [{"eval_time": "10m", "alertname": ALERT, "exp_alerts": []}],
        },
        {
            # The count fails (NaN): no page on a number nobody has.
            "interval": "1m",
            "input_series": [sandboxes(replica_a, " ".join(["NaN"] * 21)), sessions(replica_a, "0x20")],
            "alert_rule_test": [{"eval_time": "10m", "alertname": ALERT, "exp_alerts": []}],
        },
        {
            # No gateway reports sessions at all (none up): the down alert's case, not this one.
            "interval": "1m",
            "input_series": [sandboxes(replica_a, "2x3")],
            "alert_rule_test": [{"eval_time": "10m", "alertname": ALERT, "exp_alerts": []}],
        },
        {
            # Sessions lost for 3 minutes (a rollout), then back: no page.
            "interval": "1m",
            "input_series": [
                sandboxes(replica_a, "2x20"),
                sessions(replica_a, "2 0 0 0 2x16"),
            ],
            "alert_rule_test": [{"eval_time": "10m", "alertname": ALERT, "exp_alerts": []}],
        },
        {
            # Pending sandboxes whose supervisors never connect: paged too.
            "interval": "1m",
            "input_series": [sandboxes(replica_a, "2x20"), sessions(replica_a, "0x20")],
            "alert_rule_test": [{"eval_time": "10m", "alertname": ALERT, "exp_alerts": expected(2)}],
        },
    ]
    _promtool_test(tmp_path, rule, tests)


def test_the_page_alert_follows_its_values() -> None:
    assert alert_of(rendered_rule({"noSupervisorSessions": {"enabled": False}})) is None
    tuned = alert_of(rendered_rule({"noSupervisorSessions": {"for": "15m", "severity": "page"}}))
    assert tuned is not None
    assert tuned["for"] == "15m" and tuned["labels"] == {"severity": "page"}


def test_records_lost_fires_per_reason_and_only_on_a_loss(tmp_path: Path) -> None:
    """OpenShellSupervisorRecordsLost: a rise of the gap records' dropped count within 15 minutes,
    per reason, summed over the replicas; nothing on counters that stay put (exported at 0)."""
    rule = rendered_rule({})
    (alert,) = [r for r in alert_rules_of(rule) if r["alert"] == "OpenShellSupervisorRecordsLost"]
    assert alert["labels"] == {"severity": "warning"}
    job = re.search(r'job="([^"]+)"', alert["expr"])
    assert job is not None
    common = {"job": job.group(1), "namespace": "openshell"}
    a = {**common, "instance": "10.0.0.1:7090", "pod": "gw-a"}
    b = {**common, "instance": "10.0.0.2:7090", "pod": "gw-b"}
    name = "openshell_gateway_supervisor_gap_dropped_records_total"

    def fired(reason: str, count: int) -> dict[str, Any]:
        labels = {"severity": "warning", "namespace": "openshell", "reason": reason}
        annotations = {
            key: text.replace("{{ $value | humanize }}", str(count)).replace("{{ $labels.reason }}", reason)
            for key, text in alert["annotations"].items()
        }
        return {"exp_labels": labels, "exp_annotations": annotations}

    tests = [
        {
            # 40 records dropped past a journal's bound on replica A at minute 5, 20 more on B at
            # minute 6: one alert for the reason, the replicas summed; quiet 15 minutes later.
            # Nothing corrupt: the corrupt counter stays at 0.
            "interval": "1m",
            "input_series": [
                series(name, "0x4 40x30", **a, reason="overflow"),
                series(name, "0x5 20x30", **b, reason="overflow"),
                series(name, "0x35", **a, reason="corrupt"),
            ],
            "alert_rule_test": [
                {"eval_time": "4m", "alertname": "OpenShellSupervisorRecordsLost", "exp_alerts": []},
                {
                    "eval_time": "10m",
                    "alertname": "OpenShellSupervisorRecordsLost",
                    "exp_alerts": [fired("overflow", 60)],
                },
                {"eval_time": "25m", "alertname": "OpenShellSupervisorRecordsLost", "exp_alerts": []},
            ],
        },
    ]
    _promtool_test(tmp_path, rule, tests)


def alert_rules_of(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]


def _promtool_test(tmp_path: Path, rule: dict[str, Any], tests: list[dict[str, Any]]) -> None:
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    (tmp_path / "tests.yml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests})
    )
    done = subprocess.run(
        [_promtool(), "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _replicas(alert: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    job = re.search(r'job="([^"]+)"', alert["expr"])
    assert job is not None
    common = {"job": job.group(1), "namespace": "openshell"}
    return {**common, "instance": "10.0.0.1:7090", "pod": "gw-a"}, {
        **common,
        "instance": "10.0.0.2:7090",
        "pod": "gw-b",
    }


def test_retention_stale_fires_when_no_replica_finished_a_run_for_an_hour(tmp_path: Path) -> None:
    """OpenShellLogRetentionStale: judged on the newest run of any replica; a gauge at 0 (retention
    off, or never run on a replica) is not judged."""
    name, alertname = "openshell_gateway_retention_last_run_timestamp_seconds", "OpenShellLogRetentionStale"
    (alert,) = [r for r in alert_rules_of(rendered_rule({})) if r["alert"] == alertname]
    a, b = _replicas(alert)
    labels = {"severity": "warning", "namespace": "openshell"}
    fired = [{"exp_labels": labels, "exp_annotations": alert["annotations"]}]
    tests = [
        {
            # A ran at t=300 s and then never again; B never ran (0): stale from 3,900 s, for 15
            # minutes: fires at about 81 minutes, not before.
            "interval": "1m",
            "input_series": [series(name, "300x120", **a), series(name, "0x120", **b)],
            "alert_rule_test": [
                {"eval_time": "70m", "alertname": alertname, "exp_alerts": []},
                {"eval_time": "90m", "alertname": alertname, "exp_alerts": fired},
            ],
        },
        {
            # A stopped at 300 s but B runs every 5 minutes (its gauge follows time): never stale.
            "interval": "5m",
            "input_series": [series(name, "300x30", **a), series(name, "300+300x30", **b)],
            "alert_rule_test": [{"eval_time": "120m", "alertname": alertname, "exp_alerts": []}],
        },
        {
            # Retention off on every replica: the gauges stay 0, nothing to judge.
            "interval": "1m",
            "input_series": [series(name, "0x120", **a), series(name, "0x120", **b)],
            "alert_rule_test": [{"eval_time": "110m", "alertname": alertname, "exp_alerts": []}],
        },
    ]
    _promtool_test(tmp_path, rendered_rule({}), tests)


def test_otlp_export_failing_fires_only_with_failures_and_events_waiting(tmp_path: Path) -> None:
    lag, failures = (
        "openshell_gateway_otlp_log_export_lag_events",
        "openshell_gateway_otlp_log_export_failures_total",
    )
    alertname = "OpenShellOtlpLogExportFailing"
    (alert,) = [r for r in alert_rules_of(rendered_rule({})) if r["alert"] == alertname]
    a, b = _replicas(alert)

    def fired(waiting: int) -> list[dict[str, Any]]:
        annotations = {
            key: text.replace("{{ $value | humanize }}", str(waiting))
            for key, text in alert["annotations"].items()
        }
        return [
            {"exp_labels": {"severity": "warning", "namespace": "openshell"}, "exp_annotations": annotations}
        ]

    tests = [
        {
            # A exports (B does not: lag 0 there); its receiver refuses from minute 2 on, 500 events wait.
            "interval": "1m",
            "input_series": [
                series(lag, "0 0 500x40", **a),
                series(lag, "0x42", **b),
                series(failures, "0 0 1+1x40", **a),
                series(failures, "0x42", **b),
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": alertname, "exp_alerts": []},  # not yet: for 15m
                {"eval_time": "25m", "alertname": alertname, "exp_alerts": fired(500)},
            ],
        },
        {
            # Failures, but nothing waits (every retry went through): quiet.
            "interval": "1m",
            "input_series": [series(lag, "0x40", **a), series(failures, "0+1x40", **a)],
            "alert_rule_test": [{"eval_time": "30m", "alertname": alertname, "exp_alerts": []}],
        },
        {
            # Events wait (a burst being exported) without a failure: quiet.
            "interval": "1m",
            "input_series": [series(lag, "9000x40", **a), series(failures, "0x40", **a)],
            "alert_rule_test": [{"eval_time": "30m", "alertname": alertname, "exp_alerts": []}],
        },
    ]
    _promtool_test(tmp_path, rendered_rule({}), tests)
