"""Upstream's supervisor configuration calls on a real gateway with supervisor auth required
(GatewayProcess(auth=True); sandboxes created through its API with the local driver, so each has
the token the gateway minted for it in its file): each call is a sandbox principal's for its own
sandbox, the policy the supervisor syncs is kept and answered back as its own, and the gateway
says plainly that it has no settings, providers or inference routes."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import jwt
import pytest

from openshell_wire.v1 import inference_pb2 as inf
from openshell_wire.v1 import inference_pb2_grpc as inf_grpc
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import sandbox_pb2 as sb
from tests.integration.test_supervisor_auth import AGENT, Env, Metadata, _http, bearer, claims, refused
from tests.support.procs import GatewayProcess, wait_until


class Config(Env):
    def __init__(self, gateway: GatewayProcess) -> None:
        super().__init__(gateway)
        self.inference = inf_grpc.InferenceStub(self.channel)

    def start(self, sandbox_id: str) -> tuple[int, Metadata]:
        """Create the sandbox (not waiting for its agent) and return its generation and token."""
        status, body = _http(
            "POST",
            f"{self.api}/sandboxes",
            {"id": sandbox_id, "command": [sys.executable, "-u", "-c", AGENT]},
        )
        assert status == 201, body
        generation = int(body["generation"])

        def token() -> str | None:
            if not self.token_file(sandbox_id).exists():
                return None
            text = self.token_of(sandbox_id)
            if not text or jwt.decode(text, options={"verify_signature": False})["gen"] != generation:
                return None
            return text

        return generation, bearer(wait_until(token, timeout=20, what=f"{sandbox_id}'s token file"))

    def config(self, sandbox_id: str, metadata: Metadata | None) -> sb.GetSandboxConfigResponse:
        answer: sb.GetSandboxConfigResponse = self.stub.GetSandboxConfig(
            sb.GetSandboxConfigRequest(sandbox_id=sandbox_id), metadata=metadata, timeout=10
        )
        return answer

    def sync(self, request: pb.UpdateConfigRequest, metadata: Metadata | None) -> pb.UpdateConfigResponse:
        answer: pb.UpdateConfigResponse = self.stub.UpdateConfig(request, metadata=metadata, timeout=10)
        return answer

    def answered(self) -> dict[str, float]:
        """openshell_gateway_upstream_config_calls_total by method."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.gateway.ops_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        counts: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("openshell_gateway_upstream_config_calls_total{"):
                method = line.split('method="', 1)[1].split('"', 1)[0]
                counts[method] = float(line.rsplit(" ", 1)[1])
        return counts

    def policy_events(self, sandbox_id: str) -> list[dict[str, Any]]:
        """The sandbox's policy events, as its logs in the HTTP API show them."""
        with urllib.request.urlopen(f"{self.api}/sandboxes/{sandbox_id}/logs?tail=1000", timeout=10) as r:
            events = json.loads(r.read())["events"]
        return [e for e in events if (e.get("data") or {}).get("target") == "openshell.policy"]


def policy(*read_only: str) -> sb.SandboxPolicy:
    return sb.SandboxPolicy(
        version=1,
        filesystem=sb.FilesystemPolicy(include_workdir=True, read_only=list(read_only), read_write=["/tmp"]),
        landlock=sb.LandlockPolicy(compatibility="best_effort"),
    )


def error_of(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    try:
        call(*args, timeout=10, **kwargs)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{call} accepted")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Config]:
    gateway = GatewayProcess(tmp_path_factory.mktemp("upstream-config") / "gateway", auth=True)
    gateway.start()
    environment = Config(gateway)
    try:
        yield environment
    finally:
        environment.channel.close()
        gateway.stop()


def test_every_call_needs_the_sandbox_s_own_credential(env: Config) -> None:
    _, own = env.start("cfg-a")
    _, other = env.start("cfg-b")
    calls: list[tuple[Any, Any]] = [
        (env.stub.GetSandboxConfig, sb.GetSandboxConfigRequest(sandbox_id="cfg-a")),
        (env.stub.UpdateConfig, pb.UpdateConfigRequest(name="cfg-a", policy=policy())),
        (
            env.stub.ReportPolicyStatus,
            pb.ReportPolicyStatusRequest(sandbox_id="cfg-a", version=1, status=pb.POLICY_STATUS_LOADED),
        ),
        (
            env.stub.GetSandboxProviderEnvironment,
            pb.GetSandboxProviderEnvironmentRequest(
                sandbox_id="cfg-a", supports_static_credential_bindings=True
            ),
        ),
    ]
    before = env.answered()
    for call, request in calls:
        refused(error_of(call, request), grpc.StatusCode.UNAUTHENTICATED, "missing")
        refused(error_of(call, request, metadata=other), grpc.StatusCode.PERMISSION_DENIED, "other_sandbox")
    refused(
        error_of(env.inference.GetInferenceBundle, inf.GetInferenceBundleRequest()),
        grpc.StatusCode.UNAUTHENTICATED,
        "missing",
    )
    assert env.answered() == before  # refused calls are not counted as answered
    # Nothing of those refused calls was stored: still no policy, no policy events.
    assert not env.config("cfg-a", own).HasField("policy")
    assert env.policy_events("cfg-a") == []
    # The sandbox's own token gets the answers of a gateway with no providers and no inference.
    environment = env.stub.GetSandboxProviderEnvironment(
        pb.GetSandboxProviderEnvironmentRequest(sandbox_id="cfg-a", supports_static_credential_bindings=True),
        metadata=own,
        timeout=10,
    )
    assert not environment.environment and environment.provider_env_revision == 0
    assert not environment.static_credential_bindings and not environment.dynamic_credentials
    bundle = env.inference.GetInferenceBundle(inf.GetInferenceBundleRequest(), metadata=own, timeout=10)
    assert not bundle.routes and bundle.revision and bundle.generated_at_ms > 0
    again = env.inference.GetInferenceBundle(inf.GetInferenceBundleRequest(), metadata=own, timeout=10)
    assert again.revision == bundle.revision
    answered = env.answered()
    assert answered.get("GetInferenceBundle", 0) - before.get("GetInferenceBundle", 0) == 2
    assert (
        answered.get("GetSandboxProviderEnvironment", 0) - before.get("GetSandboxProviderEnvironment", 0) == 1
    )


def test_the_policy_synced_by_the_supervisor_is_answered_back_as_its_own(env: Config) -> None:
    _, own = env.start("cfg-c")
    before = env.config("cfg-c", own)
    assert not before.HasField("policy") and before.version == 0
    assert before.policy_source == sb.POLICY_SOURCE_UNSPECIFIED
    assert before.workspace == "" and before.policy_validation_failure_mode == "fail_closed"
    assert not before.settings and not before.supervisor_middleware_services

    first = env.sync(pb.UpdateConfigRequest(name="cfg-c", policy=policy("/usr")), own)
    assert first.version == 1 and len(first.policy_hash) == 64
    answer = env.config("cfg-c", own)
    assert answer.policy == policy("/usr")
    assert (answer.version, answer.policy_hash, answer.config_revision) == (1, first.policy_hash, 1)
    assert answer.policy_source == sb.POLICY_SOURCE_SANDBOX
    # The same policy again: the same version and hash; a stable answer (the poll does nothing).
    repeat = env.sync(pb.UpdateConfigRequest(name="cfg-c", policy=policy("/usr")), own)
    assert (repeat.version, repeat.policy_hash) == (1, first.policy_hash)
    assert env.config("cfg-c", own) == answer
    changed = env.sync(pb.UpdateConfigRequest(name="cfg-c", policy=policy("/usr", "/lib")), own)
    assert changed.version == 2 and changed.policy_hash != first.policy_hash
    assert env.config("cfg-c", own).policy == policy("/usr", "/lib")

    env.stub.ReportPolicyStatus(
        pb.ReportPolicyStatusRequest(sandbox_id="cfg-c", version=2, status=pb.POLICY_STATUS_LOADED),
        metadata=own,
        timeout=10,
    )
    env.stub.ReportPolicyStatus(
        pb.ReportPolicyStatusRequest(
            sandbox_id="cfg-c", version=2, status=pb.POLICY_STATUS_FAILED, load_error="rego: bad rule"
        ),
        metadata=own,
        timeout=10,
    )
    unspecified = error_of(
        env.stub.ReportPolicyStatus, pb.ReportPolicyStatusRequest(sandbox_id="cfg-c", version=2), metadata=own
    )
    assert unspecified.code() == grpc.StatusCode.INVALID_ARGUMENT

    events = env.policy_events("cfg-c")
    assert [(e["message"], e["data"]["level"]) for e in events] == [
        (f"policy version 1 synced by the sandbox's supervisor (sha256 {first.policy_hash[:12]}…)", "info"),
        (f"policy version 1 synced by the sandbox's supervisor (sha256 {first.policy_hash[:12]}…)", "info"),
        (f"policy version 2 synced by the sandbox's supervisor (sha256 {changed.policy_hash[:12]}…)", "info"),
        ("policy version 2 loaded by the sandbox's supervisor", "info"),
        ("policy version 2 failed to load in the sandbox's supervisor: rego: bad rule", "error"),
    ]
    assert events[2]["data"]["fields"] == {"version": "2", "policy_hash": changed.policy_hash}
    assert events[4]["data"]["fields"] == {"version": "2", "status": "failed", "load_error": "rego: bad rule"}


def test_update_config_refuses_what_is_not_a_policy_sync(env: Config) -> None:
    _, own = env.start("cfg-d")
    base = {"name": "cfg-d", "policy": policy()}
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"setting_key": "ocsf_json_enabled", "setting_value": sb.SettingValue(bool_value=True)},
            "no settings",
        ),
        ({"delete_setting": True, "setting_key": "x"}, "no settings"),
        ({"global": True}, "no global policy"),
        ({"merge_operations": [pb.PolicyMergeOperation()]}, "does not merge"),
        ({"expected_resource_version": 4}, "no resource versions"),
        ({"annotations": {"team": "x"}}, "no annotations"),
        ({"workspace": "ws"}, "no workspaces"),
        ({"policy": None}, "no policy"),
        ({"policy": policy("/p" * 600_000)}, "more than this gateway keeps"),
    ]
    for change, words in cases:
        fields = {**base, **change}
        if fields["policy"] is None:
            del fields["policy"]
        error = error_of(env.stub.UpdateConfig, pb.UpdateConfigRequest(**fields), metadata=own)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (change, error.details())
        assert words in (error.details() or ""), (change, error.details())
    nameless = error_of(env.stub.UpdateConfig, pb.UpdateConfigRequest(policy=policy()), metadata=own)
    assert nameless.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing of them was kept.
    assert not env.config("cfg-d", own).HasField("policy")
    assert env.policy_events("cfg-d") == []


def test_a_recreated_sandbox_starts_without_a_policy_and_its_earlier_token_writes_none(env: Config) -> None:
    _, old = env.start("cfg-e")
    assert env.sync(pb.UpdateConfigRequest(name="cfg-e", policy=policy("/usr")), old).version == 1
    env.delete("cfg-e")
    generation, new = env.start("cfg-e")
    assert generation == 2
    fresh = env.config("cfg-e", new)
    assert not fresh.HasField("policy") and fresh.version == 0
    # A token of the earlier life is refused and writes nothing (the store's write is conditional
    # on the generation too, for one that was bound just before the id was created again).
    refused(
        error_of(
            env.stub.UpdateConfig, pb.UpdateConfigRequest(name="cfg-e", policy=policy("/old")), metadata=old
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "stale",
    )
    kid, pem = env.signing_key()
    forged_old = bearer(
        jwt.encode(claims("cfg-e", generation=1), pem, algorithm="EdDSA", headers={"kid": kid})
    )
    stale = error_of(
        env.stub.GetSandboxConfig, sb.GetSandboxConfigRequest(sandbox_id="cfg-e"), metadata=forged_old
    )
    refused(stale, grpc.StatusCode.PERMISSION_DENIED, "stale")
    assert not env.config("cfg-e", new).HasField("policy")
    assert env.gateway.query("SELECT policy, policy_version FROM sandboxes WHERE id = 'cfg-e'") == [(None, 0)]
    assert env.sync(pb.UpdateConfigRequest(name="cfg-e", policy=policy("/new")), new).version == 1


def restrictive_default() -> sb.SandboxPolicy:
    """The shape of upstream's restrictive default (tests/compat/upstream_supervisor_peer.py)."""
    return sb.SandboxPolicy(
        version=1,
        filesystem=sb.FilesystemPolicy(
            include_workdir=True, read_only=["/usr", "/lib", "/etc"], read_write=["/tmp", "/dev/null"]
        ),
        landlock=sb.LandlockPolicy(compatibility="best_effort"),
        process=sb.ProcessPolicy(run_as_user="sandbox", run_as_group="sandbox"),
    )


def test_the_sandbox_s_credential_cannot_widen_what_its_supervisor_enforces_at_start(env: Config) -> None:
    """Upstream's gateway's limits on a sandbox's own sync: once a policy is stored, Landlock and
    process stay and paths are only added; never root or '..' or a read-write '/'. Refused syncs
    leave the stored policy and the events as they were; the supervisor's own flow (discovery,
    then enrichment) still passes."""
    _, own = env.start("cfg-f")
    root = restrictive_default()
    root.process.run_as_user = "root"
    first_root = error_of(
        env.stub.UpdateConfig, pb.UpdateConfigRequest(name="cfg-f", policy=root), metadata=own
    )
    assert first_root.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "policy contains unsafe content: run_as_user must be 'sandbox'" in (first_root.details() or "")
    assert not env.config("cfg-f", own).HasField("policy")

    first = env.sync(pb.UpdateConfigRequest(name="cfg-f", policy=restrictive_default()), own)
    assert first.version == 1
    enriched = restrictive_default()
    enriched.filesystem.read_only.append("/sandbox")
    second = env.sync(pb.UpdateConfigRequest(name="cfg-f", policy=enriched), own)
    assert second.version == 2

    def edited(edit: Any) -> sb.SandboxPolicy:
        policy_ = sb.SandboxPolicy()
        policy_.CopyFrom(enriched)
        edit(policy_)
        return policy_

    cases: list[tuple[sb.SandboxPolicy, str]] = [
        (
            edited(lambda p: setattr(p.process, "run_as_user", "1000")),
            "process policy cannot be changed on a live sandbox (applied at startup)",
        ),
        (
            edited(lambda p: setattr(p.landlock, "compatibility", "hard_requirement")),
            "landlock policy cannot be changed on a live sandbox (applied at startup)",
        ),
        (
            edited(lambda p: p.filesystem.read_only.remove("/sandbox")),
            "filesystem read_only path '/sandbox' cannot be removed on a live sandbox",
        ),
        (
            edited(lambda p: setattr(p.filesystem, "include_workdir", False)),
            "filesystem include_workdir cannot be changed on a live sandbox",
        ),
        (edited(lambda p: p.filesystem.read_write.append("/")), "read-write path is overly broad: /"),
        (edited(lambda p: p.filesystem.read_only.append("/x/../root")), "'..' traversal component"),
        (edited(lambda p: setattr(p.process, "run_as_group", "0")), "process policy cannot be changed"),
    ]
    for policy_, words in cases:
        error = error_of(
            env.stub.UpdateConfig, pb.UpdateConfigRequest(name="cfg-f", policy=policy_), metadata=own
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (words, error.details())
        assert words in (error.details() or ""), (words, error.details())
    kept = env.config("cfg-f", own)
    assert (kept.policy, kept.version, kept.policy_hash) == (enriched, 2, second.policy_hash)
    assert len(env.policy_events("cfg-f")) == 2  # the two syncs taken, none of the refused


def test_the_inference_bundle_needs_a_valid_credential_only(env: Config) -> None:
    """GetInferenceBundle checks the token's signature and expiry, not the sandbox's row (it is
    the same empty bundle for everyone): a deleted sandbox's token still gets it, while its
    configuration calls are refused."""
    _, own = env.start("cfg-g")
    env.delete("cfg-g")
    bundle = env.inference.GetInferenceBundle(inf.GetInferenceBundleRequest(), metadata=own, timeout=10)
    assert not bundle.routes and bundle.revision
    refused(
        error_of(env.stub.GetSandboxConfig, sb.GetSandboxConfigRequest(sandbox_id="cfg-g"), metadata=own),
        grpc.StatusCode.PERMISSION_DENIED,
        "stale",
    )
    forged = error_of(
        env.inference.GetInferenceBundle, inf.GetInferenceBundleRequest(), metadata=bearer("not-a-jwt")
    )
    assert forged.code() == grpc.StatusCode.UNAUTHENTICATED, forged.details()
