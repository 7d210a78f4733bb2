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
A sync gets the limits upstream's gateway sets a sandbox's own sync (:func:`update_problem`): the
sandbox's credential may be read by its agent, which must not widen what its next start enforces.
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


def update_problem(
    request: pb.UpdateConfigRequest, *, stored: sb.SandboxPolicy | None = None
) -> Refused | None:
    """None for what this gateway takes of UpdateConfig (a sandbox supervisor's sync of its own
    policy), else why not. The sandbox's name is checked by the caller (it is its id).

    ``stored`` is the policy the sandbox synced before (None: its first sync). The caller is
    always the sandbox (its credential), and that credential can sit in files the sandbox's agent
    reads, so a sync gets what upstream's gateway gives a sandbox caller (``policy.rs``
    ``UpdateConfig``), no more: the safety check on every sync, and once a policy is stored,
    Landlock and process unchanged and the filesystem only added to (they apply at the
    supervisor's next start, so a change there would widen what the agent gets then)."""

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
    if stored is not None:
        changed = static_change(stored, request.policy)
        if changed is not None:
            return invalid(changed)
    unsafe = safety_violations(request.policy)
    if unsafe:
        return invalid(f"policy contains unsafe content: {'; '.join(unsafe)}")
    return None


#: Upstream's bounds on a policy's filesystem paths (openshell-policy ``MAX_FILESYSTEM_PATHS``,
#: ``MAX_PATH_LENGTH``) and its range of a numeric sandbox user or group (``MIN_SANDBOX_UID``,
#: ``MAX_SANDBOX_UID``: 0 is root; 2^32-1 is "no identity" in Linux's APIs).
MAX_FILESYSTEM_PATHS = 256
MAX_PATH_LENGTH = 4096
MIN_SANDBOX_ID = 1
MAX_SANDBOX_ID = 2**32 - 2


def _valid_identity(value: str) -> bool:
    """Upstream's ``is_valid_sandbox_identity``: the name ``sandbox`` or a numeric id in range
    (never root, by name or by 0)."""
    if value == "sandbox":
        return True
    if not value.isascii() or not value.isdigit():
        return False
    return MIN_SANDBOX_ID <= int(value) <= MAX_SANDBOX_ID


def safety_violations(policy: sb.SandboxPolicy) -> list[str]:
    """The process and filesystem part of upstream's ``validate_sandbox_policy``, with its
    messages: the user and group the agent runs as, relative paths, ``..`` components, a
    read-write ``/``, too long paths and too many. Its network checks (TLD wildcards, endpoint
    ports, L7 and middleware rules) are not repeated here: upstream's supervisor checks its
    network rules itself when it loads them."""
    found: list[str] = []
    if policy.HasField("process"):
        for field in ("run_as_user", "run_as_group"):
            value = getattr(policy.process, field)
            if value and not _valid_identity(value):
                found.append(
                    f"{field} must be 'sandbox' or a numeric UID/GID in range "
                    f"[{MIN_SANDBOX_ID}, {MAX_SANDBOX_ID}], got '{value}'"
                )
    if policy.HasField("filesystem"):
        fs = policy.filesystem
        total = len(fs.read_only) + len(fs.read_write)
        if total > MAX_FILESYSTEM_PATHS:
            found.append(f"too many filesystem paths ({total} > {MAX_FILESYSTEM_PATHS})")
        for path in [*fs.read_only, *fs.read_write]:
            if len(path) > MAX_PATH_LENGTH:
                found.append(f"path exceeds maximum length ({len(path)} > {MAX_PATH_LENGTH}): {path[:64]}…")
                continue
            if not path.startswith("/"):
                found.append(f"path must be absolute (start with '/'): {path}")
            if ".." in path.split("/"):
                found.append(f"path contains '..' traversal component: {path}")
        for path in fs.read_write:
            if not path.rstrip("/"):
                found.append(f"read-write path is overly broad: {path}")
    return found


def static_change(stored: sb.SandboxPolicy, new: sb.SandboxPolicy) -> str | None:
    """Upstream's ``validate_static_fields_unchanged`` with its messages: what a sync may not
    change of a stored policy. Upstream compares with the sandbox's first policy; this gateway
    keeps only the latest, which the supervisor's own syncs only ever add to, so a path added by
    an earlier sync may not be removed either."""
    if stored.HasField("filesystem"):
        if not new.HasField("filesystem"):
            return "filesystem policy cannot be removed on a live sandbox"
        base, update = stored.filesystem, new.filesystem
        if base.include_workdir != update.include_workdir:
            return "filesystem include_workdir cannot be changed on a live sandbox"
        for kind in ("read_only", "read_write"):
            kept = set(getattr(update, kind))
            for path in getattr(base, kind):
                if path not in kept:
                    return f"filesystem {kind} path '{path}' cannot be removed on a live sandbox"
    # An unset part differs from a set empty one, as upstream's Option does.
    for part in ("landlock", "process"):
        if stored.HasField(part) != new.HasField(part) or getattr(stored, part) != getattr(new, part):
            return f"{part} policy cannot be changed on a live sandbox (applied at startup)"
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
