"""What our gateway answers to the configuration calls of upstream OpenShell's supervisor.

Upstream's supervisor (``openshell-sandbox``) asks its gateway, before it starts its agent and then
on a poll, for its sandbox's policy and settings (``GetSandboxConfig``), its providers' environment
(``GetSandboxProviderEnvironment``) and its inference routes (``Inference.GetInferenceBundle``);
it syncs the policy it found itself (``UpdateConfig``) and reports whether it loaded one
(``ReportPolicyStatus``). Answered UNIMPLEMENTED, the first of them makes it exit. The rules of
the answers live here, in one place; :class:`gateway.server.OpenShellService` authenticates each
call (a sandbox principal's, for its own sandbox) and reads and writes the store.

The policy is the supervisor's, never ours: this gateway neither authors nor enforces one. Until
the supervisor synced one, ``GetSandboxConfig`` has none (version 0), and upstream's supervisor
then takes its image's ``/etc/openshell/policy.yaml`` or its own restrictive default and syncs it,
as it does against upstream's gateway for a sandbox created without a policy; from then on the
answer is that policy, as it was sent (its deterministic serialization), with our version of it.
Settings, providers, inference routes, workspaces and middleware services: this gateway has none,
and says so with empty answers, so the supervisor never waits on something that will not come.
docs/upstream.md says the same for operators.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import grpc

from gateway.store.sandboxes import StoredPolicy
from openshell_wire.records import LogRecord, LogStream
from openshell_wire.v1 import inference_pb2 as inf
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import sandbox_pb2 as sb

#: The largest policy a supervisor may sync (its serialized bytes): a policy is a few KiB of
#: paths and network rules; the bound keeps a sandbox from storing anything it likes in our table.
POLICY_MAX_BYTES = 1024 * 1024
#: The tracing target of the events this gateway records about a sandbox's policy.
POLICY_TARGET = "openshell.policy"
#: The revision of the (always empty) inference bundle: constant, so the supervisor's refresh
#: every few seconds sees nothing new.
INFERENCE_REVISION = "openshell-gateway-no-routes"
#: Upstream's supervisor parses "fail_closed" or "retain_last_valid"; we say the stricter plainly
#: (it also takes anything else as fail_closed).
FAILURE_MODE = "fail_closed"


@dataclass(frozen=True, slots=True)
class Refused:
    """A request this gateway does not take: the status and a message saying why."""

    code: grpc.StatusCode
    message: str


def policy_bytes(policy: sb.SandboxPolicy) -> bytes:
    """The policy as stored and hashed: the same policy always gives the same bytes."""
    return policy.SerializeToString(deterministic=True)


def policy_hash(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def config_response(stored: StoredPolicy | None) -> sb.GetSandboxConfigResponse:
    """GetSandboxConfig's answer for what the store holds (None or no policy: none synced yet)."""
    answer = sb.GetSandboxConfigResponse(
        policy_validation_failure_mode=FAILURE_MODE,
        extension_authentication_enabled=False,
        provider_env_revision=0,
        workspace="",  # no workspace: the supervisor never calls SubmitPolicyAnalysis
    )
    if stored is None or stored.policy is None:
        # Version 0 and no policy is "created without one" for upstream's supervisor: it discovers
        # its own and syncs it.
        return answer
    answer.policy.CopyFrom(sb.SandboxPolicy.FromString(stored.policy))
    answer.version = stored.version
    answer.policy_hash = stored.policy_hash or policy_hash(stored.policy)
    answer.policy_source = sb.POLICY_SOURCE_SANDBOX
    # Stable while nothing changes: the supervisor's poll then does nothing.
    answer.config_revision = stored.version
    return answer


def update_problem(request: pb.UpdateConfigRequest) -> Refused | None:
    """None for what this gateway takes of UpdateConfig (a sandbox supervisor's sync of its own
    policy), else why not. The sandbox's name is checked by the caller (it is its id)."""

    def invalid(message: str) -> Refused:
        return Refused(grpc.StatusCode.INVALID_ARGUMENT, f"UpdateConfig: {message}")

    if request.setting_key or request.HasField("setting_value") or request.delete_setting:
        return invalid("this gateway keeps no settings; it takes only a sandbox supervisor's policy sync")
    if getattr(request, "global"):  # a Python keyword: no attribute of that name otherwise
        return invalid("this gateway has no global policy; it takes only a sandbox supervisor's policy sync")
    if request.merge_operations:
        return invalid("this gateway does not merge policies; the supervisor syncs its whole policy")
    if request.expected_resource_version:
        return invalid("this gateway keeps no resource versions; a sync is not conditional")
    if request.annotations:
        return invalid("this gateway keeps no annotations")
    if request.workspace:
        return invalid("this gateway has no workspaces (GetSandboxConfig answers none)")
    if not request.HasField("policy"):
        return invalid("no policy: this gateway takes only a sandbox supervisor's policy sync")
    size = request.policy.ByteSize()
    if size > POLICY_MAX_BYTES:
        return invalid(f"the policy is {size} bytes, more than this gateway keeps ({POLICY_MAX_BYTES})")
    return None


def sync_record(version: int, digest: str) -> LogRecord:
    """The sandbox's event for a policy sync: operators see it in the sandbox's logs."""
    return LogRecord(
        stream=LogStream.SUPERVISOR,
        level="info",
        target=POLICY_TARGET,
        message=f"policy version {version} synced by the sandbox's supervisor (sha256 {digest[:12]}…)",
        fields=(("version", str(version)), ("policy_hash", digest)),
    )


def status_record(request: pb.ReportPolicyStatusRequest) -> LogRecord | Refused:
    """The sandbox's event for its supervisor's report on a policy version: the supervisor's
    word, recorded as such (this gateway claims nothing about it)."""
    status = request.status
    if status == pb.POLICY_STATUS_UNSPECIFIED or status not in pb.PolicyStatus.values():
        return Refused(
            grpc.StatusCode.INVALID_ARGUMENT, "ReportPolicyStatus: status is unspecified or unknown"
        )
    name = pb.PolicyStatus.Name(status).removeprefix("POLICY_STATUS_").lower()
    version = request.version
    if status == pb.POLICY_STATUS_FAILED:
        message = f"policy version {version} failed to load in the sandbox's supervisor: {request.load_error}"
    elif status == pb.POLICY_STATUS_LOADED:
        message = f"policy version {version} loaded by the sandbox's supervisor"
    else:
        message = f"policy version {version} reported {name} by the sandbox's supervisor"
    fields: tuple[tuple[str, str], ...] = (("version", str(version)), ("status", name))
    if request.load_error:
        fields += (("load_error", request.load_error),)
    return LogRecord(
        stream=LogStream.SUPERVISOR,
        level="error" if status == pb.POLICY_STATUS_FAILED else "info",
        target=POLICY_TARGET,
        message=message,
        fields=fields,
    )


def provider_environment() -> pb.GetSandboxProviderEnvironmentResponse:
    """No environment, revision 0: this gateway attaches no providers to a sandbox."""
    return pb.GetSandboxProviderEnvironmentResponse(provider_env_revision=0)


def inference_bundle() -> inf.GetInferenceBundleResponse:
    """No routes, a constant revision: this gateway routes no inference."""
    return inf.GetInferenceBundleResponse(
        revision=INFERENCE_REVISION, generated_at_ms=int(time.time() * 1000)
    )
