"""The rules of our answers to upstream's supervisor configuration calls (gateway/upstream_config.py)
and the store of the policy it syncs (SandboxStore.policy/set_policy; the same scenario runs on
PostgreSQL in tests/integration/test_store_postgres.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from sqlalchemy import select, update

from gateway import upstream_config
from gateway.server import OpenShellService
from gateway.sessions import SessionRegistry
from gateway.store import CommandStore, Database, EventStore, SandboxStore
from gateway.store.sandboxes import StoredPolicy
from gateway.store.schema import sandboxes
from openshell_wire.records import LogStream
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import sandbox_pb2 as sb
from tests.support.gateway import gateway_config


def policy(*read_only: str) -> sb.SandboxPolicy:
    return sb.SandboxPolicy(
        version=1,
        filesystem=sb.FilesystemPolicy(include_workdir=True, read_only=list(read_only), read_write=["/tmp"]),
        landlock=sb.LandlockPolicy(compatibility="best_effort"),
    )


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(f"sqlite:///{tmp_path}/state/gateway.db")
    yield database
    await database.close()


async def check_policy_store(db: Database) -> None:
    """Absent until a sync; version 1, the same on a repeat, 2 on a change; a write for an earlier
    generation lands nothing; a new generation starts without a policy and connection epoch."""
    store = SandboxStore(db)
    assert await store.create("pol", driver="local") == 1
    absent = await store.policy("pol")
    assert absent is not None and absent.policy is None and absent.version == 0 and absent.policy_hash is None
    assert await store.policy("nobody") is None
    assert await store.set_policy("nobody", b"x", policy_hash="h") is None

    first = upstream_config.policy_bytes(policy("/usr"))
    h1 = upstream_config.policy_hash(first)
    assert await store.set_policy("pol", first, policy_hash=h1, generation=1) == 1
    assert await store.set_policy("pol", first, policy_hash=h1, generation=1) == 1
    second = upstream_config.policy_bytes(policy("/usr", "/lib"))
    h2 = upstream_config.policy_hash(second)
    assert await store.set_policy("pol", second, policy_hash=h2) == 2
    stored = await store.policy("pol", generation=1)
    assert stored is not None and (stored.policy, stored.version, stored.policy_hash) == (second, 2, h2)
    # Going back to an earlier policy is a change too.
    assert await store.set_policy("pol", first, policy_hash=h1) == 3

    async with db.engine.begin() as conn:
        await conn.execute(update(sandboxes).where(sandboxes.c.id == "pol").values(connection_epoch=7))
    assert await store.create("pol", driver="local", replaces=lambda row: True) == 2
    again = await store.policy("pol")
    assert again is not None and again.policy is None and again.version == 0 and again.generation == 2
    async with db.engine.connect() as conn:
        assert await conn.scalar(select(sandboxes.c.connection_epoch).where(sandboxes.c.id == "pol")) == 0
    # A sync bound to the earlier life writes nothing into this one, nor reads it.
    assert await store.set_policy("pol", first, policy_hash=h1, generation=1) is None
    assert await store.policy("pol", generation=1) is None
    now = await store.policy("pol")
    assert now is not None and now.policy is None


async def test_policy_store(db: Database) -> None:
    await check_policy_store(db)


def test_config_answer_without_and_with_a_policy() -> None:
    none = upstream_config.config_response(None)
    assert not none.HasField("policy") and none.version == 0 and none.policy_hash == ""
    assert none.policy_source == sb.POLICY_SOURCE_UNSPECIFIED
    assert none.policy_validation_failure_mode == "fail_closed" and none.workspace == ""
    assert not none.settings and not none.supervisor_middleware_services
    assert none.provider_env_revision == 0 and not none.extension_authentication_enabled

    blob = upstream_config.policy_bytes(policy("/usr"))
    digest = upstream_config.policy_hash(blob)
    answer = upstream_config.config_response(StoredPolicy(blob, 4, digest, 1))
    assert answer.policy == policy("/usr")
    assert (answer.version, answer.policy_hash, answer.config_revision) == (4, digest, 4)
    assert answer.policy_source == sb.POLICY_SOURCE_SANDBOX


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (pb.UpdateConfigRequest(name="s", policy=policy(), setting_key="k"), "no settings"),
        (
            pb.UpdateConfigRequest(name="s", setting_value=sb.SettingValue(bool_value=True)),
            "no settings",
        ),
        (pb.UpdateConfigRequest(name="s", policy=policy(), delete_setting=True), "no settings"),
        (pb.UpdateConfigRequest(name="s", policy=policy(), **{"global": True}), "no global policy"),
        (
            pb.UpdateConfigRequest(name="s", policy=policy(), merge_operations=[pb.PolicyMergeOperation()]),
            "does not merge",
        ),
        (pb.UpdateConfigRequest(name="s", policy=policy(), expected_resource_version=3), "resource versions"),
        (pb.UpdateConfigRequest(name="s", policy=policy(), annotations={"a": "b"}), "no annotations"),
        (pb.UpdateConfigRequest(name="s", policy=policy(), workspace="w"), "no workspaces"),
        (pb.UpdateConfigRequest(name="s"), "no policy"),
        (
            pb.UpdateConfigRequest(name="s", policy=policy("/x" * (upstream_config.POLICY_MAX_BYTES // 2))),
            "more than this gateway keeps",
        ),
    ],
)
def test_update_config_takes_only_a_policy_sync(request_: pb.UpdateConfigRequest, words: str) -> None:
    refused = upstream_config.update_problem(request_)
    assert refused is not None and refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in refused.message and refused.message.startswith("UpdateConfig: ")


def test_update_config_takes_a_policy_sync() -> None:
    assert upstream_config.update_problem(pb.UpdateConfigRequest(name="s", policy=policy("/usr"))) is None
    # An empty policy is still a policy (upstream's restrictive default has lists; ours need not).
    assert upstream_config.update_problem(pb.UpdateConfigRequest(name="s", policy=sb.SandboxPolicy())) is None


def test_policy_status_records_the_supervisor_s_word() -> None:
    loaded = upstream_config.status_record(
        pb.ReportPolicyStatusRequest(sandbox_id="s", version=3, status=pb.POLICY_STATUS_LOADED)
    )
    assert not isinstance(loaded, upstream_config.Refused)
    assert loaded.message == "policy version 3 loaded by the sandbox's supervisor"
    assert (loaded.level, loaded.target, loaded.stream) == ("info", "openshell.policy", LogStream.SUPERVISOR)
    assert loaded.fields == (("version", "3"), ("status", "loaded"))
    failed = upstream_config.status_record(
        pb.ReportPolicyStatusRequest(
            sandbox_id="s", version=2, status=pb.POLICY_STATUS_FAILED, load_error="bad"
        )
    )
    assert not isinstance(failed, upstream_config.Refused)
    assert failed.level == "error" and failed.message.endswith(
        "failed to load in the sandbox's supervisor: bad"
    )
    assert ("load_error", "bad") in failed.fields
    for status in (pb.POLICY_STATUS_UNSPECIFIED, 99):
        refused = upstream_config.status_record(
            pb.ReportPolicyStatusRequest(sandbox_id="s", version=1, status=status)  # type: ignore[arg-type]
        )
        assert isinstance(refused, upstream_config.Refused)
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT


def test_no_providers_and_no_inference() -> None:
    env = upstream_config.provider_environment()
    assert not env.environment and env.provider_env_revision == 0
    bundle = upstream_config.inference_bundle()
    assert not bundle.routes and bundle.revision == upstream_config.INFERENCE_REVISION
    assert bundle.generated_at_ms > 0


def restrictive_default() -> sb.SandboxPolicy:
    """The shape of upstream's restrictive default (tests/compat/upstream_supervisor_peer.py)."""
    return sb.SandboxPolicy(
        version=1,
        filesystem=sb.FilesystemPolicy(
            include_workdir=True,
            read_only=["/usr", "/lib", "/proc", "/dev/urandom", "/app", "/etc", "/var/log"],
            read_write=["/tmp", "/dev/null"],
        ),
        landlock=sb.LandlockPolicy(compatibility="best_effort"),
        process=sb.ProcessPolicy(run_as_user="sandbox", run_as_group="sandbox"),
    )


def sync(policy_: sb.SandboxPolicy, stored: sb.SandboxPolicy | None = None) -> str | None:
    refused = upstream_config.update_problem(pb.UpdateConfigRequest(name="s", policy=policy_), stored=stored)
    if refused is None:
        return None
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.message.startswith("UpdateConfig: ")
    return refused.message.removeprefix("UpdateConfig: ")


def changed(edit: Callable[[sb.SandboxPolicy], object]) -> sb.SandboxPolicy:
    policy_ = restrictive_default()
    edit(policy_)
    return policy_


def test_a_sync_may_only_add_paths_to_the_stored_policy() -> None:
    """Upstream's gateway's rule for a sandbox's own sync once a policy is stored, with its
    messages: Landlock and process unchanged, no path removed, include_workdir unchanged."""
    stored = restrictive_default()
    # The discovery sync (nothing stored) and the enrichment sync (paths added) pass, as does
    # the same policy again and a change of network rules.
    assert sync(restrictive_default()) is None
    enriched = changed(lambda p: p.filesystem.read_only.extend(["/opt/venv", "/sandbox"]))
    enriched.filesystem.read_write.append("/sandbox/work")
    assert sync(enriched, stored) is None
    assert sync(restrictive_default(), stored) is None
    networked = changed(lambda p: p.network_policies["pypi"].endpoints.add(host="pypi.org", port=443))
    assert sync(networked, stored) is None

    cases: list[tuple[sb.SandboxPolicy, str]] = [
        (
            changed(lambda p: setattr(p.process, "run_as_user", "1000")),
            "process policy cannot be changed on a live sandbox (applied at startup)",
        ),
        (changed(lambda p: p.ClearField("process")), "process policy cannot be changed"),
        (
            changed(lambda p: setattr(p.landlock, "compatibility", "hard_requirement")),
            "landlock policy cannot be changed on a live sandbox (applied at startup)",
        ),
        (changed(lambda p: p.ClearField("landlock")), "landlock policy cannot be changed"),
        (
            changed(lambda p: p.filesystem.read_only.remove("/etc")),
            "filesystem read_only path '/etc' cannot be removed on a live sandbox",
        ),
        (
            changed(lambda p: p.filesystem.read_write.remove("/tmp")),
            "filesystem read_write path '/tmp' cannot be removed on a live sandbox",
        ),
        (
            changed(lambda p: setattr(p.filesystem, "include_workdir", False)),
            "filesystem include_workdir cannot be changed on a live sandbox",
        ),
        (
            changed(lambda p: p.ClearField("filesystem")),
            "filesystem policy cannot be removed on a live sandbox",
        ),
    ]
    for policy_, words in cases:
        message = sync(policy_, stored)
        assert message is not None and words in message, (policy_, message)
        # The same policy as a first sync is taken: upstream backfills its baseline from it.
        assert sync(policy_) is None, policy_


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (
            lambda p: setattr(p.process, "run_as_user", "root"),
            "run_as_user must be 'sandbox' or a numeric UID/GID in range [1, 4294967294], got 'root'",
        ),
        (lambda p: setattr(p.process, "run_as_group", "0"), "run_as_group must be 'sandbox'"),
        (lambda p: setattr(p.process, "run_as_user", "4294967295"), "got '4294967295'"),
        (lambda p: setattr(p.process, "run_as_user", "+1000"), "got '+1000'"),
        (
            lambda p: p.filesystem.read_only.append("/usr/../root"),
            "path contains '..' traversal component: /usr/../root",
        ),
        (lambda p: p.filesystem.read_write.append("tmp"), "path must be absolute (start with '/'): tmp"),
        (lambda p: p.filesystem.read_write.append("/"), "read-write path is overly broad: /"),
        (lambda p: p.filesystem.read_write.append("//"), "read-write path is overly broad: //"),
        (
            lambda p: p.filesystem.read_only.extend(f"/d{i}" for i in range(250)),
            "too many filesystem paths (259 > 256)",
        ),
        (
            lambda p: p.filesystem.read_only.append("/" + "a" * 4096),
            "path exceeds maximum length (4097 > 4096)",
        ),
    ],
)
def test_every_sync_gets_upstream_s_safety_check(
    edit: Callable[[sb.SandboxPolicy], object], words: str
) -> None:
    """On the first sync and on later ones alike: never the agent as root, no '..', no read-write
    '/' (upstream's validate_sandbox_policy, its process and filesystem part)."""
    unsafe = changed(edit)
    for stored in (None, unsafe):
        message = sync(unsafe, stored)
        assert message is not None and message.startswith("policy contains unsafe content: "), message
        assert words in message, message


def test_the_safety_check_takes_what_upstream_takes() -> None:
    ids = changed(lambda p: p.process.CopyFrom(sb.ProcessPolicy(run_as_user="1", run_as_group="4294967294")))
    assert sync(ids) is None
    # Read-only '/' is not overly broad for upstream (only read-write is); trailing slashes pass.
    assert sync(changed(lambda p: p.filesystem.read_only.extend(["/", "/opt/"]))) is None
    assert sync(sb.SandboxPolicy(process=sb.ProcessPolicy())) is None  # unset: the runtime's choice


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class _Context:
    """What the service reads of a unary call's context, and its abort (which raises, as grpc's)."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Aborted(code, details)


class _CountingSandboxes(SandboxStore):
    """A real SQLite store that counts its reads of a sandbox, and can delete the sandbox just
    before the next policy write (the race of a deletion between a call's check and its write)."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.reads: list[str] = []
        self.delete_before_write = False

    async def get(self, sandbox_id: str, *args: Any, **kwargs: Any) -> Any:
        self.reads.append("get")
        return await super().get(sandbox_id, *args, **kwargs)

    async def ensure(self, sandbox_id: str, *args: Any, **kwargs: Any) -> Any:
        self.reads.append("ensure")
        return await super().ensure(sandbox_id, *args, **kwargs)

    async def policy(self, sandbox_id: str, *, generation: int | None = None) -> StoredPolicy | None:
        self.reads.append("policy")
        return await super().policy(sandbox_id, generation=generation)

    async def set_policy(
        self, sandbox_id: str, policy: bytes, *, policy_hash: str, generation: int | None = None
    ) -> int | None:
        if self.delete_before_write:
            await self.delete(sandbox_id)
        return await super().set_policy(sandbox_id, policy, policy_hash=policy_hash, generation=generation)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[OpenShellService, _CountingSandboxes]]:
    """The gateway's service without supervisor credentials (their binding read is
    tests/integration/test_upstream_config.py's), on a real store."""
    config = gateway_config(tmp_path, {"sessions": {"register_unknown": False}})
    database = await Database.open(config.database.url)
    sandboxes = _CountingSandboxes(database)
    svc = OpenShellService(
        config=config,
        registry=SessionRegistry(),
        sandboxes=sandboxes,
        events=EventStore(database),
        commands=CommandStore(database),
    )
    try:
        yield svc, sandboxes
    finally:
        await svc.drain(timeout_s=5)
        await database.close()


async def test_a_config_poll_reads_the_store_once(
    service: tuple[OpenShellService, _CountingSandboxes],
) -> None:
    """Upstream's supervisor polls GetSandboxConfig every 10 s: one read of a known sandbox (it
    was a check of the sandbox and then the policy's read); an unknown one is still NOT_FOUND."""
    svc, sandboxes = service
    await sandboxes.create("poll", driver="local")
    ctx: Any = _Context()
    answer = await svc.GetSandboxConfig(sb.GetSandboxConfigRequest(sandbox_id="poll"), ctx)
    assert not answer.HasField("policy") and sandboxes.reads == ["policy"]
    sandboxes.reads.clear()
    await svc.UpdateConfig(pb.UpdateConfigRequest(name="poll", policy=restrictive_default()), ctx)
    assert sandboxes.reads == ["policy"]
    sandboxes.reads.clear()
    assert (await svc.GetSandboxConfig(sb.GetSandboxConfigRequest(sandbox_id="poll"), ctx)).version == 1
    assert sandboxes.reads == ["policy"]
    with pytest.raises(_Aborted) as unknown:
        await svc.GetSandboxConfig(sb.GetSandboxConfigRequest(sandbox_id="nobody"), ctx)
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND


async def test_a_sandbox_deleted_during_a_sync_is_not_found(
    service: tuple[OpenShellService, _CountingSandboxes],
) -> None:
    """Without credentials there is no bound generation: a sandbox deleted between the call's
    check and its write is not known any more (NOT_FOUND), not FAILED_PRECONDITION about a
    "generation None"; nothing is written."""
    svc, sandboxes = service
    await sandboxes.create("gone", driver="local")
    sandboxes.delete_before_write = True
    with pytest.raises(_Aborted) as gone:
        await svc.UpdateConfig(pb.UpdateConfigRequest(name="gone", policy=restrictive_default()), _Context())  # type: ignore[arg-type]
    assert gone.value.code == grpc.StatusCode.NOT_FOUND, gone.value.details
    assert "sandbox gone is not known to this gateway" in gone.value.details
    assert "None" not in gone.value.details
    assert await sandboxes.policy("gone") is None
