"""The Helm chart (helm/openshell), through real Helm (helm_python, the Helm SDK as a library).

For every values file in helm/openshell/ci/: lint passes, the templates render, every object is valid
against the OpenAPI schemas of several Kubernetes versions, every pod the chart makes (the gateway,
the migration Job, the `helm test` pod) passes the Pod Security Standard "restricted", and the
gateway config in the ConfigMap loads with the gateway's own loader and yields sandbox pods that
pass "restricted" and the schemas too. Then what each values file is for: HA, Gateway API,
RuntimeClasses, the init-container fallback, an external database; and the chart's refusals.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import ipaddress
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from lightkube.models.authentication_v1 import TokenReviewStatus, UserInfo

from gateway import cli as gateway_cli
from gateway.app import STOP_MARGIN_S
from gateway.auth import CredentialRefused, Refusal
from gateway.auth.kubernetes_tokens import (
    EXTRA_POD_NAME,
    EXTRA_POD_UID,
    principal_of_review,
    service_account_username,
)
from gateway.config import GatewayConfig
from gateway.drivers.kubernetes import (
    CLUSTER_RBAC_RULES,
    RBAC_RULES,
    gateway_ca_rules,
    pull_secret_rule,
    rbac_rules,
)
from gateway.drivers.podspec import (
    GATEWAY_CA_CONFIGMAP,
    SandboxRequest,
    build_sandbox_pod,
    pod_name,
    selector_labels,
)
from gateway.leader import lease_rules
from openshell_wire.configfile import load_settings
from tests.support import pss

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "openshell"
CI_DIR = CHART / "ci"
CI_FILES = sorted(p.name for p in CI_DIR.glob("*.yaml"))
RELEASE = "openshell"
NAMESPACE = "openshell"
#: The oldest release with ImageVolume beta in the schemas, and the newest two bundled.
KUBE_VERSIONS = sorted({"1.33.0", "1.35.0", kubernetes_validate.latest_version()})
#: Custom resources: kubernetes_validate has no schema for them (SchemaNotFoundError).
CRD_GROUPS = {"monitoring.coreos.com", "gateway.networking.k8s.io", "cert-manager.io"}
SANDBOX_VERBS = {"pods": {"create", "get", "list", "watch", "delete"}}

Obj = dict[str, Any]


def ci_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CI_DIR / name).read_text()) or {}


@functools.cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(values: dict[str, Any], *, namespace: str = NAMESPACE) -> list[Obj]:
    manifests = _chart().render(values, name=RELEASE, namespace=namespace)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                objects.append(doc)
    return objects


@functools.cache
def _rendered_json(name: str) -> str:
    return json.dumps(render(ci_values(name)))


def rendered(name: str) -> list[Obj]:
    """The objects of a ci/ values file (a fresh copy: tests may change them)."""
    objects: list[Obj] = json.loads(_rendered_json(name))
    return objects


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[Obj], kind: str, *, component: str | None = None) -> Obj:
    found = [
        o
        for o in of_kind(objects, kind)
        if component is None
        or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects (component {component})"
    return found[0]


def sandbox_rbac(objects: list[Obj], kind: str = "Role") -> Obj:
    """The driver's Role (or its RoleBinding) in the sandbox namespace, FULLNAME-sandboxes; the
    other Role is the leader Lease's (FULLNAME-leader, in the release namespace)."""
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"].endswith("-sandboxes")]
    assert len(found) == 1, f"{len(found)} {kind} objects named *-sandboxes"
    return found[0]


def deployment(objects: list[Obj]) -> Obj:
    return one(objects, "Deployment", component="gateway")


def gateway_container(objects: list[Obj]) -> Obj:
    containers = deployment(objects)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "gateway")


def config_text(objects: list[Obj]) -> str:
    text: str = one(objects, "ConfigMap", component="gateway")["data"]["gateway.yaml"]
    return text


def load_config(objects: list[Obj], tmp_path: Path) -> GatewayConfig:
    """The ConfigMap's gateway.yaml through the gateway's own loader (no environment)."""
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(objects))
    return load_settings(GatewayConfig, file=path, use_env=False)


def sandbox_pod(config: GatewayConfig) -> Obj:
    request = SandboxRequest("t", ["sleep", "1"], image="busybox")
    return build_sandbox_pod(config.drivers.kubernetes, request, auth=config.auth.supervisors)


def projected_token(pod: Obj) -> Obj:
    """The serviceAccountToken source of the sandbox pod's projected credential volume."""
    for volume in pod["spec"]["volumes"]:
        for source in volume.get("projected", {}).get("sources", []):
            if "serviceAccountToken" in source:
                token: Obj = source["serviceAccountToken"]
                return token
    raise AssertionError(f"no projected token in {pod['spec']['volumes']}")


def pod_specs(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet", "ReplicaSet"):
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            yield f"Pod/{obj['metadata']['name']}", obj["spec"]


def validate(obj: Obj) -> None:
    """kubernetes_validate (strict: unknown fields fail) against every version in KUBE_VERSIONS."""
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(map(str, exc.path))
            raise AssertionError(
                f"{obj['kind']} {obj['metadata'].get('name')} on {version}: {where}: {exc.message}"
            ) from None


def test_every_ci_values_file_is_here() -> None:
    assert set(CI_FILES) == {
        "default-values.yaml",
        "ha-values.yaml",
        "gateway-api-values.yaml",
        "openshift-values.yaml",
        "kata-values.yaml",
        "gvisor-values.yaml",
        "no-image-volume-values.yaml",
        "external-postgresql-values.yaml",
        "private-registry-values.yaml",
        "production-values.yaml",
        "airgapped-values.yaml",
        "ingress-values.yaml",
    }


# --- every values file ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CI_FILES)
def test_lint_passes(name: str) -> None:
    report = helm.lint(CHART, ci_values(name), strict=True, namespace=NAMESPACE)
    assert report["errors"] == [], report
    worse_than_info = [m for m in report["messages"] if m["severity"] >= 2]
    assert worse_than_info == [], worse_than_info


@pytest.mark.parametrize("name", CI_FILES)
def test_values_match_the_schema(name: str) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(_chart().merge_values(ci_values(name)))


@pytest.mark.parametrize("name", CI_FILES)
def test_every_object_is_valid_kubernetes(name: str) -> None:
    objects = rendered(name)
    validated = 0
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
        group = obj["apiVersion"].rpartition("/")[0]
        if group in CRD_GROUPS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
            assert isinstance(obj.get("spec"), dict) and obj["spec"], obj
            continue
        validate(obj)
        validated += 1
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Pod"} <= kinds
    assert {"ClusterRole", "ClusterRoleBinding", "NetworkPolicy"} <= kinds
    assert validated >= 10


@pytest.mark.parametrize("name", CI_FILES)
def test_every_pod_passes_restricted(name: str) -> None:
    specs = dict(pod_specs(rendered(name)))
    assert any(k.startswith("Deployment/") for k in specs)
    assert any(k.startswith("Pod/") for k in specs)  # the helm test pod
    for where, spec in specs.items():
        assert pss.violations(spec, "restricted") == [], where


@pytest.mark.parametrize("name", CI_FILES)
def test_gateway_config_loads_and_builds_restricted_valid_sandbox_pods(name: str, tmp_path: Path) -> None:
    objects = rendered(name)
    config = load_config(objects, tmp_path)
    assert config.drivers.kind == "kubernetes"
    assert config.grpc.listen == "0.0.0.0:7070" and config.ops.listen == "0.0.0.0:7090"
    # Without OIDC the API takes no tokens, so it listens on loopback (a port-forward reaches it, no
    # pod does); no values file opens it unauthenticated. Supervisors must authenticate either way.
    assert config.http.listen == ("0.0.0.0:7080" if config.auth.oidc.issuer_url else "127.0.0.1:7080")
    assert config.auth.allow_unauthenticated_api is False
    assert config.auth.supervisors.required is True
    assert config.sessions.register_unknown is False
    # Supervisors dial the gateway Service's gRPC port.
    service = one(objects, "Service", component="gateway")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    sandbox_ns = sandbox_rbac(objects)["metadata"]["namespace"]
    assert config.drivers.kubernetes.gateway_address == (
        f"{service['metadata']['name']}.{NAMESPACE}.svc:{grpc_port}"
    )
    assert config.drivers.kubernetes.namespace == sandbox_ns
    pod = sandbox_pod(config)
    assert pss.violations(pod["spec"], "restricted") == []
    validate(pod)
    # The CLI's own check accepts the file too (exit 0; 78 for a bad file).
    path = tmp_path / "gateway.yaml"
    assert gateway_cli.main(["config", "check", str(path)]) == 0


@pytest.mark.parametrize("name", CI_FILES)
def test_role_has_exactly_the_drivers_verbs_and_only_tokenreviews_are_cluster_wide(
    name: str, tmp_path: Path
) -> None:
    objects = rendered(name)
    role = sandbox_rbac(objects)
    verbs: dict[str, set[str]] = {}
    by_name = []
    settings = load_config(objects, tmp_path).drivers.kubernetes
    ca_rules = gateway_ca_rules() if settings.supervisor.gateway_ca_file is not None else []
    for rule in role["rules"]:
        assert rule["apiGroups"] == [""], rule
        if rule in ca_rules:  # the CA ConfigMap (TLS only): checked below
            continue
        if rule.get("resourceNames"):
            by_name.append(rule)
            continue
        for resource in rule["resources"]:
            verbs.setdefault(resource, set()).update(rule["verbs"])
    assert verbs == SANDBOX_VERBS
    # ... which is what the driver declares it uses (and its live tests show each verb is needed).
    declared = {r: set(rule["verbs"]) for rule in RBAC_RULES for r in rule["resources"]}
    assert verbs == declared
    # Reading pull Secrets is granted by name only, exactly as the driver's rules for its config say.

    def canonical(rules: list[dict[str, list[str]]]) -> list[dict[str, list[str]]]:
        return [{**rule, "verbs": sorted(rule["verbs"])} for rule in rules]

    assert canonical(role["rules"]) == canonical(rbac_rules(settings))
    assert by_name == (
        [pull_secret_rule(settings.pod.image_pull_secrets)] if settings.pod.image_pull_secrets else []
    )
    if name == "private-registry-values.yaml":
        assert by_name == [
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["agents-pull"]}
        ]
        assert settings.registry.platform == "linux/arm64/v8"
    binding = sandbox_rbac(objects, "RoleBinding")
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    account = deployment(objects)["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert one(objects, "ServiceAccount", component="gateway")["metadata"]["name"] == account
    # Cluster-wide: TokenReview create only (the sandbox pods' projected tokens), bound to the same
    # account, exactly as the driver declares it.
    cluster_role = one(objects, "ClusterRole")
    assert cluster_role["rules"] == [dict(rule) for rule in CLUSTER_RBAC_RULES]
    assert cluster_role["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}
    ]
    cluster_binding = one(objects, "ClusterRoleBinding")
    assert cluster_binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": cluster_role["metadata"]["name"],
    }
    assert cluster_binding["subjects"] == binding["subjects"]
    # Two releases in two namespaces never share the cluster-scoped names.
    other = one(render(ci_values(name), namespace="other"), "ClusterRole")
    assert other["metadata"]["name"] != cluster_role["metadata"]["name"]


@pytest.mark.parametrize("name", CI_FILES)
def test_the_leader_lease_role_is_namespaced_and_only_the_leases(name: str, tmp_path: Path) -> None:
    """Issue 20 point 4: RBAC gains only what the leader Lease needs (gateway.leader.lease_rules),
    in the gateway's own namespace, bound to its account; the config names that Lease there."""
    objects = rendered(name)
    config = load_config(objects, tmp_path)
    lease = config.ha.leader.lease_name
    assert lease.endswith("-gateway-leader"), lease
    assert config.ha.leader.namespace == NAMESPACE
    (role,) = [r for r in of_kind(objects, "Role") if r["metadata"]["name"].endswith("-leader")]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == lease_rules(lease)
    (binding,) = [b for b in of_kind(objects, "RoleBinding") if b["metadata"]["name"].endswith("-leader")]
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == sandbox_rbac(objects, "RoleBinding")["subjects"]
    # Exactly two Roles: the driver's (sandbox namespace) and this one; no cluster-wide lease rule.
    assert len(of_kind(objects, "Role")) == 2
    assert all("leases" not in rule["resources"] for rule in one(objects, "ClusterRole")["rules"]), (
        "the Lease is namespaced"
    )
    # Two releases in one namespace hold two Leases.
    (tmp_path / "second").mkdir()
    other = load_config(render({**ci_values(name), "fullnameOverride": "second"}), tmp_path / "second")
    assert other.ha.leader.lease_name != lease


@pytest.mark.parametrize("name", CI_FILES)
def test_the_gateway_pod_is_wired_as_documented(name: str) -> None:
    values = _chart().merge_values(ci_values(name))
    objects = rendered(name)
    spec = deployment(objects)["spec"]["template"]["spec"]
    container = gateway_container(objects)
    drain, grace = values["gateway"]["drain"], values["gateway"]["grpc"]["shutdownGraceSeconds"]
    # The gateway's drain (settle, then the paced hints over the window: gateway.drain), then its
    # stop's deadline (gateway.app.Gateway.stop: the gRPC grace plus STOP_MARGIN_S, whatever the
    # database does), and 2 s for the process to exit; no preStop sleep unless asked.
    assert STOP_MARGIN_S + 2 == 10
    assert spec["terminationGracePeriodSeconds"] == (
        drain["preStopSeconds"] + drain["settleSeconds"] + drain["windowSeconds"] + grace + STOP_MARGIN_S + 2
    )
    assert drain["preStopSeconds"] == 0 and "lifecycle" not in container
    assert container["args"] == ["serve", "--config", "/etc/openshell/gateway.yaml"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 7070, "http": 7080, "ops": 7090}
    # Every probe on the ops listener: never the API (which takes tokens with OIDC) nor gRPC (TLS).
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/etc/openshell"} <= mounts
    service = one(objects, "Service", component="gateway")
    assert {(p["name"], p["appProtocol"]) for p in service["spec"]["ports"]} == {
        ("grpc", "grpc"),
        ("http", "http"),
        ("ops", "http"),
    }
    assert service["spec"]["type"] == "ClusterIP"
    configmap = one(objects, "ConfigMap", component="gateway")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert deployment(objects)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def test_the_drain_values_reach_the_gateway_and_its_grace_period(tmp_path: Path) -> None:
    """The drain's values are the gateway's drain.* settings; terminationGracePeriodSeconds is
    preStop + settle + window + shutdownGrace + 10 (47 s by default); the deprecated drainSeconds
    is the window when set; a preStop sleep only when asked."""
    objects = render({})
    config = load_config(objects, tmp_path).drain
    assert (config.settle_s, config.window_s, config.max_hints_per_s) == (2, 30, 200)
    assert config.min_hints_per_s <= config.max_hints_per_s
    assert deployment(objects)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 47
    assert "lifecycle" not in gateway_container(objects)
    values = {
        "gateway": {
            "drain": {
                "preStopSeconds": 3,
                "settleSeconds": 1.5,
                "windowSeconds": 50,
                "maxHintsPerSecond": 10,
            },
            "grpc": {"shutdownGraceSeconds": 7},
        }
    }
    objects = render(values)
    config = load_config(objects, tmp_path).drain
    assert (config.settle_s, config.window_s, config.max_hints_per_s, config.min_hints_per_s) == (
        1.5,
        50,
        10,
        10,
    )
    # A fractional settle is rounded up: the grace never falls short of the drain.
    assert (
        deployment(objects)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        == 3 + 2 + 50 + 7 + 10
    )
    assert gateway_container(objects)["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "3"]
    objects = render({"gateway": {"drainSeconds": 15}})
    assert load_config(objects, tmp_path).drain.window_s == 15
    assert (
        deployment(objects)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        == 0 + 2 + 15 + 5 + 10
    )
    # drainSeconds: 0 was valid before (no preStop sleep): an upgrade keeping it renders a config
    # the gateway takes (drain.window_s >= 1), the window being drain.windowSeconds.
    for old in (0, -1):
        objects = render({"gateway": {"drainSeconds": old}})
        assert load_config(objects, tmp_path).drain.window_s == 30
        assert deployment(objects)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 47
    schema = json.loads((CHART / "values.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(
            _chart().merge_values({"gateway": {"drain": {"windowSeconds": 0}}})
        )


def test_the_config_checksum_follows_the_config() -> None:
    def checksum(values: dict[str, Any]) -> str:
        annotations = deployment(render(values))["spec"]["template"]["metadata"]["annotations"]
        value: str = annotations["checksum/config"]
        return value

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"gateway": {"logLevel": "debug"}})
    assert checksum({}) != checksum({"sandboxes": {"pod": {"runtimeClassName": "kata"}}})


def test_the_helm_test_pod_asks_the_service_for_healthz() -> None:
    objects = rendered("default-values.yaml")
    pod = one(objects, "Pod", component="test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    service = one(objects, "Service", component="gateway")
    ops_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "ops")
    url = f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{ops_port}/healthz"
    container = pod["spec"]["containers"][0]
    assert container["image"] == "busybox:1.36"
    assert container["command"][:2] == ["sh", "-c"] and container["command"][-1] == url
    # Tried again, each try bounded (a connection to a pod that is going never answers).
    assert "timeout 5 wget" in container["command"][2] and pod["spec"]["activeDeadlineSeconds"] == 120
    custom = one(render({"tests": {"image": "registry.example/busybox:1"}}), "Pod", component="test")
    assert custom["spec"]["containers"][0]["image"] == "registry.example/busybox:1"


# --- what each values file is for -------------------------------------------------------------------


def test_default_is_one_replica_on_sqlite_without_ha_objects(tmp_path: Path) -> None:
    objects = rendered("default-values.yaml")
    dep = deployment(objects)
    assert dep["spec"]["replicas"] == 1
    assert "topologySpreadConstraints" not in dep["spec"]["template"]["spec"]
    for kind in ("PodDisruptionBudget", "HorizontalPodAutoscaler", "Job", "RuntimeClass", "Certificate"):
        assert of_kind(objects, kind) == [], kind
    config = load_config(objects, tmp_path)
    assert config.database.url.startswith("sqlite+aiosqlite:////var/lib/openshell/")
    assert config.database.migrate_on_start is True  # no hook Job with SQLite: the gateway migrates
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in gateway_container(objects)["volumeMounts"]}
    assert mounts["data"] == "/var/lib/openshell" and "emptyDir" in volumes["data"]
    # Chosen by the gateway from the cluster at start (gateway/drivers/injection.py).
    assert config.drivers.kubernetes.supervisor.injection == "auto"
    assert any("image" in v for v in sandbox_pod(config)["spec"]["volumes"])


def test_ha_values_give_replicas_pdb_hpa_and_topology_spread() -> None:
    objects = rendered("ha-values.yaml")
    dep = deployment(objects)
    selector = dep["spec"]["selector"]["matchLabels"]
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] > 1 and hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    assert "replicas" not in dep["spec"]  # left to the autoscaler
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    spread = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert all(c["labelSelector"]["matchLabels"] == selector for c in spread)
    # Without the autoscaler, the replicas are the Deployment's own.
    values = ci_values("ha-values.yaml")
    values["gateway"]["autoscaling"]["enabled"] = False
    plain = render(values)
    assert deployment(plain)["spec"]["replicas"] == 3
    assert of_kind(plain, "HorizontalPodAutoscaler") == [] and len(of_kind(plain, "PodDisruptionBudget")) == 1


def test_ha_values_create_a_restricted_sandbox_namespace_and_a_network_policy() -> None:
    objects = rendered("ha-values.yaml")
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["name"] == "openshell-sandboxes"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert sandbox_rbac(objects)["metadata"]["namespace"] == "openshell-sandboxes"
    policy = one(objects, "NetworkPolicy", component="gateway")
    assert (
        policy["spec"]["podSelector"]["matchLabels"] == deployment(objects)["spec"]["selector"]["matchLabels"]
    )
    grpc_rule, http_rule = policy["spec"]["ingress"][:2]
    assert [p["port"] for p in grpc_rule["ports"]] == [7070]
    peer = grpc_rule["from"][0]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "openshell-sandboxes"}
    assert [p["port"] for p in http_rule["ports"]] == [7080]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {53, 443, 6443, 5432} <= egress_ports
    # The sandbox pods the gateway builds carry the labels the policy admits.
    assert peer["podSelector"]["matchLabels"] == selector_labels()


def test_ha_values_render_monitoring_and_a_grafana_dashboard() -> None:
    objects = rendered("ha-values.yaml")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "ops"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    rules = one(objects, "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"OpenShellGatewayDown"}
    dashboards = [
        o for o in of_kind(objects, "ConfigMap") if o["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    assert len(dashboards) == 3  # fleet overview, gateway HA, one sandbox (docs/dashboards.md)
    for dashboard in dashboards:
        (text,) = dashboard["data"].values()
        assert json.loads(text)["panels"]
    defaults = rendered("default-values.yaml")
    assert not of_kind(defaults, "ServiceMonitor") and not of_kind(defaults, "PrometheusRule")


def test_gateway_api_values_render_routes_and_default_values_none() -> None:
    objects = rendered("gateway-api-values.yaml")
    service = one(objects, "Service", component="gateway")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    gateway = one(objects, "Gateway")
    assert gateway["spec"]["gatewayClassName"] == "example-gateway-class"
    listeners = {listener["name"] for listener in gateway["spec"]["listeners"]}
    # The HTTP API has no authentication yet: no HTTPRoute (nor its listener) unless asked for.
    assert of_kind(objects, "HTTPRoute") == [] and listeners == {"grpc"}
    values = ci_values("gateway-api-values.yaml")
    values["gatewayApi"]["httpRoute"] = {"enabled": True, "hostnames": ["api.openshell.example.com"]}
    values["auth"] = {"oidc": {"issuerUrl": "https://keycloak.example.com/realms/openshell"}}
    with_http = render(values)
    gateway = one(with_http, "Gateway")
    listeners = {listener["name"] for listener in gateway["spec"]["listeners"]}
    for kind, port, section in (("GRPCRoute", ports["grpc"], "grpc"), ("HTTPRoute", ports["http"], "http")):
        route = one(with_http, kind)
        assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
        assert route["spec"]["parentRefs"] == [{"name": gateway["metadata"]["name"], "sectionName": section}]
        assert section in listeners
        backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
        assert backends == [{"name": service["metadata"]["name"], "port": port}]
        assert route["spec"]["hostnames"]
    defaults = rendered("default-values.yaml")
    for kind in ("Gateway", "GRPCRoute", "HTTPRoute"):
        assert of_kind(defaults, kind) == []
    # parentRefs given: used as they are, and no Gateway is made.
    refs = [{"name": "shared", "namespace": "infra"}]
    proxies = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "infra"}}}]
    own = render(
        {"gatewayApi": {"enabled": True, "parentRefs": refs}, "networkPolicy": {"gatewayApiFrom": proxies}}
    )
    assert of_kind(own, "Gateway") == [] and of_kind(own, "HTTPRoute") == []
    assert one(own, "GRPCRoute")["spec"]["parentRefs"] == refs


@pytest.mark.parametrize(
    ("name", "runtime_class", "handler"),
    [("kata-values.yaml", "kata", "kata"), ("gvisor-values.yaml", "gvisor", "runsc")],
)
def test_runtime_class_values(name: str, runtime_class: str, handler: str, tmp_path: Path) -> None:
    objects = rendered(name)
    created = one(objects, "RuntimeClass")
    assert created["metadata"]["name"] == runtime_class and created["handler"] == handler
    assert "namespace" not in created["metadata"]  # cluster-scoped
    config = load_config(objects, tmp_path)
    assert config.drivers.kubernetes.pod.runtime_class_name == runtime_class
    assert sandbox_pod(config)["spec"]["runtimeClassName"] == runtime_class


def test_kata_overhead_and_scheduling() -> None:
    created = one(rendered("kata-values.yaml"), "RuntimeClass")
    assert created["overhead"]["podFixed"] == {"memory": "160Mi", "cpu": "250m"}
    assert created["scheduling"]["nodeSelector"] == {"katacontainers.io/kata-runtime": "true"}


def test_no_image_volume_values_use_the_init_container(tmp_path: Path) -> None:
    config = load_config(rendered("no-image-volume-values.yaml"), tmp_path)
    assert config.drivers.kubernetes.supervisor.injection == "init-container"
    spec = sandbox_pod(config)["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["openshell-supervisor-install"]
    assert not any("image" in v for v in spec["volumes"])


def test_external_postgresql_takes_the_url_from_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered("external-postgresql-values.yaml")
    expected_env = {
        "name": "OPENSHELL_GATEWAY_DATABASE__URL",
        "valueFrom": {"secretKeyRef": {"name": "openshell-database", "key": "url"}},
    }
    assert expected_env in gateway_container(objects)["env"]
    config_yaml = yaml.safe_load(config_text(objects))
    assert "url" not in config_yaml["database"]
    assert config_yaml["database"]["migrate_on_start"] is False  # the hook Job migrates
    # The variable's name is the one the gateway reads: with it set, the URL is the Secret's.
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(objects))
    url = "postgresql+asyncpg://u:p@db.example:5432/openshell"
    monkeypatch.setenv("OPENSHELL_GATEWAY_DATABASE__URL", url)
    assert load_settings(GatewayConfig, file=path).database.url == url
    # No SQLite volume on an external database.
    assert "data" not in {v["name"] for v in deployment(objects)["spec"]["template"]["spec"]["volumes"]}


def test_external_postgresql_migrates_in_a_pre_install_hook_job() -> None:
    objects = rendered("external-postgresql-values.yaml")
    job = one(objects, "Job", component="migration")
    hook_config = one(objects, "ConfigMap", component="migration")
    for obj in (job, hook_config):
        annotations = obj["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    # The ConfigMap copy exists before the Job (lower weight) and holds the same config.
    weight = int(hook_config["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert weight < int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert hook_config["data"]["gateway.yaml"] == config_text(objects)
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["args"] == ["migrate", "--config", "/etc/openshell/gateway.yaml"]
    assert container["env"] == _without_replica_id(gateway_container(objects)["env"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == hook_config["metadata"]["name"]
    assert spec["automountServiceAccountToken"] is False
    # Turned off, the gateway migrates at start instead.
    values = ci_values("external-postgresql-values.yaml")
    values["database"]["migrationJob"] = {"enabled": False}
    off = render(values)
    assert of_kind(off, "Job") == []
    assert yaml.safe_load(config_text(off))["database"]["migrate_on_start"] is True


def test_openshift_values_leave_the_ids_to_the_scc() -> None:
    objects = rendered("openshift-values.yaml")
    for where, spec in pod_specs(objects):
        contexts = [spec.get("securityContext", {})] + [
            c.get("securityContext", {}) for c in spec["containers"]
        ]
        for context in contexts:
            assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(context), (where, context)
        assert spec["securityContext"]["runAsNonRoot"] is True
    default_spec = deployment(rendered("default-values.yaml"))["spec"]["template"]["spec"]
    assert default_spec["securityContext"]["runAsUser"] == 10001


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector against a set of labels ({} selects everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def admitted(policy: Obj, port: int, labels: dict[str, str], namespace: str) -> bool:
    """Whether the policy's ingress lets a pod with these labels, in that namespace, reach port."""
    for rule in policy["spec"]["ingress"]:
        if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            if "ipBlock" in peer:
                return True  # pod addresses may fall in it
            if "namespaceSelector" in peer:
                ns_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
            else:
                ns_ok = namespace == policy["metadata"]["namespace"]
            if ns_ok and selects(peer.get("podSelector", {}), labels):
                return True
    return False


def test_sandboxes_get_a_namespace_of_their_own_labelled_restricted_by_default(tmp_path: Path) -> None:
    objects = rendered("default-values.yaml")
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["name"] == f"{NAMESPACE}-sandboxes"
    labels = namespace["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    assert sandbox_rbac(objects)["metadata"]["namespace"] == f"{NAMESPACE}-sandboxes"
    assert load_config(objects, tmp_path).drivers.kubernetes.namespace == f"{NAMESPACE}-sandboxes"
    # Named explicitly, the namespace is that one (still created unless told otherwise).
    named = render({"sandboxes": {"namespace": "agents"}})
    assert one(named, "Namespace")["metadata"]["name"] == "agents"
    existing = render({"sandboxes": {"namespace": "agents", "createNamespace": False}})
    assert (
        of_kind(existing, "Namespace") == [] and sandbox_rbac(existing)["metadata"]["namespace"] == "agents"
    )


@pytest.mark.parametrize(
    "sandboxes",
    [{}, {"namespace": NAMESPACE, "createNamespace": False, "allowReleaseNamespace": True}],
    ids=["own-namespace", "release-namespace"],
)
def test_the_http_api_never_admits_sandbox_pods_but_grpc_does(sandboxes: Obj, tmp_path: Path) -> None:
    objects = render({"sandboxes": sandboxes, "networkPolicy": {"enabled": True}})
    policy = one(objects, "NetworkPolicy", component="gateway")
    config = load_config(objects, tmp_path)
    pod = sandbox_pod(config)
    labels, namespace = pod["metadata"]["labels"], config.drivers.kubernetes.namespace
    assert admitted(policy, 7070, labels, namespace)
    assert not admitted(policy, 7080, labels, namespace)
    # Other pods of the release namespace (the helm test pod, an operator's client) still reach it;
    # the helm test pod reaches the ops port, sandboxes do not.
    test_pod = one(objects, "Pod", component="test")
    assert admitted(policy, 7080, test_pod["metadata"]["labels"], NAMESPACE)
    assert admitted(policy, 7090, test_pod["metadata"]["labels"], NAMESPACE)
    assert not admitted(policy, 7090, labels, namespace)
    assert admitted(policy, 7080, {"app": "client"}, NAMESPACE)
    assert not admitted(policy, 7080, {"app": "client"}, "elsewhere")
    assert not admitted(policy, 7070, {"app": "client"}, NAMESPACE)


def test_network_policy_admits_prometheus_and_the_gateway_api_data_plane() -> None:
    policy = one(rendered("ha-values.yaml"), "NetworkPolicy", component="gateway")
    assert admitted(policy, 7090, {"app.kubernetes.io/name": "prometheus"}, "monitoring")
    assert not admitted(policy, 7070, {"app.kubernetes.io/name": "prometheus"}, "monitoring")
    assert not admitted(policy, 7080, {"app.kubernetes.io/name": "prometheus"}, "monitoring")
    policy = one(rendered("gateway-api-values.yaml"), "NetworkPolicy", component="gateway")
    assert admitted(policy, 7070, {"app": "envoy"}, "gateway-system")
    assert not admitted(policy, 7080, {"app": "envoy"}, "gateway-system")  # no HTTPRoute
    values = ci_values("gateway-api-values.yaml")
    values["gatewayApi"]["httpRoute"] = {"enabled": True}
    values["auth"] = {"allowUnauthenticatedApi": True}
    policy = one(render(values), "NetworkPolicy", component="gateway")
    assert admitted(policy, 7080, {"app": "envoy"}, "gateway-system")
    # The data plane's peers only with the Gateway API on.
    plain = render({"networkPolicy": {"enabled": True, "gatewayApiFrom": [{"namespaceSelector": {}}]}})
    assert not admitted(
        one(plain, "NetworkPolicy", component="gateway"), 7070, {"app": "envoy"}, "gateway-system"
    )


# --- secure by default (issue 19) -------------------------------------------------------------------


def sandbox_policy(objects: list[Obj]) -> Obj:
    return one(objects, "NetworkPolicy", component="sandbox-policy")


def egress_allows_address(policy: Obj, address: str, port: int) -> bool:
    """Whether the policy's egress lets a selected pod open ``address:port`` through an ipBlock rule
    (the rules naming pods by selector are checked by the tests themselves)."""
    target = ipaddress.ip_address(address)
    for rule in policy["spec"]["egress"]:
        if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
            continue
        if "to" not in rule:
            return True
        for peer in rule["to"]:
            block = peer.get("ipBlock")
            if block is None or target not in ipaddress.ip_network(block["cidr"]):
                continue
            if not any(target in ipaddress.ip_network(cidr) for cidr in block.get("except", [])):
                return True
    return False


def test_sandboxes_get_no_ingress_and_egress_only_to_dns_and_the_gateways_grpc(tmp_path: Path) -> None:
    objects = rendered("default-values.yaml")
    config = load_config(objects, tmp_path)
    policy = sandbox_policy(objects)
    assert policy["metadata"]["namespace"] == config.drivers.kubernetes.namespace
    # It selects the pods the gateway builds, and only those.
    pod = sandbox_pod(config)
    assert selects(policy["spec"]["podSelector"], pod["metadata"]["labels"])
    assert not selects(policy["spec"]["podSelector"], {"app": "other"})
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == []  # nothing connects to a sandbox, not even another one
    dns, grpc = policy["spec"]["egress"]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    assert [p["port"] for p in grpc["ports"]] == [7070]
    (gateway_peer,) = grpc["to"]
    gateway_labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert selects(gateway_peer["podSelector"], gateway_labels)
    assert gateway_peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}
    # No address at all by ipBlock: the metadata service, other pods, the API, the internet.
    for address in ("169.254.169.254", "10.0.0.5", "192.168.1.1", "8.8.8.8"):
        for port in (80, 443, 7070, 7080):
            assert not egress_allows_address(policy, address, port), (address, port)


def test_an_allowlist_rule_without_to_is_refused_unless_explicitly_allowed() -> None:
    # A rule without `to` reaches any address on its ports: the metadata address and the cluster too.
    rule = {"ports": [{"port": 443, "protocol": "TCP"}]}
    named = {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    with pytest.raises(helm.HelmError, match=r"egress\[1\] has no `to`.*metadata"):
        render({"networkPolicy": {"sandboxes": {"egress": [named, rule]}}})
    policy = sandbox_policy(
        render({"networkPolicy": {"sandboxes": {"egress": [named, rule], "allowEgressWithoutTo": True}}})
    )
    assert egress_allows_address(policy, "169.254.169.254", 443)  # what the override means
    # Not refused where no sandbox policy is rendered.
    render({"networkPolicy": {"sandboxes": {"enabled": False, "egress": [rule]}}})


def test_default_metadata_ranges_cover_the_big_clouds() -> None:
    values = {"networkPolicy": {"sandboxes": {"internet": {"enabled": True}}}}
    policy = sandbox_policy(render(values))
    assert egress_allows_address(policy, "203.0.113.7", 443)
    for address in ("169.254.169.254", "100.100.100.200"):  # AWS/GCP/Azure, Alibaba Cloud
        assert not egress_allows_address(policy, address, 80), address


def test_dns_peers_and_ports_are_configurable_for_openshift_and_nodelocal_dns(tmp_path: Path) -> None:
    def dns_rules(objects: list[Obj]) -> tuple[Obj, Obj]:
        gateway = one(objects, "NetworkPolicy", component="gateway")["spec"]["egress"][0]
        sandbox = sandbox_policy(objects)["spec"]["egress"][0]
        return gateway, sandbox

    def ports(rule: Obj) -> set[tuple[int, str]]:
        return {(p["port"], p["protocol"]) for p in rule["ports"]}

    # Defaults: 53; the gateway to any DNS server, sandboxes to kube-system's kube-dns pods only.
    gateway, sandbox = dns_rules(rendered("default-values.yaml"))
    assert ports(gateway) == ports(sandbox) == {(53, "UDP"), (53, "TCP")}
    assert "to" not in gateway
    # OpenShift: openshift-dns's pods on 5353 (its Service's 53 after DNAT), for both policies.
    gateway, sandbox = dns_rules(rendered("openshift-values.yaml"))
    assert ports(gateway) == ports(sandbox) == {(5353, "UDP"), (5353, "TCP")}
    openshift_dns = {"dns.operator.openshift.io/daemonset-dns": "default"}
    for rule in (gateway, sandbox):
        (peer,) = rule["to"]
        assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "openshift-dns"}
        assert peer["podSelector"]["matchLabels"] == openshift_dns
    # NodeLocal DNSCache: its link-local address as an ipBlock peer.
    nodelocal = [{"ipBlock": {"cidr": "169.254.20.10/32"}}]
    objects = render({"networkPolicy": {"dnsTo": nodelocal, "sandboxes": {"dnsTo": nodelocal}}})
    gateway, sandbox = dns_rules(objects)
    assert gateway["to"] == sandbox["to"] == nodelocal
    assert egress_allows_address(sandbox_policy(objects), "169.254.20.10", 53)
    assert not egress_allows_address(sandbox_policy(objects), "169.254.169.254", 53)
    validate(sandbox_policy(objects))


def test_the_oidc_issuer_gets_an_egress_rule_of_its_own() -> None:
    def egress(values: dict[str, Any]) -> list[Obj]:
        rules: list[Obj] = one(render(values), "NetworkPolicy", component="gateway")["spec"]["egress"]
        return rules

    issuer = "https://keycloak.example.com/realms/openshell"
    keycloak = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keycloak"}}}]
    values: dict[str, Any] = {
        "auth": {"oidc": {"issuerUrl": issuer}},
        "networkPolicy": {"apiServerCidrs": ["10.0.0.1/32"], "issuerTo": keycloak, "issuerPorts": [8443]},
    }
    rules = egress(values)
    assert {"ports": [{"port": 8443, "protocol": "TCP"}], "to": keycloak} in rules
    values["networkPolicy"].pop("issuerTo")
    values["networkPolicy"].pop("issuerPorts")
    assert {"ports": [{"port": 443, "protocol": "TCP"}]} in egress(values)  # default: 443 anywhere
    # Without OIDC there is no issuer to reach.
    assert not [r for r in egress({}) if r.get("ports") == [{"port": 443, "protocol": "TCP"}]]


def test_sandboxes_internet_rule_excepts_the_metadata_address_and_the_cluster() -> None:
    allow = [{"to": [{"ipBlock": {"cidr": "10.1.2.0/24"}}], "ports": [{"port": 8443, "protocol": "TCP"}]}]
    values = {
        "networkPolicy": {
            "sandboxes": {
                "internet": {"enabled": True, "ports": [{"port": 443, "protocol": "TCP"}]},
                "egress": allow,
            }
        }
    }
    policy = sandbox_policy(render(values))
    validate(policy)
    assert egress_allows_address(policy, "8.8.8.8", 443)
    assert not egress_allows_address(policy, "8.8.8.8", 22)  # the internet rule's ports only
    for address in ("169.254.169.254", "10.96.0.1", "172.17.0.2", "192.168.0.10"):
        assert not egress_allows_address(policy, address, 443), address
    # The allowlist adds what it names, nothing more.
    assert egress_allows_address(policy, "10.1.2.3", 8443)
    assert not egress_allows_address(policy, "10.1.3.3", 8443)
    # Own cluster ranges: the rest of the private space is then the internet's.
    values["networkPolicy"]["sandboxes"]["clusterCidrs"] = ["10.244.0.0/16", "10.96.0.0/12"]
    narrowed = sandbox_policy(render(values))
    assert egress_allows_address(narrowed, "192.168.0.10", 443)
    assert not egress_allows_address(narrowed, "10.96.0.1", 443)
    assert not egress_allows_address(narrowed, "169.254.169.254", 443)
    # Off: no sandbox policy (the gateway's stays).
    off = render({"networkPolicy": {"sandboxes": {"enabled": False}}})
    assert [
        p["metadata"]["labels"]["app.kubernetes.io/component"] for p in of_kind(off, "NetworkPolicy")
    ] == ["gateway"]
    assert of_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy") == []


@pytest.mark.parametrize("service_type", ["LoadBalancer", "NodePort"])
def test_an_external_service_publishes_grpc_only_unless_the_api_is_asked_for(service_type: str) -> None:
    clients = [{"ipBlock": {"cidr": "0.0.0.0/0"}}]
    values: dict[str, Any] = {
        "gateway": {"service": {"type": service_type}},
        "networkPolicy": {"grpcFrom": clients},
    }
    objects = render(values)
    internal = one(objects, "Service", component="gateway")
    assert internal["spec"]["type"] == "ClusterIP"
    external = one(objects, "Service", component="gateway-external")
    assert external["spec"]["type"] == service_type
    assert external["spec"]["selector"] == internal["spec"]["selector"]
    assert [p["name"] for p in external["spec"]["ports"]] == ["grpc"]
    notes = _chart().render(values, name=RELEASE, namespace=NAMESPACE)["openshell/templates/NOTES.txt"]
    assert "is not published outside the cluster" in notes and "port-forward" in notes
    values["gateway"]["service"]["exposeApi"] = True
    values["auth"] = {"oidc": {"issuerUrl": "https://keycloak.example.com/realms/openshell"}}
    exposed = one(render(values), "Service", component="gateway-external")
    assert [p["name"] for p in exposed["spec"]["ports"]] == ["grpc", "http"]  # never ops
    # ClusterIP (the default): no external Service at all.
    assert of_kind(rendered("default-values.yaml"), "Service") == [
        one(rendered("default-values.yaml"), "Service", component="gateway")
    ]
    # The NetworkPolicy would block the load balancer's clients: the chart says so instead.
    with pytest.raises(helm.HelmError, match=r"networkPolicy\.grpcFrom"):
        render({"gateway": {"service": {"type": service_type}}})


def notes_of(values: dict[str, Any]) -> str:
    text: str = _chart().render(values, name=RELEASE, namespace=NAMESPACE)["openshell/templates/NOTES.txt"]
    return text


def test_without_oidc_the_api_listens_on_loopback_unless_explicitly_opened(tmp_path: Path) -> None:
    # Default: no token check, so no network listener at all; only a port-forward reaches it (no pod,
    # no sandbox, whatever the CNI does with NetworkPolicies).
    objects = rendered("default-values.yaml")
    config = load_config(objects, tmp_path)
    assert config.http.listen == "127.0.0.1:7080"
    assert config.auth.allow_unauthenticated_api is False
    assert "allow_unauthenticated_api" not in config_text(objects)
    notes = notes_of({})
    assert "UNAUTHENTICATED" not in notes
    assert "reachable only through a port-forward" in notes
    # The explicit opt-in: 0.0.0.0 with allow_unauthenticated_api, and the NOTES warn that only an
    # enforced NetworkPolicy keeps pods off it.
    opened = {"auth": {"allowUnauthenticatedApi": True}}
    config = load_config(render(opened), tmp_path)
    assert config.http.listen == "0.0.0.0:7080" and config.auth.allow_unauthenticated_api is True
    notes = notes_of(opened)
    assert "WARNING: the HTTP API is UNAUTHENTICATED" in notes
    assert "IF your CNI enforces NetworkPolicy" in notes
    assert "reachable only from networkPolicy.httpFrom" not in notes
    open_notes = notes_of({**opened, "networkPolicy": {"enabled": False}})
    assert "ANY pod of the cluster, sandboxes included, reaches it" in open_notes
    # With OIDC the opt-in changes nothing: the API takes tokens.
    oidc = {"auth": {"allowUnauthenticatedApi": True, "oidc": {"issuerUrl": "https://idp.example/realms/o"}}}
    config = load_config(render(oidc), tmp_path)
    assert config.http.listen == "0.0.0.0:7080" and config.auth.allow_unauthenticated_api is False


def test_routing_or_publishing_the_api_without_oidc_is_refused_unless_explicitly_opened() -> None:
    route = ci_values("gateway-api-values.yaml")
    route["gatewayApi"]["httpRoute"] = {"enabled": True}
    with pytest.raises(helm.HelmError, match=r"httpRoute.*UNAUTHENTICATED.*auth\.oidc\.issuerUrl"):
        render(route)
    expose: dict[str, Any] = {
        "gateway": {"service": {"type": "LoadBalancer", "exposeApi": True}},
        "networkPolicy": {"grpcFrom": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]},
    }
    with pytest.raises(helm.HelmError, match=r"exposeApi.*UNAUTHENTICATED.*auth\.oidc\.issuerUrl"):
        render(expose)
    # Opened explicitly: rendered, and the NOTES name every way in besides httpFrom.
    for values, where in ((route, "The HTTPRoute routes it"), (expose, "publishes it to its clients")):
        values["auth"] = {"allowUnauthenticatedApi": True}
        render(values)
        notes = notes_of(values)
        assert "UNAUTHENTICATED" in notes and where in notes
    # exposeApi with a ClusterIP Service publishes nothing: not refused.
    render({"gateway": {"service": {"exposeApi": True}}})


@pytest.mark.parametrize("source", ["secretName", "configMapName"])
def test_oidc_values_reach_the_gateway_with_the_issuers_ca(source: str, tmp_path: Path) -> None:
    oidc = {
        "issuerUrl": "https://keycloak.example.com/realms/openshell",
        "audience": ["openshell-api"],
        "roles": {"admin": ["platform"], "operator": [], "viewer": ["everyone"]},
        "caBundle": {source: "corp-ca", "key": "bundle.pem"},
    }
    objects = render({"auth": {"oidc": oidc}})
    config = load_config(objects, tmp_path)
    assert config.auth.oidc.issuer_url == oidc["issuerUrl"]
    assert config.auth.oidc.audience == ["openshell-api"]
    assert config.auth.oidc.roles.admin == ["platform"] and config.auth.oidc.roles.viewer == ["everyone"]
    assert config.auth.allow_unauthenticated_api is False  # rendered only without OIDC
    assert "allow_unauthenticated_api" not in config_text(objects)
    # The CA file the config names is the one the pod mounts from the existing object.
    container = gateway_container(objects)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "oidc-ca")
    assert str(config.auth.oidc.ca_file) == f"{mount['mountPath']}/bundle.pem"
    volume = next(
        v for v in deployment(objects)["spec"]["template"]["spec"]["volumes"] if v["name"] == "oidc-ca"
    )
    kind = "secret" if source == "secretName" else "configMap"
    name_key = "secretName" if kind == "secret" else "name"
    assert volume[kind][name_key] == "corp-ca"
    assert volume[kind]["items"] == [{"key": "bundle.pem", "path": "bundle.pem"}]
    notes = _chart().render({"auth": {"oidc": oidc}}, name=RELEASE, namespace=NAMESPACE)[
        "openshell/templates/NOTES.txt"
    ]
    assert "UNAUTHENTICATED" not in notes
    with pytest.raises(helm.HelmError, match=r"not both"):
        render({"auth": {"oidc": {**oidc, "caBundle": {"secretName": "a", "configMapName": "b"}}}})
    with pytest.raises(helm.HelmError, match=r"issuerUrl is empty"):
        render({"auth": {"oidc": {"caBundle": {"secretName": "a"}}}})


def test_supervisor_identity_values_reach_the_gateway(tmp_path: Path) -> None:
    values = {
        "auth": {"supervisors": {"kubernetesAudience": "gw.example", "kubernetesTokenExpirySeconds": 1800}},
        "gateway": {"sessions": {"registerUnknown": True}},
    }
    config = load_config(render(values), tmp_path)
    assert config.auth.supervisors.kubernetes_audience == "gw.example"
    assert config.auth.supervisors.kubernetes_token_expiry_s == 1800
    # ... and the sandbox pods the gateway builds carry that token.
    token = projected_token(sandbox_pod(config))
    assert token["audience"] == "gw.example" and token["expirationSeconds"] == 1800
    defaults = projected_token(sandbox_pod(load_config(rendered("default-values.yaml"), tmp_path)))
    assert defaults["audience"] == "openshell-gateway" and defaults["expirationSeconds"] == 3600
    assert config.sessions.register_unknown is True
    # The gateway's own bounds hold in the chart's schema too (a bad value fails before install,
    # instead of a gateway that crash-loops on its config).
    with pytest.raises(helm.HelmError):
        render({"auth": {"supervisors": {"kubernetesTokenExpirySeconds": "soon"}}})
    for key, low, high in (("kubernetesTokenExpirySeconds", 600, 86400), ("tokenTtlSeconds", 60, 604800)):
        for bad in (low - 1, high + 1):
            with pytest.raises(helm.HelmError, match=key):
                render({"auth": {"supervisors": {key: bad}}})
        for good in (low, high):
            load_config(render({"auth": {"supervisors": {key: good}}}), tmp_path)


def _reviewed_as(config: GatewayConfig, username: str) -> str:
    """What the gateway's verifier (its username for this config, as kubernetes_verifier builds it)
    makes of an authenticated TokenReview of sandbox t's pod token issued to ``username``."""
    kubernetes = config.drivers.kubernetes
    status = TokenReviewStatus(
        authenticated=True,
        audiences=[config.auth.supervisors.kubernetes_audience],
        user=UserInfo(username=username, extra={EXTRA_POD_NAME: [pod_name("t")], EXTRA_POD_UID: ["u"]}),
    )
    try:
        principal = principal_of_review(
            status,
            token="t.o.k",
            audience=config.auth.supervisors.kubernetes_audience,
            username=service_account_username(kubernetes.namespace, kubernetes.pod.service_account_name),
            expires_at=0.0,
        )
    except CredentialRefused as exc:
        return exc.reason.value
    return principal.sandbox_id


def test_sandbox_pods_run_as_a_service_account_of_their_own(tmp_path: Path) -> None:
    # By default the chart creates the sandbox pods' ServiceAccount in the sandbox namespace, mounts
    # no API token from it and binds it to nothing; the gateway builds every sandbox pod with it and
    # takes pod tokens of that ServiceAccount only, so a pod of the namespace's `default` (or any
    # other) ServiceAccount speaks for no sandbox.
    objects = rendered("default-values.yaml")
    config = load_config(objects, tmp_path)
    account = one(objects, "ServiceAccount", component="sandbox")
    sandbox_ns = config.drivers.kubernetes.namespace
    assert account["metadata"] == {
        **account["metadata"],
        "name": "openshell-sandbox",
        "namespace": sandbox_ns,
    }
    assert account["automountServiceAccountToken"] is False
    validate(account)
    assert config.drivers.kubernetes.pod.service_account_name == "openshell-sandbox"
    pod = sandbox_pod(config)
    assert pod["spec"]["serviceAccountName"] == "openshell-sandbox"
    assert pod["spec"]["automountServiceAccountToken"] is False
    for binding in of_kind(objects, "RoleBinding") + of_kind(objects, "ClusterRoleBinding"):
        assert all(s["name"] != "openshell-sandbox" for s in binding["subjects"]), binding
    # Pods naming a ServiceAccount need no verb of the gateway's: its Role stays pods (and what TLS
    # and pull Secrets add), never serviceaccounts.
    assert all("serviceaccounts" not in rule["resources"] for rule in sandbox_rbac(objects)["rules"])
    own = f"system:serviceaccount:{sandbox_ns}:openshell-sandbox"
    assert _reviewed_as(config, own) == "t"
    for other in ("default", "openshell-gateway", "someone"):
        assert _reviewed_as(config, f"system:serviceaccount:{sandbox_ns}:{other}") == "not_a_sandbox"
    assert Refusal.NOT_A_SANDBOX.value == "not_a_sandbox"
    # Every values file: the sandbox pods' ServiceAccount is one the chart made, in their namespace.
    for name in CI_FILES:
        made = one(rendered(name), "ServiceAccount", component="sandbox")
        built = load_config(rendered(name), tmp_path).drivers.kubernetes
        assert (made["metadata"]["name"], made["metadata"]["namespace"]) == (
            built.pod.service_account_name,
            built.namespace,
        ), name
    # A ServiceAccount of the operator's: the chart creates none and the gateway takes its tokens only.
    named = render({"sandboxes": {"pod": {"serviceAccountName": "agents"}}})
    assert [a["metadata"]["name"] for a in of_kind(named, "ServiceAccount")] == ["openshell-gateway"]
    config = load_config(named, tmp_path)
    assert sandbox_pod(config)["spec"]["serviceAccountName"] == "agents"
    assert _reviewed_as(config, f"system:serviceaccount:{sandbox_ns}:agents") == "t"
    assert _reviewed_as(config, own) == "not_a_sandbox"
    # The name follows fullnameOverride.
    renamed = render({"fullnameOverride": "os"})
    assert one(renamed, "ServiceAccount", component="sandbox")["metadata"]["name"] == "os-sandbox"


def test_oidc_client_team_and_issuer_values_reach_the_gateway(tmp_path: Path) -> None:
    # Defaults: the gateway's own (the CLI's client only, teams under /teams/, https issuers only).
    defaults = load_config(rendered("default-values.yaml"), tmp_path).auth.oidc
    assert defaults.allowed_clients == ["openshell-cli"]
    assert defaults.team_prefix == "/teams/"
    assert defaults.allow_insecure_issuer is False
    oidc = {
        "issuerUrl": "https://keycloak.example.com/realms/openshell",
        "allowedClients": ["openshell-cli", "openshell-ui"],
        "teamPrefix": "/groups/teams/",
    }
    config = load_config(render({"auth": {"oidc": oidc}}), tmp_path).auth.oidc
    assert config.allowed_clients == ["openshell-cli", "openshell-ui"]
    assert config.team_prefix == "/groups/teams/"
    # Empty: any client, every group a team (the values' empty list and string reach the gateway).
    config = load_config(
        render({"auth": {"oidc": {**oidc, "allowedClients": [], "teamPrefix": ""}}}), tmp_path
    )
    assert config.auth.oidc.allowed_clients == [] and config.auth.oidc.team_prefix == ""
    # An http issuer on a non-loopback host: the gateway refuses it unless allowInsecureIssuer.
    insecure = {"auth": {"oidc": {**oidc, "issuerUrl": "http://keycloak.test:8080/realms/openshell"}}}
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(render(insecure)))
    assert gateway_cli.main(["config", "check", str(path)]) != 0
    insecure["auth"]["oidc"]["allowInsecureIssuer"] = True
    assert load_config(render(insecure), tmp_path).auth.oidc.allow_insecure_issuer is True
    with pytest.raises(helm.HelmError, match="allowedClients"):
        render({"auth": {"oidc": {"allowedClients": "openshell-cli"}}})


def test_the_schema_refuses_the_api_servers_audiences_as_the_gateway_does(tmp_path: Path) -> None:
    for bad in (
        "",
        " openshell-gateway",
        "openshell-gateway ",
        "https://kubernetes.default.svc",
        "https://kubernetes.default.svc.cluster.local",
        "kubernetes",
        "api",
    ):
        with pytest.raises(helm.HelmError, match="kubernetesAudience"):
            render({"auth": {"supervisors": {"kubernetesAudience": bad}}})
        # ... which the gateway would refuse at start anyway.
        config = render({"auth": {"supervisors": {"kubernetesAudience": "openshell-gateway"}}})
        text = config_text(config).replace(
            "kubernetes_audience: openshell-gateway", f"kubernetes_audience: {bad!r}"
        )
        path = tmp_path / "gateway.yaml"
        path.write_text(text)
        assert gateway_cli.main(["config", "check", str(path)]) != 0, bad
    for good in ("openshell-gateway", "https://gateway.example/openshell", "gw api"):
        config = load_config(render({"auth": {"supervisors": {"kubernetesAudience": good}}}), tmp_path)
        assert config.auth.supervisors.kubernetes_audience == good


def test_tls_from_an_existing_secret_serves_both_listeners_and_supervisors_speak_it(tmp_path: Path) -> None:
    objects = render({"tls": {"enabled": True, "existingSecret": "gw-tls", "clientAuth": True}})
    config = load_config(objects, tmp_path)
    mount = next(m for m in gateway_container(objects)["volumeMounts"] if m["name"] == "tls")
    volume = next(v for v in deployment(objects)["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "gw-tls" and "subPath" not in mount  # renewals reach the pod
    for tls in (config.grpc.tls, config.http.tls):
        assert str(tls.cert_file) == f"{mount['mountPath']}/tls.crt"
        assert str(tls.key_file) == f"{mount['mountPath']}/tls.key"
    # mTLS on the API only: sandbox pods hold no client certificate (their pod token is their
    # identity), so requiring one on gRPC would refuse every supervisor at the handshake.
    assert str(config.http.tls.client_ca_file) == f"{mount['mountPath']}/ca.crt"
    assert config.grpc.tls.client_ca_file is None
    # Supervisors verify the gateway against the Secret's ca.crt: the driver publishes that file
    # (a ConfigMap in the sandbox namespace, which the Role lets it write by name) and sandbox pods
    # mount it and speak TLS against it.
    assert str(config.drivers.kubernetes.supervisor.gateway_ca_file) == f"{mount['mountPath']}/ca.crt"
    assert [
        r for r in sandbox_rbac(objects)["rules"] if r["resources"] == ["configmaps"]
    ] == gateway_ca_rules()
    pod = sandbox_pod(config)
    argv = pod["spec"]["containers"][0]["command"]
    assert "gateway.tls=true" in argv and "gateway.ca_file=/var/run/openshell/tls/ca.crt" in argv
    ca_volume = next(v for v in pod["spec"]["volumes"] if "configMap" in v)
    assert ca_volume["configMap"]["name"] == GATEWAY_CA_CONFIGMAP
    assert pss.violations(pod["spec"], "restricted") == []
    validate(pod)
    # Without TLS: no CA, no ConfigMap permission.
    assert (
        load_config(rendered("default-values.yaml"), tmp_path).drivers.kubernetes.supervisor.gateway_ca_file
        is None
    )
    assert not [
        r for r in sandbox_rbac(rendered("default-values.yaml"))["rules"] if r["resources"] == ["configmaps"]
    ]
    # The probes stay on the plain ops listener.
    assert gateway_container(objects)["readinessProbe"]["httpGet"]["port"] == "ops"
    plain = load_config(render({"tls": {"enabled": True, "existingSecret": "gw-tls"}}), tmp_path)
    assert plain.grpc.tls.cert_file is not None and plain.grpc.tls.client_ca_file is None
    with pytest.raises(helm.HelmError, match=r"tls\.existingSecret"):
        render({"tls": {"enabled": True}})


def test_production_values_publish_grpc_only_and_let_sandboxes_out_on_443(tmp_path: Path) -> None:
    objects = rendered("production-values.yaml")
    config = load_config(objects, tmp_path)
    assert config.auth.oidc.issuer_url and config.auth.oidc.ca_file is not None
    assert config.grpc.tls.cert_file is not None and config.http.tls.cert_file is not None
    # The private issuer's CA reaches the supervisors (the Certificate's Secret's ca.crt).
    assert config.drivers.kubernetes.supervisor.gateway_ca_file is not None
    external = one(objects, "Service", component="gateway-external")
    assert external["spec"]["type"] == "LoadBalancer"
    assert [p["name"] for p in external["spec"]["ports"]] == ["grpc"]
    assert one(objects, "Certificate")["spec"]["issuerRef"]["name"] == "internal-ca"
    policy = sandbox_policy(objects)
    assert egress_allows_address(policy, "203.0.113.7", 443)
    assert not egress_allows_address(policy, "203.0.113.7", 80)
    assert not egress_allows_address(policy, "169.254.169.254", 443)
    assert not egress_allows_address(policy, "10.20.0.5", 443)


def test_tls_from_cert_manager_renders_a_certificate_the_gateway_mounts(tmp_path: Path) -> None:
    issuer = {"name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    values = {
        "tls": {
            "enabled": True,
            "certManager": {"enabled": True, "issuerRef": issuer, "dnsNames": ["gw.example"]},
        },
        "gateway": {"service": {"clusterIP": "10.96.0.70"}},
    }
    objects = render(values)
    certificate = one(objects, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["spec"]["issuerRef"] == issuer
    service = one(objects, "Service", component="gateway")["metadata"]["name"]
    assert f"{service}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    assert "gw.example" in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["ipAddresses"] == ["10.96.0.70"]
    volume = next(v for v in deployment(objects)["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    assert load_config(objects, tmp_path).grpc.tls.cert_file is not None
    with pytest.raises(helm.HelmError, match=r"issuerRef"):
        render({"tls": {"enabled": True, "certManager": {"enabled": True}}})


def test_notes_never_print_the_database_url() -> None:
    notes = _chart().render({}, name=RELEASE, namespace=NAMESPACE)["openshell/templates/NOTES.txt"]
    assert "Database: SQLite at /var/lib/openshell/gateway.db" in notes
    assert "sqlite+aiosqlite" not in notes


def test_the_migration_job_gets_the_gateways_extra_volumes_and_environment() -> None:
    values = ci_values("external-postgresql-values.yaml")
    values["gateway"] = {
        "extraVolumes": [{"name": "db-ca", "secret": {"secretName": "db-ca"}}],
        "extraVolumeMounts": [{"name": "db-ca", "mountPath": "/etc/db-ca", "readOnly": True}],
        "extraEnv": [{"name": "PGSSLMODE", "value": "verify-full"}],
        "extraEnvFrom": [{"secretRef": {"name": "db-extra"}}],
    }
    objects = render(values)
    spec = one(objects, "Job", component="migration")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert {"name": "db-ca", "secret": {"secretName": "db-ca"}} in spec["volumes"]
    assert {"name": "db-ca", "mountPath": "/etc/db-ca", "readOnly": True} in container["volumeMounts"]
    gateway = gateway_container(objects)
    assert container["env"] == _without_replica_id(gateway["env"])
    assert container["envFrom"] == gateway["envFrom"]
    validate(one(objects, "Job", component="migration"))


def test_a_partial_pod_security_context_renders_valid_yaml() -> None:
    values: dict[str, Any] = {
        "database": {"existingSecret": "openshell-database"},
        "gateway": {"podSecurityContext": {"runAsNonRoot": None, "seccompProfile": None}},
    }
    objects = render(values)  # yaml.safe_load_all raises on "{}" followed by keys
    expected = {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}
    for where, spec in pod_specs(objects):
        if not where.startswith("Pod/"):
            assert spec["securityContext"] == expected, where
    nothing = {k: None for k in ("runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile")}
    values["gateway"]["podSecurityContext"] = nothing
    for where, spec in pod_specs(render(values)):
        if not where.startswith("Pod/"):
            assert spec.get("securityContext", {}) == {}, where


# --- refusals -----------------------------------------------------------------------------------------


def test_sqlite_with_several_replicas_is_refused() -> None:
    with pytest.raises(helm.HelmError, match="shared database"):
        render({"gateway": {"replicas": 2}})
    with pytest.raises(helm.HelmError, match="shared database"):
        render({"gateway": {"autoscaling": {"enabled": True}}})


def test_creating_the_release_namespace_is_refused() -> None:
    with pytest.raises(helm.HelmError, match="createNamespace"):
        render(
            {"sandboxes": {"namespace": NAMESPACE, "createNamespace": True, "allowReleaseNamespace": True}}
        )


def test_sandboxes_in_the_release_namespace_are_refused_unless_explicitly_allowed() -> None:
    # They would reach the gateway's unauthenticated HTTP API and live under its Role.
    for values in (
        {"sandboxes": {"namespace": NAMESPACE, "createNamespace": False}},
        {"sandboxes": {"namespace": NAMESPACE}},
    ):
        with pytest.raises(helm.HelmError, match="must not share the gateway's namespace"):
            render(values)
    allowed = render(
        {"sandboxes": {"namespace": NAMESPACE, "createNamespace": False, "allowReleaseNamespace": True}}
    )
    assert sandbox_rbac(allowed)["metadata"]["namespace"] == NAMESPACE
    assert of_kind(allowed, "Namespace") == []


def test_a_database_url_outside_a_secret_is_refused() -> None:
    url = "postgresql+asyncpg://openshell:hunter2@db.example:5432/openshell"
    with pytest.raises(helm.HelmError, match=r"database\.existingSecret"):
        render({"database": {"url": url}})
    # With the Secret the url value is ignored: it appears nowhere, NOTES.txt included.
    values = {"database": {"url": url, "existingSecret": "openshell-database"}}
    manifests = _chart().render(values, name=RELEASE, namespace=NAMESPACE)
    assert not [path for path, text in manifests.items() if "hunter2" in text]
    assert "Database: from Secret openshell-database key url" in manifests["openshell/templates/NOTES.txt"]


def test_network_policy_refuses_to_cut_off_prometheus_and_the_gateway_api() -> None:
    with pytest.raises(helm.HelmError, match=r"networkPolicy\.metricsFrom"):
        render({"networkPolicy": {"enabled": True}, "monitoring": {"serviceMonitor": {"enabled": True}}})
    gateway_api = {"enabled": True, "parentRefs": [{"name": "shared"}]}
    with pytest.raises(helm.HelmError, match=r"networkPolicy\.gatewayApiFrom"):
        render({"networkPolicy": {"enabled": True}, "gatewayApi": gateway_api})


def test_the_schema_rejects_unknown_keys_and_wrong_types() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    for bad in (
        {"gateway": {"replica": 2}},  # misspelt
        {"unknownTopLevel": True},
        {"gateway": {"replicas": "two"}},
        {"sandboxes": {"supervisor": {"injection": "sidecar"}}},  # not in the enum
    ):
        with pytest.raises(helm.HelmError):
            render(bad)
        report = helm.lint(CHART, bad, namespace=NAMESPACE)
        assert report["errors"] or any(m["severity"] >= 3 for m in report["messages"]), bad
    # null is a type only where documented (Helm itself drops null keys before checking).
    validator = jsonschema.Draft7Validator(schema)
    defaults = _chart().merge_values({})
    assert validator.is_valid({**defaults, "tests": {**defaults["tests"], "runAsUser": None}})
    assert not validator.is_valid({**defaults, "gateway": {**defaults["gateway"], "replicas": None}})


@pytest.mark.parametrize(
    ("values", "missing"),
    [
        ({"gateway": {"image": {"repository": None}}}, "/gateway/image': missing property 'repository'"),
        ({"gateway": {"replicas": None}}, "/gateway': missing property 'replicas'"),
        ({"sandboxes": {"supervisor": None}}, "/sandboxes': missing property 'supervisor'"),
        ({"database": {"migrationJob": {"serviceAccount": {"create": None}}}}, "missing property 'create'"),
    ],
)
def test_a_required_value_set_to_null_is_refused_by_name(values: dict[str, Any], missing: str) -> None:
    """Issue 24 point 5: Helm drops a key set to null (`--set key=null`, an empty `key:` in a values
    file) from the merged values; the schema requires every value whose type has no null, so the
    install fails naming it instead of rendering `<nil>` into an image reference or a config."""
    with pytest.raises(helm.HelmError) as refused:
        render(values)
    assert missing in str(refused.value)
    # Where null is a documented value it is accepted.
    render({"tests": {"runAsUser": None}, "gateway": {"drainSeconds": None}})


# --- registries (issue 24 point 4) ------------------------------------------------------------------

#: The images a default install runs: the gateway (and migration Job), the supervisor, the test pod.
UPSTREAM_GATEWAY = "ghcr.io/openshell/openshell-gateway:0.1.0"
UPSTREAM_SUPERVISOR = "ghcr.io/openshell/openshell-supervisor:0.1.0"


def every_image(objects: list[Obj], tmp_path: Path) -> dict[str, str]:
    """Every image reference the release makes a pod pull, by where: its own pods' containers and
    the sandbox pods the gateway builds from the rendered config (the supervisor image)."""
    images = {}
    for where, spec in pod_specs(objects):
        for container in spec.get("initContainers", []) + spec["containers"]:
            images[f"{where}/{container['name']}"] = container["image"]
    config = load_config(objects, tmp_path)
    images["sandbox/supervisor"] = config.drivers.kubernetes.supervisor.image
    return images


def pull_secrets_by_pod(objects: list[Obj], tmp_path: Path) -> dict[str, list[str]]:
    found = {
        where: [s["name"] for s in spec.get("imagePullSecrets", [])] for where, spec in pod_specs(objects)
    }
    pod = sandbox_pod(load_config(objects, tmp_path))
    found["sandbox"] = [s["name"] for s in pod["spec"].get("imagePullSecrets", [])]
    return found


def test_global_image_registry_moves_every_image_with_one_setting(tmp_path: Path) -> None:
    """Issue 24 point 4: global.imageRegistry was accepted and ignored; now it is the one setting of
    a mirror that keeps the upstream paths, for every image: the gateway, the migration Job, the
    supervisor image the gateway puts in sandbox pods (through its config) and the test pod."""
    values = {**ci_values("external-postgresql-values.yaml"), "global": {"imageRegistry": "mirror.corp:5000"}}
    objects = render(values)
    (tmp_path / "upstream").mkdir()
    upstream = every_image(render(ci_values("external-postgresql-values.yaml")), tmp_path / "upstream")
    images = every_image(objects, tmp_path)
    assert set(images) == set(upstream)
    assert {k for k in images if k.startswith("Job/")} and {k for k in images if k.startswith("Pod/")}
    assert images == {
        where: {
            UPSTREAM_GATEWAY: "mirror.corp:5000/openshell/openshell-gateway:0.1.0",
            UPSTREAM_SUPERVISOR: "mirror.corp:5000/openshell/openshell-supervisor:0.1.0",
            "busybox:1.36": "mirror.corp:5000/library/busybox:1.36",
        }[image]
        for where, image in upstream.items()
    }
    # The sandbox pods the gateway builds pull the supervisor from the mirror, by either injection.
    for injection in ("image-volume", "init-container"):
        (tmp_path / injection).mkdir()
        injected = {**values, "sandboxes": {"supervisor": {"injection": injection}}}
        pod = json.dumps(sandbox_pod(load_config(render(injected), tmp_path / injection)))
        assert "mirror.corp:5000/openshell/openshell-supervisor:0.1.0" in pod
        assert "ghcr.io" not in pod
    # Sandbox images are the requests' own: never rewritten.
    default_image = render({**values, "sandboxes": {"pod": {"defaultImage": "registry.example.com/a:1"}}})
    (tmp_path / "default").mkdir()
    assert load_config(default_image, tmp_path / "default").drivers.kubernetes.pod.default_image == (
        "registry.example.com/a:1"
    )


@pytest.mark.parametrize(
    ("registry", "reference", "expected"),
    [
        (
            "mirror.corp",
            "ghcr.io/openshell/openshell-gateway",
            "mirror.corp/openshell/openshell-gateway:0.1.0",
        ),
        ("mirror.corp/", "localhost/gw", "mirror.corp/gw:0.1.0"),
        ("mirror.corp/ghcr", "ghcr.io/o/gw", "mirror.corp/ghcr/o/gw:0.1.0"),
        ("mirror.corp", "registry:5000/o/gw", "mirror.corp/o/gw:0.1.0"),
        ("mirror.corp", "openshell/gw", "mirror.corp/openshell/gw:0.1.0"),  # Docker Hub, a user's
        ("mirror.corp", "gw", "mirror.corp/library/gw:0.1.0"),  # Docker Hub, an official image
        ("", "ghcr.io/o/gw", "ghcr.io/o/gw:0.1.0"),
    ],
)
def test_the_registry_is_replaced_as_container_runtimes_parse_it(
    registry: str, reference: str, expected: str
) -> None:
    values = {"global": {"imageRegistry": registry}, "gateway": {"image": {"repository": reference}}}
    assert gateway_container(render(values))["image"] == expected
    digest = "sha256:" + "0" * 64
    pinned = {**values, "gateway": {"image": {"repository": reference, "digest": digest}}}
    assert gateway_container(render(pinned))["image"] == expected.rsplit(":", 1)[0] + "@" + digest


def test_the_airgapped_values_pull_everything_from_the_mirror(tmp_path: Path) -> None:
    objects = rendered("airgapped-values.yaml")
    images = every_image(objects, tmp_path)
    assert all(image.startswith("mirror.internal:5000/") for image in images.values()), images
    (tmp_path / "secrets").mkdir()
    found = pull_secrets_by_pod(objects, tmp_path / "secrets")
    assert found and all(names == ["mirror-pull"] for names in found.values()), found
    notes = notes_of(ci_values("airgapped-values.yaml"))
    assert "global.imagePullSecrets mirror-pull: each must exist in openshell" in notes
    assert "and in openshell-sandboxes (sandbox pods)" in notes
    assert "Every image of the chart comes from mirror.internal:5000" in notes


def test_global_pull_secrets_reach_every_pod_sandboxes_included(tmp_path: Path) -> None:
    """global.imagePullSecrets goes to every pod the release makes pull an image, the sandbox pods
    (which pull the supervisor image) through the gateway's config; items are names or {name}."""
    values = {
        **ci_values("external-postgresql-values.yaml"),
        "global": {"imagePullSecrets": ["mirror", {"name": "corp"}]},
        "gateway": {"imagePullSecrets": [{"name": "gw"}, "mirror"]},
        "sandboxes": {"pod": {"imagePullSecrets": ["agents"]}},
    }
    objects = render(values)
    found = pull_secrets_by_pod(objects, tmp_path)
    assert {k.split("/")[0] for k in found} == {"Deployment", "Job", "Pod", "sandbox"}
    for where, names in found.items():
        if where.startswith(("Deployment/", "Job/")):
            assert names == ["mirror", "corp", "gw"], where  # global first, each once
        elif where == "sandbox":
            assert names == ["mirror", "corp", "agents"]
        else:
            assert names == ["mirror", "corp"], where  # the helm test pod
    # The gateway reads the sandbox pods' pull Secrets (image commands): by name, all of them.
    settings = load_config(objects, tmp_path).drivers.kubernetes
    assert pull_secret_rule(settings.pod.image_pull_secrets) in sandbox_rbac(objects)["rules"]
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job", "Pod"):
            validate(obj)
    # Without any, no pod names one (and the Role reads no Secret).
    plain = render({})
    assert all("imagePullSecrets" not in spec for _, spec in pod_specs(plain))


@pytest.mark.parametrize(
    "bad",
    [
        {"global": {"imagePullSecrets": [{"secret": "x"}]}},
        {"global": {"imagePullSecrets": [{"name": ""}]}},
        {"gateway": {"imagePullSecrets": [3]}},
        {"sandboxes": {"pod": {"imagePullSecrets": [{"name": "a", "namespace": "b"}]}}},
        {"global": {"imagePullSecrets": "mirror"}},
    ],
)
def test_pull_secret_items_are_typed(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError) as refused:
        render(bad)
    assert "imagePullSecrets" in str(refused.value)


def test_global_takes_a_parents_other_keys() -> None:
    """Helm hands `global` to every chart with its parent's keys: unknown ones are not refused."""
    render({"global": {"storageClass": "fast", "imageRegistry": ""}})


# --- chart conventions (issue 24 point 5) ----------------------------------------------------------


def test_the_migration_job_has_its_own_service_account_pod_metadata_and_priority() -> None:
    values = {
        **ci_values("external-postgresql-values.yaml"),
        "gateway": {"priorityClassName": "gateway-priority"},
    }
    values["database"] = {
        **values["database"],
        "migrationJob": {
            "podAnnotations": {"sidecar.istio.io/inject": "false"},
            "podLabels": {"db-client": "true"},
            "serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "db@p.iam"}},
        },
    }
    objects = render(values)
    job = one(objects, "Job", component="migration")
    template = job["spec"]["template"]
    assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert template["metadata"]["labels"]["db-client"] == "true"
    spec = template["spec"]
    assert spec["priorityClassName"] == "gateway-priority"  # the gateway's unless its own
    account = one(objects, "ServiceAccount", component="migration")
    assert spec["serviceAccountName"] == account["metadata"]["name"] == "openshell-migrate"
    assert spec["serviceAccountName"] != deployment(objects)["spec"]["template"]["spec"]["serviceAccountName"]
    assert account["automountServiceAccountToken"] is False and spec["automountServiceAccountToken"] is False
    # A hook too, created before the Job (the release's objects do not exist yet at pre-install).
    annotations = account["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(annotations["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    assert annotations["iam.gke.io/gcp-service-account"] == "db@p.iam"
    validate(account)
    validate(job)
    # Its own priority class; an existing account; the namespace's default.
    values["database"]["migrationJob"] = {
        "priorityClassName": "batch",
        "serviceAccount": {"create": False, "name": "db-migrator"},
    }
    objects = render(values)
    spec = one(objects, "Job", component="migration")["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "batch" and spec["serviceAccountName"] == "db-migrator"
    assert of_kind([o for o in objects if o["metadata"]["name"] == "db-migrator"], "ServiceAccount") == []
    values["database"]["migrationJob"] = {"serviceAccount": {"create": False}}
    spec = one(render(values), "Job", component="migration")["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "default"


def test_extra_objects_are_rendered_through_tpl() -> None:
    values = {
        "extraObjects": [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "{{ .Release.Name }}-extra", "namespace": "{{ .Release.Namespace }}"},
                "data": {"sandboxes": '{{ include "openshell.sandboxNamespace" . }}'},
            },
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {{ .Release.Name }}-pull\n"
            "type: kubernetes.io/dockerconfigjson\nstringData:\n  .dockerconfigjson: '{}'\n",
        ]
    }
    objects = render(values)
    extra = next(o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"] == "openshell-extra")
    assert extra["metadata"]["namespace"] == NAMESPACE and extra["data"] == {
        "sandboxes": "openshell-sandboxes"
    }
    secret = one(objects, "Secret")
    assert secret["metadata"]["name"] == "openshell-pull"
    validate(extra)
    validate(secret)


@pytest.mark.parametrize("name", CI_FILES)
def test_common_labels_and_annotations_reach_every_object(name: str) -> None:
    values = {
        **ci_values(name),
        "commonLabels": {"team": "agents"},
        "commonAnnotations": {"owner": "platform"},
    }
    objects = render(values)
    checked = 0
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"]["labels"]["team"] == "agents", where
        assert obj["metadata"]["annotations"]["owner"] == "platform", where
        checked += 1
    assert checked >= 15
    # An object's own annotations stay (and win over the common ones).
    service = render(
        {
            "commonAnnotations": {"a": "common", "b": "common"},
            "gateway": {"service": {"annotations": {"b": "own"}}},
        }
    )
    assert one(service, "Service", component="gateway")["metadata"]["annotations"] == {
        "a": "common",
        "b": "own",
    }


def test_ingress_values_route_grpc_and_admit_the_controller(tmp_path: Path) -> None:
    objects = rendered("ingress-values.yaml")
    (ingress,) = of_kind(objects, "Ingress")
    validate(ingress)
    assert ingress["metadata"]["name"] == "openshell-gateway-grpc"
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "grpc.openshell.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    service = one(objects, "Service", component="gateway")
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "grpc"}}
    assert "grpc" in {p["name"] for p in service["spec"]["ports"]}
    # The gateway's NetworkPolicy admits the controller's pods on the routed port only.
    policy = next(
        p
        for p in of_kind(objects, "NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "gateway"
    )
    controller = ci_values("ingress-values.yaml")["networkPolicy"]["ingressFrom"]
    rules = [r for r in policy["spec"]["ingress"] if r["from"] == controller]
    assert [r["ports"] for r in rules] == [[{"port": 7070, "protocol": "TCP"}]]
    # Off by default.
    assert of_kind(render({}), "Ingress") == []


def test_ingress_refusals() -> None:
    base = {
        "ingress": {"enabled": True, "grpc": {"host": "g.example.com"}},
        "networkPolicy": {"enabled": False},
    }
    render(base)
    for values, message in (
        ({"ingress": {"enabled": True}}, "ingress.grpc.enabled needs ingress.grpc.host"),
        ({**base, "networkPolicy": {"enabled": True}}, "networkPolicy.ingressFrom"),
        (
            {**base, "ingress": {**base["ingress"], "http": {"enabled": True, "host": "api.example.com"}}},
            "ingress.http.enabled without auth.oidc.issuerUrl",
        ),
        ({**base, "ingress": {"enabled": True, "grpc": {"enabled": False}}}, "needs ingress.grpc.enabled or"),
    ):
        with pytest.raises(helm.HelmError, match=re.escape(message)):
            render(values)
    # With OIDC the API may be routed: a second Ingress, on the http port.
    oidc = {
        **base,
        "auth": {"oidc": {"issuerUrl": "https://id.example.com/realms/x"}},
        "ingress": {**base["ingress"], "http": {"enabled": True, "host": "api.example.com"}},
    }
    names = {i["metadata"]["name"]: i for i in of_kind(render(oidc), "Ingress")}
    assert set(names) == {"openshell-gateway-grpc", "openshell-gateway-http"}
    http = names["openshell-gateway-http"]
    assert http["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] == {"name": "http"}
    assert "nginx.ingress.kubernetes.io/backend-protocol" not in http["metadata"]["annotations"]


def test_the_sandbox_namespace_is_created_or_only_referenced() -> None:
    """sandboxes.createNamespace false: the chart references the namespace (its Role, RoleBinding,
    ServiceAccount and NetworkPolicy go in it) and creates none. True on a cluster where it exists
    and is not the release's: the install is refused by name (lookup; tested on a live cluster in
    tests/e2e/test_chart_adoption.py; here, offline, the lookup finds nothing and the Namespace renders)."""
    existing = render({"sandboxes": {"namespace": "agents", "createNamespace": False}})
    assert of_kind(existing, "Namespace") == []
    in_it = {
        f"{o['kind']}/{o['metadata']['name']}" for o in existing if o["metadata"].get("namespace") == "agents"
    }
    assert {"Role/openshell-gateway-sandboxes", "RoleBinding/openshell-gateway-sandboxes"} <= in_it
    assert "ServiceAccount/openshell-sandbox" in in_it
    template = (CHART / "templates" / "namespace.yaml").read_text()
    assert 'include "openshell.refuseForeign"' in template


def test_runtime_classes_are_created_only_when_asked() -> None:
    assert of_kind(render({}), "RuntimeClass") == []
    # Pointing sandboxes at a RuntimeClass the cluster already has (GKE Sandbox's gvisor) creates none.
    assert of_kind(render({"sandboxes": {"pod": {"runtimeClassName": "gvisor"}}}), "RuntimeClass") == []


def test_the_opt_in_sandbox_test_reaches_the_api_as_the_values_say() -> None:
    """tests.sandbox (issue 24 point 5): a second `helm test` pod, the gateway image running
    files/sandbox-test.py (tests/integration/test_chart_sandbox_test.py runs it against a gateway)."""
    assert not [p for p in of_kind(render({}), "Pod") if p["metadata"]["name"].endswith("-test-sandbox")]
    objects = rendered("production-values.yaml")  # OIDC, TLS from cert-manager
    (pod,) = [p for p in of_kind(objects, "Pod") if p["metadata"]["name"] == "openshell-test-sandbox"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == gateway_container(objects)["image"]
    env = {e["name"]: e for e in container["env"]}
    assert env["OPENSHELL_TEST_API"]["value"] == "https://openshell-gateway.openshell.svc:7080"
    assert env["OPENSHELL_TEST_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "openshell-test-token", "key": "token"}
    }
    assert env["OPENSHELL_TEST_CA_FILE"]["value"] == "/etc/openshell-test/tls/ca.crt"
    assert env["OPENSHELL_TEST_IMAGE"]["value"] == "busybox:1.36"
    assert json.loads(env["OPENSHELL_TEST_COMMAND"]["value"]) == ["sleep", "120"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "openshell-gateway-tls"
    configmap = next(
        c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == "openshell-test-sandbox"
    )
    assert configmap["data"]["sandbox-test.py"] == (CHART / "files" / "sandbox-test.py").read_text()
    assert int(configmap["metadata"]["annotations"]["helm.sh/hook-weight"]) < 0  # before the pod
    # The test pod is admitted to the API by the default httpFrom (a pod of the release namespace).
    labels = pod["metadata"]["labels"]
    policy = next(
        p
        for p in of_kind(objects, "NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "gateway"
    )
    api_rules = [r for r in policy["spec"]["ingress"] if {"port": 7080, "protocol": "TCP"} in r["ports"]]
    assert any(admitted_by(rule, labels) for rule in api_rules)
    # ... and by a rule of its own where httpFrom names other peers only.
    narrow = render(
        {
            **ci_values("production-values.yaml"),
            "networkPolicy": {
                **ci_values("production-values.yaml")["networkPolicy"],
                "httpFrom": [{"ipBlock": {"cidr": "192.0.2.1/32"}}],
            },
        }
    )
    policy = next(
        p
        for p in of_kind(narrow, "NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "gateway"
    )
    api_rules = [r for r in policy["spec"]["ingress"] if {"port": 7080, "protocol": "TCP"} in r["ports"]]
    assert [admitted_by(rule, labels) for rule in api_rules] == [False, True]
    assert not any(
        admitted_by(rule, {**labels, "app.kubernetes.io/component": "sandbox"}) for rule in api_rules
    )
    # With a defaultImage the gateway's default is used; an image of its own wins.
    default = render(
        {
            "tests": {"sandbox": {"enabled": True}},
            "auth": {"allowUnauthenticatedApi": True},
            "sandboxes": {"pod": {"defaultImage": "registry.example.com/agent:1"}},
        }
    )
    (pod,) = [p for p in of_kind(default, "Pod") if p["metadata"]["name"] == "openshell-test-sandbox"]
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["OPENSHELL_TEST_IMAGE"] == "" and env["OPENSHELL_TEST_API"].startswith("http://")
    assert "OPENSHELL_TEST_TOKEN" not in env


def admitted_by(rule: Obj, labels: dict[str, str]) -> bool:
    """Whether an ingress rule admits a pod of the release namespace with ``labels``."""
    for peer in rule.get("from", []):
        if "namespaceSelector" in peer or "ipBlock" in peer:
            continue
        if selects(peer.get("podSelector", {}), labels):
            return True
    return False


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "tests.sandbox.enabled needs the HTTP API reachable from the test pod"),
        (
            {"auth": {"oidc": {"issuerUrl": "https://id.example.com/realms/x"}}},
            "needs tests.sandbox.tokenSecret.name",
        ),
        (
            {
                "auth": {"allowUnauthenticatedApi": True},
                "tls": {"enabled": True, "existingSecret": "tls", "clientAuth": True},
            },
            "cannot run with tls.clientAuth",
        ),
    ],
)
def test_the_sandbox_test_is_refused_where_it_cannot_reach_the_api(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render({**values, "tests": {"sandbox": {"enabled": True}}})


# --- packaging and release ----------------------------------------------------------------------------


def test_the_package_ships_the_ci_values_and_the_artifact_hub_metadata(tmp_path: Path) -> None:
    archive = Path(helm.package(CHART, destination=tmp_path))
    packaged = helm.Chart.load_archive(archive.read_bytes())
    names = {f["name"] for f in packaged.files}
    assert {f"ci/{name}" for name in CI_FILES} <= names  # the README names them
    assert {"CHANGELOG.md", "README.md"} <= names
    meta = packaged.metadata
    assert meta["icon"].startswith("https://") and meta["icon"].endswith("/helm/openshell/icon.svg")
    assert (CHART / "icon.svg").read_text().startswith("<svg")
    assert meta["maintainers"] and all(m["name"] for m in meta["maintainers"])


def test_artifact_hub_annotations_match_the_values_and_the_changelog() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    annotations = chart["annotations"]
    images = {i["image"] for i in yaml.safe_load(annotations["artifacthub.io/images"])}
    defaults = render({})
    assert images == {c["image"] for _, spec in pod_specs(defaults) for c in spec["containers"]} | {
        f"ghcr.io/openshell/openshell-supervisor:{chart['appVersion']}"
    }
    changes = yaml.safe_load(annotations["artifacthub.io/changes"])
    changelog = (CHART / "CHANGELOG.md").read_text()
    section = changelog.split(f"\n## {chart['version']}\n", 1)[1].split("\n## ", 1)[0]
    entries = []
    kind = ""
    for line in section.splitlines():
        if line.startswith("### "):
            kind = line[4:].strip().lower()
        elif line.startswith("- "):
            entries.append({"kind": kind, "description": line[2:].strip()})
    assert changes == entries


def test_tests_use_the_helm_version_the_release_uses() -> None:
    """The release workflow's Helm is the one these tests run (helm-python-sdk bundles the Helm SDK)."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "release-chart.yml").read_text())
    steps = workflow["jobs"]["publish"]["steps"]
    (setup,) = [s for s in steps if str(s.get("uses", "")).startswith("azure/setup-helm@")]
    assert setup["with"]["version"] == helm.helm_sdk_version()
    # The publisher (helm/publish.py) runs the same helm-python-sdk as these tests.
    installs = " ".join(s.get("run", "") for s in steps if "pip install" in s.get("run", ""))
    assert f'"helm-python-sdk=={importlib.metadata.version("helm-python-sdk")}"' in installs
    assert any("helm/publish.py" in s.get("run", "") for s in steps)


# --- generated files ----------------------------------------------------------------------------------


def _generate_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("helm_generate", ROOT / "helm" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_schema_and_readme_are_current() -> None:
    done = subprocess.run(
        [sys.executable, "helm/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readme_lists_every_value() -> None:
    generate = _generate_module()
    _, values = generate.parse_values((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    for value in values:
        assert f"| `{'.'.join(value.path)}` |" in readme
    assert len(values) > 50


def test_generate_refuses_undocumented_values_and_bad_enums() -> None:
    generate = _generate_module()
    with pytest.raises(generate.ValuesError, match=r"a\.b"):
        generate.parse_values("a:\n  # -- documented\n  c: 1\n  b: 2\n")
    with pytest.raises(generate.ValuesError, match="directly above"):
        generate.parse_values("# -- separated by a blank line\n\nx: 1\n")
    with pytest.raises(generate.ValuesError, match="not one of"):
        generate.parse_values("# -- mode\n# @enum -- a, b\nx: c\n")
    with pytest.raises(generate.ValuesError, match="no type"):
        generate.parse_values("# -- nothing to infer from\nx: null\n")
    with pytest.raises(generate.ValuesError, match="does not match"):
        generate.parse_values("# -- name\n# @pattern -- ^\\S+$\nx: ''\n")
    with pytest.raises(generate.ValuesError, match="refused"):
        generate.parse_values("# -- name\n# @notin -- a, b\nx: b\n")
    _, (audience,) = generate.parse_values("# -- name\n# @pattern -- ^\\S+$\n# @notin -- a, b\nx: c\n")
    assert generate.build_schema([audience])["properties"]["x"] == {
        "type": "string",
        "description": "name",
        "default": "c",
        "pattern": "^\\S+$",
        "not": {"enum": ["a", "b"]},
    }
    _, values = generate.parse_values("# -- (int|null) maybe\nx: null\n# -- a map\ny:\n  z: 1\n")
    schema = generate.build_schema(values)
    assert schema["properties"]["x"]["type"] == ["integer", "null"]
    assert schema["properties"]["y"]["type"] == "object"
    # A stale file is reported: --check compares with what it would write.
    readme = generate.build_readme(values, "9.9.9")
    assert "| `x` | int or null | `null` | maybe |" in readme


def _without_replica_id(env: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The gateway container's environment but its replica id (the migration Job has no lease)."""
    return [item for item in env if item["name"] != "OPENSHELL_GATEWAY_HA__REPLICA_ID"]


def test_each_gateway_replica_is_named_after_its_pod() -> None:
    objects = render({})
    env = gateway_container(objects)["env"]
    assert {
        "name": "OPENSHELL_GATEWAY_HA__REPLICA_ID",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    } in env


def test_the_notes_say_how_the_supervisor_is_injected() -> None:
    # auto (the default): where to read the gateway's choice.
    auto = notes_of({})
    assert "Supervisor injection: auto" in auto and "/status" in auto and "port-forward" in auto
    pinned = notes_of({"sandboxes": {"supervisor": {"injection": "image-volume"}}})
    assert "needs the ImageVolume feature" in pinned and "/status" not in pinned
    assert "Supervisor injection: init-container" in notes_of(
        {"sandboxes": {"supervisor": {"injection": "init-container"}}}
    )


PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def test_sandbox_metrics_reach_the_pods_the_podmonitor_and_only_the_named_scrapers(tmp_path: Path) -> None:
    values = {
        "sandboxes": {"supervisor": {"metrics": {"enabled": True, "port": 9470}}},
        "networkPolicy": {"sandboxes": {"metricsFrom": [PROMETHEUS]}},
        "monitoring": {"podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}}},
    }
    objects = render(values)
    # The gateway builds every sandbox pod with the port, under the labels the PodMonitor selects.
    pod = sandbox_pod(load_config(objects, tmp_path))
    [container] = pod["spec"]["containers"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9470, "protocol": "TCP"}]
    (monitor,) = of_kind(objects, "PodMonitor")
    assert monitor["metadata"]["namespace"] == pod["metadata"]["namespace"] == f"{NAMESPACE}-sandboxes"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    # The sandboxes' policy admits the named scrapers, on that port only.
    policy = one(objects, "NetworkPolicy", component="sandbox-policy")
    assert policy["spec"]["ingress"] == [{"from": [PROMETHEUS], "ports": [{"port": 9470, "protocol": "TCP"}]}]
    # Off (the default): no port, no monitor, no ingress at all.
    default = render({})
    assert "ports" not in sandbox_pod(load_config(default, tmp_path))["spec"]["containers"][0]
    assert of_kind(default, "PodMonitor") == []
    assert one(default, "NetworkPolicy", component="sandbox-policy")["spec"]["ingress"] == []


def test_sandbox_metrics_without_their_scrapers_or_a_monitor_without_metrics_are_refused() -> None:
    with pytest.raises(helm.HelmError, match=r"networkPolicy\.sandboxes\.metricsFrom"):
        render({"sandboxes": {"supervisor": {"metrics": {"enabled": True}}}})
    with pytest.raises(helm.HelmError, match=r"needs sandboxes\.supervisor\.metrics\.enabled"):
        render({"monitoring": {"podMonitor": {"enabled": True}}})
