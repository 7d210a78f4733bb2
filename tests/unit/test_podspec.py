"""The sandbox pod the gateway builds: valid for the Kubernetes schema, locked down, wired right."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from pydantic import ValidationError

from gateway.auth.kubernetes_tokens import sandbox_of_pod
from gateway.config import GatewayConfig, KubernetesDriverSettings, SupervisorAuthSettings
from gateway.drivers import podspec
from gateway.drivers.podspec import PodSpecError, SandboxRequest, build_sandbox_pod
from imagevolume import bundle, oci  # a cross-check only: the gateway never imports imagevolume
from supervisor import install
from tests.support.kubelet_expansion import expand, expand_env

VERSIONS = ("1.34.0", "1.35.0", "1.37.0")


def settings(**overrides: Any) -> KubernetesDriverSettings:
    return KubernetesDriverSettings.model_validate({"gateway_address": "gw.openshell.svc:7070", **overrides})


def request(**overrides: Any) -> SandboxRequest:
    args: dict[str, Any] = {"sandbox_id": "sb-1", "command": ["python3", "agent.py"], "image": "agent:1"}
    return SandboxRequest(**{**args, **overrides})


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]


@pytest.mark.parametrize("injection", ["image-volume", "init-container"])
@pytest.mark.parametrize("version", VERSIONS)
def test_pods_validate_against_the_kubernetes_schema(injection: str, version: str) -> None:
    s = settings(
        supervisor={"injection": injection},
        pod={
            "runtime_class_name": "gvisor",
            "node_selector": {"openshell.io/pool": "sandboxes"},
            "tolerations": [{"key": "sandbox", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "kata", "operator": "In", "values": ["yes"]}]}
                        ]
                    }
                }
            },
            "image_pull_secrets": ["regcred"],
            "service_account_name": "sandbox",
            "priority_class_name": "low",
        },
    )
    pod = build_sandbox_pod(s, request(env={"A": "1"}))
    kubernetes_validate.validate(pod, version, strict=True)
    # And a broken pod does fail (the validation is live): a string where an integer belongs.
    broken = {**pod, "spec": {**pod["spec"], "terminationGracePeriodSeconds": "thirty"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_the_wiring() -> None:
    pod = build_sandbox_pod(settings(supervisor={"settings": {"journal.max_bytes": "1000000"}}), request())
    (container,) = pod["spec"]["containers"]
    assert container["command"] == [
        "/opt/openshell/bin/openshell-supervisor", "run",
        "--sandbox-id", "sb-1",
        "--gateway", "gw.openshell.svc:7070",
        "--journal-dir", "/var/lib/openshell/journal",
        "--set", "gateway.credential_file=/var/run/secrets/openshell/token",
        "--set", "gateway.credential_refresh=false",
        "--set", "journal.max_bytes=1000000",
        "--", "python3", "agent.py",
    ]  # fmt: skip
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/opt/openshell"] == {
        "name": "openshell-supervisor",
        "mountPath": "/opt/openshell",
        "readOnly": True,
    }
    assert mounts["/var/run/secrets/openshell"]["readOnly"] is True
    assert not mounts["/var/lib/openshell/journal"].get("readOnly")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["openshell-supervisor"]["image"] == {
        "reference": "ghcr.io/openshell/openshell-supervisor:0.1.0",
        "pullPolicy": "IfNotPresent",
    }
    assert volumes["openshell-journal"] == {"name": "openshell-journal", "emptyDir": {"sizeLimit": "512Mi"}}
    assert volumes["openshell-tmp"]["emptyDir"]["sizeLimit"] == "256Mi"
    # The credential is the pod's projected ServiceAccount token, with our audience and expiry
    # (renewed by the kubelet), never a Secret; the API server's own token is not mounted.
    assert volumes["openshell-credential"] == {
        "name": "openshell-credential",
        "projected": {
            "defaultMode": 0o440,
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": "openshell-gateway",
                        "expirationSeconds": 3600,
                        "path": "token",
                    }
                }
            ],
        },
    }
    assert not any("secret" in v for v in pod["spec"]["volumes"])
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert "initContainers" not in pod["spec"]
    assert pod["metadata"]["annotations"][podspec.ANNOTATION_SANDBOX_ID] == "sb-1"


def test_the_init_container_fallback_copies_into_what_the_sandbox_mounts() -> None:
    pod = build_sandbox_pod(settings(supervisor={"injection": "init-container"}), request())
    (init,) = pod["spec"]["initContainers"]
    assert init["image"] == "ghcr.io/openshell/openshell-supervisor:0.1.0"
    assert init["command"] == ["/bin/openshell-supervisor", "install", "/opt/openshell"]
    assert "env" not in init, "the launcher sets what the tree needs at the image's root"
    assert {"name": "openshell-supervisor", "mountPath": "/opt/openshell"} in init["volumeMounts"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "image" not in volumes["openshell-supervisor"] and "emptyDir" in volumes["openshell-supervisor"]


def test_the_launcher_matches_the_trees_layout() -> None:
    for root in ("/opt/openshell", "/elsewhere", ""):
        assert podspec.launcher(root) == bundle.launcher(root)
    assert podspec.TREE_ENTRY == oci.ENTRY == install.ENTRY
    assert set(install.TREE_ENTRIES) >= {
        bundle.LAUNCHER.split("/")[0],
        bundle.LOADER.split("/")[0],
        bundle.PYTHON.split("/")[0],
        bundle.SITE,
        bundle.ENTRY,
        "bundle.json",
    }
    # The launcher executes what bundle.direct() says (imagevolume/launcher.c, read here).
    source = (bundle.REPO / "imagevolume" / "launcher.c").read_text()
    for part in ('"/lib/ld.so"', '"--library-path"', '"/lib"', '"/bin/python3"', '"-I"', '"-S"'):
        assert part in source, part
    assert bundle.direct("/r") == [
        "/r/lib/ld.so", "--library-path", "/r/lib", "/r/bin/python3", "-I", "-S", "/r/openshell-supervisor.py"
    ]  # fmt: skip


def test_every_container_is_locked_down_whatever_the_config() -> None:
    s = settings(
        supervisor={"injection": "init-container"},
        pod={"read_only_root_filesystem": False, "run_as_user": 1000, "fs_group": None},
    )
    pod = build_sandbox_pod(s, request())
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "fsGroup" not in pod["spec"]["securityContext"]
    for c in containers(pod):
        ctx = c["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["privileged"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["runAsUser"] == 1000 and ctx["runAsNonRoot"] is True
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is False
    # Without fsGroup the token file must be world-readable for the non-root uid to read it.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["openshell-credential"]["projected"]["defaultMode"] == 0o444


def test_uid_zero_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="run_as_user"):
        settings(pod={"run_as_user": 0})


def test_bad_quantities_are_refused_with_their_key() -> None:
    with pytest.raises(ValueError, match=r"limits\.memory: '2 gigs' is not a Kubernetes quantity"):
        settings(pod={"resources": {"limits": {"memory": "2 gigs"}}})
    with pytest.raises(ValueError, match="tmp_size_limit"):
        settings(supervisor={"tmp_size_limit": "lots"})


def test_kind_kubernetes_needs_a_gateway_address() -> None:
    with pytest.raises(ValueError, match="gateway_address must be set"):
        GatewayConfig.model_validate({"drivers": {"kind": "kubernetes"}})


@pytest.mark.parametrize(
    ("req", "s", "message"),
    [
        (request(command=[]), settings(), "command is empty"),
        (request(image=None), settings(), "default_image is not set"),
        (request(sandbox_id="Not_Valid"), settings(), "not a valid name"),
        (request(sandbox_id="a" * 235), settings(), "at most 234"),
        (request(env={"A=B": "x"}), settings(), "not a valid variable name"),
        (request(env={"OPENSHELL_SUPERVISOR_LOG_LEVEL": "error"}), settings(), "reserved"),
        (request(env={"ld_preload": "/x.so"}), settings(), "reserved"),
        (request(), KubernetesDriverSettings(), "gateway_address is empty"),
    ],
)
def test_requests_that_cannot_become_pods_say_why(
    req: SandboxRequest, s: KubernetesDriverSettings, message: str
) -> None:
    with pytest.raises(PodSpecError, match=message):
        build_sandbox_pod(s, req)


def test_the_default_image_fills_in() -> None:
    pod = build_sandbox_pod(settings(pod={"default_image": "busybox:1"}), request(image=None))
    assert pod["spec"]["containers"][0]["image"] == "busybox:1"


def test_long_ids_get_a_digest_label_and_keep_the_id_in_an_annotation() -> None:
    long_id = "a" * 100
    pod = build_sandbox_pod(settings(), request(sandbox_id=long_id))
    label = pod["metadata"]["labels"][podspec.LABEL_SANDBOX]
    assert len(label) <= 63 and label.startswith("h-")
    assert pod["metadata"]["annotations"][podspec.ANNOTATION_SANDBOX_ID] == long_id
    assert pod["metadata"]["name"] == "sandbox-" + long_id


def test_the_token_has_the_configured_audience_and_expiry() -> None:
    auth = SupervisorAuthSettings(kubernetes_audience="gw.example", kubernetes_token_expiry_s=900)
    pod = build_sandbox_pod(settings(), request(), auth=auth)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (source,) = volumes["openshell-credential"]["projected"]["sources"]
    assert source == {
        "serviceAccountToken": {"audience": "gw.example", "expirationSeconds": 900, "path": "token"}
    }
    for version in VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


def test_a_gateway_ca_file_is_mounted_from_its_configmap_and_named_to_the_supervisor() -> None:
    # The gateway's private CA (a .svc name has no public certificate): the driver publishes it as a
    # ConfigMap; the pod mounts it read-only and the supervisor speaks TLS verified against it.
    pod = build_sandbox_pod(settings(supervisor={"gateway_ca_file": "/etc/openshell/tls/ca.crt"}), request())
    (container,) = pod["spec"]["containers"]
    argv = container["command"]
    ca_path = f"{podspec.GATEWAY_CA_DIR}/{podspec.GATEWAY_CA_KEY}"
    assert argv[argv.index("gateway.tls=true") - 1] == "--set"
    assert argv[argv.index(f"gateway.ca_file={ca_path}") - 1] == "--set"
    assert argv.index(f"gateway.ca_file={ca_path}") < argv.index("--")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == podspec.GATEWAY_CA_DIR)
    assert mount["readOnly"] is True and "subPath" not in mount  # updates reach the pod
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"] == {
        "name": podspec.GATEWAY_CA_CONFIGMAP,
        "items": [{"key": podspec.GATEWAY_CA_KEY, "path": podspec.GATEWAY_CA_KEY}],
    }
    for version in VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
    # Without it: no mount, no TLS setting of the driver's own.
    plain = build_sandbox_pod(settings(), request())
    assert not [v for v in plain["spec"]["volumes"] if "configMap" in v]
    assert not [a for a in plain["spec"]["containers"][0]["command"] if a.startswith("gateway.ca_file=")]


def test_publishing_the_gateway_ca_adds_only_its_configmap_rules() -> None:
    from gateway.drivers.kubernetes import RBAC_RULES, gateway_ca_rules, rbac_rules

    assert rbac_rules(settings()) == [dict(r) for r in RBAC_RULES]
    with_ca = rbac_rules(settings(supervisor={"gateway_ca_file": "/ca.crt"}))
    assert with_ca == [*[dict(r) for r in RBAC_RULES], *gateway_ca_rules()]
    named = [r for r in gateway_ca_rules() if "resourceNames" in r]
    assert named == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "verbs": ["get", "update", "patch"],
            "resourceNames": [podspec.GATEWAY_CA_CONFIGMAP],
        }
    ]
    # Unnamed: create only (RBAC cannot limit a create by name).
    assert [r["verbs"] for r in gateway_ca_rules() if "resourceNames" not in r] == [["create"]]


def test_the_longest_id_names_a_pod_kubernetes_accepts() -> None:
    longest = "a" * podspec.MAX_SANDBOX_ID
    pod = build_sandbox_pod(settings(), request(sandbox_id=longest))
    assert len(pod["metadata"]["name"]) <= 253
    for version in VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


@pytest.mark.parametrize("sandbox_id", ["sb-1", "a", "a" * podspec.MAX_SANDBOX_ID, "x.y-z"])
def test_a_pod_name_gives_its_sandbox_back(sandbox_id: str) -> None:
    assert sandbox_of_pod(podspec.pod_name(sandbox_id)) == sandbox_id


@pytest.mark.parametrize(
    "name", ["sandbox-", "sb-1", "other-sb-1", "sandbox-Not_Valid", "sandbox-" + "a" * 300, "Sandbox-sb-1"]
)
def test_a_pod_no_sandbox_could_have_gives_none(name: str) -> None:
    assert sandbox_of_pod(name) is None


def test_the_command_and_env_reach_the_process_as_written() -> None:
    """The kubelet expands ``$(NAME)`` and ``$$`` in a container's command and env values: the
    sandbox's own command and env are escaped so that they arrive as the caller wrote them (the
    real kubelet showed it: tests/e2e/test_chart_ha_on_node.py)."""
    env = {"GREETING": "expanded", "PRICE": "$5 $(GREETING) $$"}
    command = ["sh", "-c", "echo '$$ $(GREETING)' $((1+1)) $"]
    pod = build_sandbox_pod(settings(), request(command=command, env=env))
    (main,) = pod["spec"]["containers"]
    given = main["command"][main["command"].index("--") + 1 :]
    assert [expand(arg, env) for arg in given] == command
    values = expand_env([e for e in main["env"] if e["name"] in env])
    assert values == env


def test_the_supervisors_metrics_port_is_served_and_declared_only_when_set() -> None:
    off = build_sandbox_pod(settings(), request())["spec"]["containers"][0]
    assert "ports" not in off and not any(arg.startswith("http.") for arg in off["command"])
    on = build_sandbox_pod(settings(supervisor={"metrics_port": 9469}), request())["spec"]["containers"][0]
    assert on["ports"] == [{"name": "metrics", "containerPort": 9469, "protocol": "TCP"}]
    before_the_command = on["command"][: on["command"].index("--")]
    assert "http.enabled=true" in before_the_command and "http.listen=0.0.0.0:9469" in before_the_command
    # The operator's settings come after, so they may still move it.
    moved = build_sandbox_pod(
        settings(supervisor={"metrics_port": 9469, "settings": {"http.listen": "0.0.0.0:9500"}}), request()
    )["spec"]["containers"][0]["command"]
    assert moved.index("http.listen=0.0.0.0:9500") > moved.index("http.listen=0.0.0.0:9469")
    with pytest.raises(ValidationError):
        settings(supervisor={"metrics_port": 0})
