"""The provisioner between the HTTP API, the store and the Kubernetes driver: registration decides
between concurrent creates, every failure takes the registration back, the watch records phases.

The driver is a stand-in here (the real one runs against a real API server in
tests/e2e/test_kubernetes_driver.py); the store is the real one on SQLite.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.api import build_api
from gateway.config import KubernetesDriverSettings, SessionSettings
from gateway.drivers import ProvisionError
from gateway.drivers.kubernetes import CreatedSandbox, KubernetesDriverError, PodState, Snapshot
from gateway.drivers.podspec import PodSpecError, SandboxRequest, build_sandbox_pod
from gateway.drivers.registry import RegistryError
from gateway.provisioner import KubernetesProvisioner
from gateway.sandbox_state import Liveness
from gateway.store import Database, EventStore, SandboxStore, utcnow
from openshell_wire.records import Event, LogRecord, LogStream
from tests.support.procs import child_env

#: A registration time well past the create deadline.
T_OLD = "2020-01-01T00:00:00+00:00"
SETTINGS = KubernetesDriverSettings.model_validate(
    {"gateway_address": "gw:7070", "pod": {"default_image": "agent:1"}}
)


@dataclass
class FakeDriver:
    """Builds the real pod spec (so its checks apply), then does what the test says. A request
    without a command gets its image's from ``image_commands``, as the real driver's registry
    lookup would."""

    fail_with: BaseException | None = None
    image_commands: dict[str, list[str]] = field(
        default_factory=lambda: {"agent:1": ["/bin/agent", "--serve"]}
    )
    delay: float = 0.0
    created: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)
    pods: dict[str, PodState] = field(default_factory=dict)
    events: asyncio.Queue[PodState] = field(default_factory=asyncio.Queue)

    @property
    def client(self) -> object:
        return object()

    async def check_access(self) -> None:
        return None

    async def create(self, request: SandboxRequest) -> CreatedSandbox:
        self.asked.append(request.sandbox_id)
        from_image = None
        if not request.command:
            image = request.image or "agent:1"
            if image not in self.image_commands:
                raise RegistryError(f"{image}: not found in registry", caller_fault=True)
            request = SandboxRequest(request.sandbox_id, self.image_commands[image], image, request.env)
            from_image = "sha256:" + "cd" * 32
        build_sandbox_pod(SETTINGS, request)
        await asyncio.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        self.created.append(request.sandbox_id)
        return CreatedSandbox(
            request.sandbox_id,
            f"sandbox-{request.sandbox_id}",
            "uid-1",
            image=f"{request.image}@sha256:{'ef' * 32}" if from_image else request.image,
            command=tuple(request.command),
            command_from_image=from_image,
        )

    async def delete(self, sandbox_id: str, *, grace_s: int | None = None) -> bool:
        return self.pods.pop(sandbox_id, None) is not None

    async def snapshot(self) -> Snapshot:
        return Snapshot(list(self.pods.values()), "42")

    async def watch(self, resource_version: str | None = None) -> AsyncIterator[PodState]:
        assert resource_version == "42"
        while True:
            yield await self.events.get()

    async def close(self) -> None:
        return None


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SandboxStore]:
    db = await Database.open(f"sqlite:///{tmp_path}/gateway.db")
    try:
        yield SandboxStore(db)
    finally:
        await db.close()


def provisioner(store: SandboxStore, driver: FakeDriver) -> KubernetesProvisioner:
    return KubernetesProvisioner(SETTINGS, store, driver=driver)  # type: ignore[arg-type]


async def phase_becomes(store: SandboxStore, sandbox_id: str, phase: str) -> None:
    async with asyncio.timeout(10):
        while True:
            row = await store.get(sandbox_id)
            if row is not None and (row.driver_state or {}).get("phase") == phase:
                return
            await asyncio.sleep(0.02)


async def test_create_registers_the_sandbox_and_its_pod_uid(store: SandboxStore) -> None:
    created = await provisioner(store, FakeDriver()).create("sb-1", ["sleep", "1"], image=None, env={})
    assert created == {
        "id": "sb-1",
        "pod": "sandbox-sb-1",
        "namespace": "openshell-sandboxes",
        "generation": 1,
        "command": ["sleep", "1"],
    }
    row = await store.get("sb-1")
    assert row is not None and row.driver == "kubernetes"
    assert row.spec == {"image": "agent:1", "command": ["sleep", "1"]}
    assert row.pod_uid == "uid-1", "the pod's projected token is bound to the sandbox by this uid"
    assert row.driver_state is not None and row.driver_state["phase"] == "Creating"


async def test_of_two_concurrent_creates_one_wins_and_its_row_survives(store: SandboxStore) -> None:
    driver = FakeDriver(delay=0.05)
    prov = provisioner(store, driver)
    results = await asyncio.gather(
        prov.create("twin", ["true"], image=None, env={}),
        prov.create("twin", ["true"], image=None, env={}),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, ProvisionError)]
    assert len(errors) == 1 and errors[0].status == 409, results
    assert driver.created == ["twin"], "only the winner reached the driver"
    row = await store.get("twin")
    assert row is not None and row.spec is not None and row.pod_uid == "uid-1"


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (PodSpecError("command is empty"), 400),
        (KubernetesDriverError("already has pods", 409), 409),
        (KubernetesDriverError("rejected (422 Invalid)", 422), 400),
        (KubernetesDriverError("refused (403 Forbidden)", 403), 502),
        (KubernetesDriverError("cannot reach the Kubernetes API"), 502),
        (RegistryError("agent:1: not found in registry r", caller_fault=True), 400),
        (RegistryError("registry r could not be reached", caller_fault=False), 502),
        (RuntimeError("a bug or a library surprise"), 502),
    ],
)
async def test_every_failure_takes_the_registration_back(
    store: SandboxStore, failure: BaseException, status: int
) -> None:
    prov = provisioner(store, FakeDriver(fail_with=failure))
    with pytest.raises(ProvisionError) as raised:
        await prov.create("sb-x", ["true"], image=None, env={})
    assert raised.value.status == status
    assert str(failure) in str(raised.value)
    assert await store.get("sb-x") is None, "the id is free again"
    # ... so a later create of the same id works.
    assert await provisioner(store, FakeDriver()).create("sb-x", ["true"], image=None, env={})


async def test_a_cancelled_create_takes_the_registration_back(store: SandboxStore) -> None:
    task = asyncio.create_task(
        provisioner(store, FakeDriver(delay=10)).create("slow", ["true"], image=None, env={})
    )
    await asyncio.sleep(0.1)
    assert await store.get("slow") is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.get("slow") is None


async def test_delete_refuses_sandboxes_of_another_driver(store: SandboxStore) -> None:
    await store.ensure("outsider", driver="external")
    with pytest.raises(ProvisionError) as raised:
        await provisioner(store, FakeDriver()).delete("outsider")
    assert raised.value.status == 409 and "external" in str(raised.value)


async def test_the_follower_records_phases_and_pods_that_vanished(store: SandboxStore) -> None:
    driver = FakeDriver()
    prov = provisioner(store, driver)
    for sandbox_id in ("kept", "gone"):
        await prov.create(sandbox_id, ["true"], image=None, env={})
    await store.set_driver_state("gone", {"phase": "Running"})  # seen running before the gateway restarted
    # Registered, then the gateway stopped before creating the pod, long ago; and one just now.
    await store.create(
        "orphan", driver="kubernetes", driver_state={"phase": "Creating", "at": "2020-01-01T00:00:00+00:00"}
    )
    await store.create(
        "fresh", driver="kubernetes", driver_state={"phase": "Creating", "at": utcnow().isoformat()}
    )
    driver.pods["kept"] = PodState("kept", "sandbox-kept", "Running", pod_uid="uid-1")
    await prov.start()
    try:
        await phase_becomes(store, "gone", "Deleted")
        row = await store.get("kept")
        assert row is not None and row.driver_state is not None and row.driver_state["phase"] == "Running"
        await phase_becomes(store, "orphan", "Failed")
        orphan = await store.get("orphan")
        assert orphan is not None and "no pod appeared" in (orphan.driver_state or {})["reason"]
        fresh = await store.get("fresh")
        assert fresh is not None and (fresh.driver_state or {})["phase"] == "Creating", "a create in flight"
        await driver.events.put(
            PodState("kept", "sandbox-kept", "Failed", reason="Error", exit_code=3, pod_uid="uid-1")
        )
        await phase_becomes(store, "kept", "Failed")
        state = (await store.get("kept")).driver_state  # type: ignore[union-attr]
        assert state is not None and state["exit_code"] == 3 and state["reason"] == "Error"
    finally:
        await prov.close()
    assert prov._watcher is None


async def test_the_pod_uid_is_the_creates_and_the_watch_only_fills_in_a_missing_one(
    store: SandboxStore,
) -> None:
    """The row's pod uid is what a projected token must name (gateway/auth/supervisors.py): the
    create records its pod's; the watch fills one in only for a row still waiting for its pod (a
    create that stopped before writing it) and a pod of the sandbox's name; events of any other pod
    (a late one of an earlier pod) are not the row's and change nothing; an id created again starts
    without a uid until its own pod exists."""
    driver = FakeDriver()
    prov = provisioner(store, driver)
    await prov.create("bound", ["true"], image=None, env={})
    await store.create("unbound", driver="kubernetes", driver_state={"phase": "Creating", "at": T_OLD})
    await store.create("misnamed", driver="kubernetes", driver_state={"phase": "Creating", "at": T_OLD})
    driver.pods["unbound"] = PodState("unbound", "sandbox-unbound", "Pending", pod_uid="uid-u")
    driver.pods["misnamed"] = PodState("misnamed", "sandbox-other", "Running", pod_uid="uid-m")
    await prov.start()
    try:
        await phase_becomes(store, "unbound", "Pending")
        assert (await store.get("unbound")).pod_uid == "uid-u"  # type: ignore[union-attr]
        misnamed = await store.get("misnamed")
        assert misnamed is not None and misnamed.pod_uid is None, "a pod of another name binds nothing"
        await driver.events.put(PodState("bound", "sandbox-bound", "Deleted", pod_uid="uid-old"))
        await driver.events.put(PodState("unbound", "sandbox-unbound", "Running", pod_uid="uid-u"))
        await phase_becomes(store, "unbound", "Running")  # the watch got past the event before
        bound = await store.get("bound")
        assert bound is not None and bound.pod_uid == "uid-1", "the create's pod uid stays"
        assert (bound.driver_state or {})["phase"] == "Creating", "another pod's deletion is not its"
        await driver.events.put(PodState("bound", "sandbox-bound", "Deleted", pod_uid="uid-1"))
        await phase_becomes(store, "bound", "Deleted")
        assert await store.create("bound", driver="kubernetes", replaces=lambda row: True) == 2
        assert (await store.get("bound")).pod_uid is None, "a new generation has no pod yet"  # type: ignore[union-attr]
    finally:
        await prov.close()


async def test_a_pod_squatting_a_released_sandboxs_name_is_never_recorded_as_its_pod(
    store: SandboxStore,
) -> None:
    """Someone else's pod under a deleted sandbox's pod name (its labels and annotation copied)
    makes the create again fail; the row stays released with no pod uid, so no token of that pod
    binds to it and the id can be created again. Nor does such a pod keep a sandbox whose own pod
    is gone from being marked deleted."""
    driver = FakeDriver()
    prov = provisioner(store, driver)
    await prov.create("x", ["true"], image=None, env={})
    await prov.create("y", ["true"], image=None, env={})
    await prov.start()
    try:
        await driver.events.put(PodState("x", "sandbox-x", "Deleted", pod_uid="uid-1"))
        await phase_becomes(store, "x", "Deleted")
        squatter = PodState("x", "sandbox-x", "Running", pod_uid="uid-squatter")
        driver.fail_with = KubernetesDriverError("sandbox 'x' already has pods", status=409)
        with pytest.raises(ProvisionError):
            await prov.create("x", ["true"], image=None, env={})
        await driver.events.put(squatter)
        await driver.events.put(PodState("y", "sandbox-y", "Running", pod_uid="uid-1"))
        await phase_becomes(store, "y", "Running")  # the watch got past the squatter's event
        row = await store.get("x")
        assert row is not None and row.generation == 2 and row.pod_uid is None
        assert (row.driver_state or {})["phase"] == "Failed" and (row.driver_state or {})["released"]
    finally:
        await prov.close()

    # After a restart the list shows the squatter (and one under y's name), not y's own pod.
    driver.fail_with = None
    driver.pods = {"x": squatter, "y": PodState("y", "sandbox-y", "Running", pod_uid="uid-squatter")}
    await prov.start()
    try:
        await phase_becomes(store, "y", "Deleted")
        row = await store.get("x")
        assert row is not None and row.pod_uid is None and (row.driver_state or {})["phase"] == "Failed"
    finally:
        await prov.close()


async def test_the_api_validates_before_the_driver_is_asked(store: SandboxStore, tmp_path: Path) -> None:
    driver = FakeDriver()
    prov = provisioner(store, driver)
    db = await Database.open(f"sqlite:///{tmp_path}/events.db")
    app = build_api(
        sandboxes=store,
        events=EventStore(db),
        liveness=Liveness.from_settings(SessionSettings(lost_after_s=60)),
        provisioner=prov,
    )
    bad: list[tuple[Any, str]] = [
        ({"id": "Bad_Id", "command": ["true"]}, "not a valid name"),
        ({"id": "ok", "command": "true"}, "list of strings"),
        ({"id": "ok", "command": ["sh", 1]}, "list of strings"),
        (
            {"id": "ok", "command": ["true"], "env": {"OPENSHELL_SUPERVISOR_OFFLINE__POLICY": "stop"}},
            "reserved",
        ),
        ({"id": "ok", "command": ["true"], "env": {"LD_PRELOAD": "/x.so"}}, "reserved"),
        ({"id": "ok", "command": ["true"], "env": {"TMPDIR": "/nope"}}, "reserved"),
        ({"id": "ok", "command": ["true"], "env": {"A": 1}}, "string values"),
        ({"id": "ok", "command": ["true"], "color": "blue"}, "unknown field"),
        (["not", "an", "object"], "JSON object"),
        # Values the pod (and exec) cannot carry, or that name something else than an image.
        ({"id": "ok\n", "command": ["true"]}, "not a valid name"),
        ({"id": "ok", "command": ["true"], "image": "../../etc/passwd"}, "image: "),
        ({"id": "ok", "command": ["true"], "image": "registry.example/a/../b:1"}, "image: "),
        ({"id": "ok", "command": ["true"], "image": "busybox\x00:1"}, "image: "),
        ({"id": "ok", "command": ["true"], "image": "busybox:1\n"}, "image: "),
        ({"id": "ok", "command": ["true"], "image": "Library/BusyBox"}, "image: "),
        ({"id": "ok", "command": ["true"], "image": "busybox@sha256:1234"}, "image: "),
        ({"id": "ok", "command": ["true"], "env": {"FOO": "a\x00b"}}, "env.FOO: value contains a NUL byte"),
        ({"id": "ok", "command": ["true"], "env": {"FOO": "\ud800"}}, "env.FOO: value is not valid Unicode"),
        ({"id": "ok", "command": ["true"], "env": {"FOO\n": "x"}}, "not a valid variable name"),
        ({"id": "ok", "command": ["true"], "env": {"A=B": "x"}}, "not a valid variable name"),
        ({"id": "ok", "command": ["sh", "-c", "a\x00b"]}, "command[2]: contains a NUL byte"),
        ({"id": "ok", "command": [""]}, "command[0]: the program to run is empty"),
        ({"id": "ok", "command": ["echo", "x" * 200_000]}, "command[1]: is 200000 bytes"),
        ({"id": "ok", "command": ["true"] * 5000}, "command: 5000 arguments"),
        # A valid name, but too long for its pod's and credential Secret's names: refused before
        # anything is registered, not by the pod builder after.
        ({"id": "a" * 240, "command": ["true"]}, "id: sandbox_id is 240 characters"),
    ]
    try:
        async with TestClient(TestServer(app)) as client:
            for body, message in bad:
                resp = await client.post("/api/v1/sandboxes", json=body)
                assert resp.status == 400, (body, await resp.text())
                assert message in (await resp.json())["error"], body
            assert driver.asked == [], "the API refused these before asking the driver"
            resp = await client.post(
                "/api/v1/sandboxes", json={"id": "ok", "command": ["true"], "env": {"AGENT_MODE": "fast"}}
            )
            assert resp.status == 201, await resp.text()
            resp = await client.post("/api/v1/sandboxes", json={"id": "ok", "command": ["true"]})
            assert resp.status == 409
            listed = await (await client.get("/api/v1/sandboxes/ok")).json()
            assert listed["driver"] == "kubernetes" and listed["driver_state"]["phase"] == "Creating"
            driver.pods["ok"] = PodState("ok", "sandbox-ok", "Running")
            resp = await client.delete("/api/v1/sandboxes/ok")
            assert resp.status == 202 and (await resp.json())["deleted"] is True
    finally:
        await db.close()


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "sandbox",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_sandbox_cli_creates_and_deletes_through_the_api(
    store: SandboxStore, tmp_path: Path
) -> None:
    driver = FakeDriver()
    db = await Database.open(f"sqlite:///{tmp_path}/events.db")
    app = build_api(
        sandboxes=store,
        events=EventStore(db),
        liveness=Liveness.from_settings(SessionSettings(lost_after_s=60)),
        provisioner=provisioner(store, driver),
    )
    try:
        async with TestClient(TestServer(app)) as client:
            api = str(client.make_url("")).rstrip("/")
            options = ["--api", api, "--env", "MODE=fast", "--image", "agent:2", "-o", "json"]
            code, out, err = await _cli("create", *options, "cli-1", "--", "sleep", "5")
            assert code == 0, err
            expected = {
                "id": "cli-1",
                "pod": "sandbox-cli-1",
                "namespace": "openshell-sandboxes",
                "generation": 1,
                "command": ["sleep", "5"],
            }
            assert json.loads(out) == expected
            row = await store.get("cli-1")
            assert row is not None and row.spec is not None and row.spec["command"] == ["sleep", "5"]
            assert row.spec["image"] == "agent:2"

            code, _, err = await _cli("create", "--api", api, "cli-1", "--", "true")
            assert code == 1 and "exists" in err
            code, _, err = await _cli("create", "--api", api, "--env", "NOEQUALS", "cli-2", "--", "true")
            assert code == 2 and "NAME=VALUE" in err  # a usage error (docs/cli.md, exit statuses)
            # No command: the image's own (its ENTRYPOINT and CMD, from the registry).
            code, out, err = await _cli("create", "--api", api, "cli-2", "-o", "json")
            assert code == 0, err
            assert json.loads(out)["command"] == ["/bin/agent", "--serve"]
            row = await store.get("cli-2")
            assert row is not None and row.spec is not None
            assert row.spec["command"] == ["/bin/agent", "--serve"]
            assert row.spec["command_from_image"] == "sha256:" + "cd" * 32
            assert row.spec["image"] == "agent:1@sha256:" + "ef" * 32, "pinned to what the command came from"
            code, _, err = await _cli("create", "--api", api, "--image", "unknown:1", "cli-3")
            assert code == 1 and "unknown:1: not found in registry" in err
            assert await store.get("cli-3") is None

            driver.pods["cli-1"] = PodState("cli-1", "sandbox-cli-1", "Running")
            code, out, err = await _cli("delete", "cli-1", "--api", api, "-o", "json")
            assert code == 0 and json.loads(out)["deleted"] is True, err
    finally:
        await db.close()
    code, _, err = await _cli("delete", "x", "--api", "http://127.0.0.1:1")
    assert code == 69 and "cannot reach the gateway API" in err


async def test_the_sandbox_cli_checks_a_request_before_sending_it() -> None:
    """The CLI applies the gateway's own check: a bad request is refused with its reason even
    where no gateway answers (127.0.0.1:1), so nothing was sent."""
    nowhere = ["--api", "http://127.0.0.1:1"]
    code, _, err = await _cli("create", *nowhere, "--image", "../../etc/passwd", "cli-4", "--", "true")
    assert code == 1 and "image: " in err, err
    code, _, err = await _cli("create", *nowhere, "--env", "LD_PRELOAD=/x.so", "cli-4", "--", "true")
    assert code == 1 and "reserved" in err, err
    code, _, err = await _cli("delete", *nowhere, "../commands")
    assert code == 1 and "not a valid name" in err, err


async def test_the_provisioner_checks_requests_that_do_not_come_through_the_api(store: SandboxStore) -> None:
    prov = provisioner(store, FakeDriver())
    with pytest.raises(ProvisionError, match=r"env\.FOO: value contains a NUL byte") as caught:
        await prov.create("direct", ["true"], image=None, env={"FOO": "a\x00b"})
    assert caught.value.status == 400
    assert await store.get("direct") is None, "the registration was taken back"


async def test_a_deleted_sandbox_can_be_created_again_and_its_old_logs_stay(tmp_path: Path) -> None:
    db = await Database.open(f"sqlite:///{tmp_path}/gateway.db")
    store, events, driver = SandboxStore(db), EventStore(db), FakeDriver()
    prov = provisioner(store, driver)
    await prov.start()
    app = build_api(
        sandboxes=store,
        events=events,
        liveness=Liveness.from_settings(SessionSettings(lost_after_s=60)),
        provisioner=prov,
    )
    body = {"id": "again", "command": ["true"]}
    try:
        async with TestClient(TestServer(app)) as client:

            async def logs(query: str = "") -> Any:
                resp = await client.get(f"/api/v1/sandboxes/again/logs{query}")
                return resp.status, await resp.json()

            async def pod_gone() -> None:
                await driver.events.put(PodState("again", "sandbox-again", "Deleted", pod_uid="uid-1"))
                await phase_becomes(store, "again", "Deleted")

            resp = await client.post("/api/v1/sandboxes", json=body)
            assert resp.status == 201 and (await resp.json())["generation"] == 1
            driver.pods["again"] = PodState("again", "sandbox-again", "Running", pod_uid="uid-1")
            await driver.events.put(driver.pods["again"])
            await phase_becomes(store, "again", "Running")
            await events.store_events("again", "e1", [Event(1, 0, LogRecord(LogStream.STDOUT, "first life"))])

            assert (await client.delete("/api/v1/sandboxes/again")).status == 202
            # Its pod is terminating (its supervisor may still deliver): the id stays taken.
            resp = await client.post("/api/v1/sandboxes", json=body)
            assert resp.status == 409
            assert "create it again once its pod is gone" in (await resp.json())["error"]

            await pod_gone()
            resp = await client.post("/api/v1/sandboxes", json=body)
            assert resp.status == 201, await resp.text()
            assert (await resp.json())["generation"] == 2
            shown = await (await client.get("/api/v1/sandboxes/again")).json()
            assert shown["generation"] == 2 and shown["state"] == "pending" and shown["exit_code"] is None
            await events.store_events(
                "again", "e2", [Event(1, 0, LogRecord(LogStream.STDOUT, "second life"))]
            )
            status, now = await logs()
            assert status == 200 and now["generation"] == 2
            assert [(e["message"], e["generation"]) for e in now["events"]] == [("second life", 2)]
            status, before = await logs("?generation=1")
            assert [(e["message"], e["generation"]) for e in before["events"]] == [("first life", 1)]
            status, refused = await logs("?generation=3")
            assert status == 400 and "generation" in refused["error"]

            # A create again that fails keeps every earlier life's events, and frees the id.
            assert (await client.delete("/api/v1/sandboxes/again")).status == 202
            await pod_gone()
            resp = await client.post("/api/v1/sandboxes", json={"id": "again", "image": "unknown:1"})
            assert resp.status == 400, await resp.text()
            assert await events.count("again") == 2
            resp = await client.post("/api/v1/sandboxes", json=body)
            assert resp.status == 201 and (await resp.json())["generation"] == 4
    finally:
        await prov.close()
        await db.close()


async def test_a_late_create_keeps_its_id_until_it_ends_or_a_delete_finds_no_pod(
    store: SandboxStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch's deadline marks a create without a pod Failed, but does not free its id: the
    create may still be making its pod, and a second create would make the same one."""
    driver = FakeDriver(delay=1.0)
    prov = provisioner(store, driver)
    slow = asyncio.create_task(prov.create("late", ["true"], image=None, env={}))
    await phase_becomes(store, "late", "Creating")
    monkeypatch.setattr("gateway.provisioner.CREATE_DEADLINE_S", 0.0)
    await prov._catch_up()
    await phase_becomes(store, "late", "Failed")
    with pytest.raises(ProvisionError) as refused:
        await provisioner(store, FakeDriver()).create("late", ["true"], image=None, env={})
    assert refused.value.status == 409, "the id is still the first create's"
    created = await slow
    row = await store.get("late")
    assert created["generation"] == 1 and row is not None and row.generation == 1
    assert row.spec is not None and row.pod_uid == "uid-1", "its writes landed"

    # A create the gateway never finished (it stopped in between): a DELETE that finds no pod
    # frees the id.
    await store.create("orphan", driver="kubernetes", driver_state={"phase": "Creating", "at": T_OLD})
    await prov._catch_up()
    await phase_becomes(store, "orphan", "Failed")
    with pytest.raises(ProvisionError):
        await prov.create("orphan", ["true"], image=None, env={})
    assert await prov.delete("orphan") is False
    assert (await prov.create("orphan", ["true"], image=None, env={}))["generation"] == 2


async def test_a_failed_create_again_shows_no_credentials_and_touches_only_its_generation(
    store: SandboxStore,
) -> None:
    await store.create("cred", driver="kubernetes", driver_state={"phase": "Deleted"})
    failure = RegistryError(
        "GET https://robot:hunter2@registry.example/v2/x/manifests/1: 401 (Authorization: Bearer "
        "tok3n; token=s3cr3t)",
        caller_fault=False,
    )
    with pytest.raises(ProvisionError) as raised:
        await provisioner(store, FakeDriver(fail_with=failure)).create("cred", ["true"], image=None, env={})
    row = await store.get("cred")
    assert row is not None and row.generation == 2
    state = row.driver_state or {}
    assert state["phase"] == "Failed" and state["released"] is True
    for shown in (state["reason"], str(raised.value)):
        assert "registry.example" in shown
        assert not any(secret in shown for secret in ("hunter2", "tok3n", "s3cr3t")), shown
    # The failed create's writes name its generation: on a row of another one they change nothing.
    assert not await store.set_driver_state("cred", {"phase": "Running"}, generation=1)
    assert not await store.set_spec("cred", {"image": "x:1"}, generation=1)
    assert not await store.delete("cred", generation=1)
    assert (await store.get("cred")).driver_state == state  # type: ignore[union-attr]


async def test_a_delete_frees_a_create_past_its_deadline_that_the_watch_never_marked(
    store: SandboxStore,
) -> None:
    """A gateway that stopped between registering a sandbox and creating its pod, and came back
    within the deadline, leaves the row ``Creating``: its watch lists the pods only at start and
    after an error, so it never marks it. A DELETE that finds no pod frees the id all the same;
    one of a create still within its deadline (perhaps in flight elsewhere) does not."""
    prov = provisioner(store, FakeDriver())
    await store.create("stuck", driver="kubernetes", driver_state={"phase": "Creating", "at": T_OLD})
    await store.create(
        "young", driver="kubernetes", driver_state={"phase": "Creating", "at": utcnow().isoformat()}
    )
    for sandbox_id in ("stuck", "young"):
        with pytest.raises(ProvisionError) as refused:
            await prov.create(sandbox_id, ["true"], image=None, env={})
        assert refused.value.status == 409
        assert await prov.delete(sandbox_id) is False
    assert (await prov.create("stuck", ["true"], image=None, env={}))["generation"] == 2
    with pytest.raises(ProvisionError) as refused:
        await prov.create("young", ["true"], image=None, env={})
    assert refused.value.status == 409, "a create within its deadline may still make its pod"
