"""The HTTP API with people's OIDC tokens: every endpoint per role, refusals (401 with the bearer
challenge, 503 for an issuer that cannot be asked, 403 for a role too low), and ownership (a
non-admin sees and acts only on its own and its teams' sandboxes, in the list's query too).

Real parts throughout: an issuer made in the test (tests/support/oidc.py: real keys, a real HTTP
server), the real API over a real SQLite store. Only the driver behind sandbox creation is a
stand-in that registers the sandbox in the store (as the Kubernetes provisioner does before it
makes a pod; the real one is tested in test_provisioner.py and the e2e tests).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.api import build_api
from gateway.auth.people import PeopleAuth, Role, person_of
from gateway.config import OidcSettings
from gateway.drivers import ProvisionError
from gateway.metrics import GatewayMetrics
from gateway.sessions import SessionRegistry
from gateway.store import CommandStore, Database, EventStore, SandboxRow, SandboxStore
from openshell_wire.records import CommandKind, Event, LogRecord, LogStream
from tests.support.oidc import AUDIENCE, SigningKey, TestIssuer


class StoreProvisioner:
    """The driver's stand-in: registers the sandbox as the Kubernetes provisioner does (creator
    and team included), makes no pod."""

    def __init__(self, store: SandboxStore) -> None:
        self.store = store
        self.deleted: list[str] = []
        #: Ids whose sandbox is gone (its process exited, its pod deleted): they may be created again.
        self.gone: set[str] = set()

    async def create(
        self,
        sandbox_id: str,
        command: Sequence[str],
        *,
        image: str | None,
        env: Mapping[str, str],
        created_by: str | None = None,
        team: str | None = None,
        may_replace: Callable[[SandboxRow], bool] | None = None,
    ) -> dict[str, Any]:
        generation = await self.store.create(
            sandbox_id,
            driver="test",
            spec={"command": list(command)},
            replaces=lambda row: row.id in self.gone,
            may_replace=may_replace,
            created_by=created_by,
            team=team,
        )
        if generation is None:
            # As the Kubernetes provisioner's 409 does: the phase of the pod there now.
            raise ProvisionError(409, f"sandbox {sandbox_id!r} exists (its pod is Running)")
        self.gone.discard(sandbox_id)
        return {"id": sandbox_id, "generation": generation}

    async def delete(self, sandbox_id: str) -> bool:
        self.deleted.append(sandbox_id)
        return True

    async def close(self) -> None:
        return None


@dataclass
class Env:
    client: TestClient[Any, Any]
    issuer: TestIssuer
    sandboxes: SandboxStore
    events: EventStore
    commands: CommandStore
    provisioner: StoreProvisioner
    metrics: GatewayMetrics

    def token(
        self, user: str, *, realm: Sequence[str] = (), client: Sequence[str] = (), groups: Sequence[str] = ()
    ) -> str:
        return self.issuer.token(
            preferred_username=user,
            realm_access={"roles": list(realm)},
            resource_access={"openshell": {"roles": list(client)}, "account": {"roles": ["view-profile"]}},
            groups=list(groups),
        )

    async def call(self, method: str, path: str, token: str | None, *, body: Any = None, status: int) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        resp = await self.client.request(method, path, headers=headers, json=body)
        assert resp.status == status, f"{method} {path}: {resp.status} {await resp.text()}"
        assert resp.content_type == "application/json"
        return await resp.json()


OIDC = {
    "role_claims": ["realm_access.roles", "resource_access.openshell.roles", "groups"],
    "roles": {
        "admin": ["openshell-admin"],
        "operator": ["openshell-operator"],
        "viewer": ["openshell-viewer"],
    },
}


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    issuer = await TestIssuer(published=[SigningKey.rsa("k1")]).start()
    db = await Database.open(f"sqlite:///{tmp_path}/gateway.db")
    sandboxes, events, commands = SandboxStore(db), EventStore(db), CommandStore(db)
    provisioner = StoreProvisioner(sandboxes)
    settings = OidcSettings.model_validate({"issuer_url": issuer.url, "audience": [AUDIENCE], **OIDC})
    metrics = GatewayMetrics(SessionRegistry())
    app = build_api(
        sandboxes=sandboxes,
        events=events,
        commands=commands,
        provisioner=provisioner,
        auth=PeopleAuth(settings),
        metrics=metrics,
    )
    try:
        async with TestClient(TestServer(app)) as client:
            yield Env(client, issuer, sandboxes, events, commands, provisioner, metrics)
    finally:
        await db.close()
        await issuer.stop()


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


TEAM_X, TEAM_Y = "/teams/x", "/teams/y"


def people(env: Env) -> dict[str, str | None]:
    """One caller per role, all of team x (so only the role decides here), each role found at
    another claim path; and one with no OpenShell role."""
    return {
        "viewer": env.token("vic", realm=["openshell-viewer", "offline_access"], groups=[TEAM_X]),
        "operator": env.token("olga", client=["openshell-operator"], groups=[TEAM_X]),
        "admin": env.token("ada", groups=[TEAM_X, "openshell-admin"]),
        "none": env.token("nemo", realm=["offline_access"], groups=[TEAM_X]),
    }


async def test_each_endpoint_answers_by_role(env: Env) -> None:
    tokens = people(env)
    await env.sandboxes.create("sb", driver="test", created_by="someone", team=TEAM_X)
    await env.events.store_events("sb", "e1", [Event(1, 1, LogRecord(LogStream.STDOUT, "hello"))])
    command = await env.commands.create("sb", CommandKind.STOP)
    reads = [
        ("GET", "/api/v1/sandboxes", None),
        ("GET", "/api/v1/sandboxes/sb", None),
        ("GET", "/api/v1/sandboxes/sb/logs", None),
        ("GET", "/api/v1/sandboxes/sb/commands", None),
        ("GET", f"/api/v1/commands/{command.command.command_id}", None),
    ]
    for role, token in tokens.items():
        for method, path, body in reads:
            await env.call(method, path, token, body=body, status=403 if role == "none" else 200)
        writes = [
            ("POST", "/api/v1/sandboxes", {"id": f"new-{role}", "command": ["true"]}, 201),
            ("POST", "/api/v1/sandboxes/sb/commands", {"kind": "stop"}, 201),
            ("DELETE", "/api/v1/sandboxes/sb", None, 202),
        ]
        for method, path, body, allowed in writes:
            await env.call(
                method, path, token, body=body, status=allowed if role in ("operator", "admin") else 403
            )
    assert sorted(r.id for r in await env.sandboxes.list()) == ["new-admin", "new-operator", "sb"]
    assert env.provisioner.deleted == ["sb", "sb"]
    assert sample(env.metrics, "openshell_gateway_api_denials_total", role="viewer", action="create") == 1
    assert (
        sample(env.metrics, "openshell_gateway_api_auth_failures_total", reason="no_role") == len(reads) + 3
    )
    # No role: the answer says why, and which claims were looked at.
    answer = await env.call("GET", "/api/v1/sandboxes", tokens["none"], status=403)
    assert "nemo has no OpenShell role" in answer["error"] and "realm_access.roles" in answer["error"]


async def test_bad_tokens_are_401_with_a_bearer_challenge_and_never_echoed(env: Env) -> None:
    resp = await env.client.get("/api/v1/sandboxes")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="openshell"'
    expired = env.issuer.token(
        exp=1_000_000_000, iat=999_999_000, realm_access={"roles": ["openshell-admin"]}
    )
    for header, reason in (
        (f"Bearer {expired}", "expired"),
        ("Basic dXNlcjpwYXNz", "malformed"),
        ("Bearer not-a-jwt", "malformed"),
        (f"Bearer {env.issuer.token(aud='account')}", "wrong_audience"),
    ):
        resp = await env.client.get("/api/v1/sandboxes", headers={"Authorization": header})
        assert resp.status == 401, await resp.text()
        challenge = resp.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="openshell", error="invalid_token", error_description="')
        body = await resp.text()
        token = header.split(" ", 1)[1]
        assert token not in body and token not in challenge
        assert sample(env.metrics, "openshell_gateway_api_auth_failures_total", reason=reason) >= 1
    assert sample(env.metrics, "openshell_gateway_api_auth_failures_total", reason="missing") == 1


async def test_the_auth_endpoint_needs_no_token_and_names_the_issuer(env: Env) -> None:
    answer = await env.call("GET", "/api/v1/auth", None, status=200)
    assert answer == {
        "oidc": True,
        "issuer": env.issuer.url,
        "cli_client_id": "openshell-cli",
        "audience": [AUDIENCE],
    }


async def test_an_issuer_that_cannot_be_asked_is_503(env: Env) -> None:
    token = people(env)["admin"]
    await env.issuer.stop()
    answer = await env.call("GET", "/api/v1/sandboxes", token, status=503)
    assert "could not be fetched" in answer["error"]
    assert sample(env.metrics, "openshell_gateway_api_auth_failures_total", reason="issuer_unavailable") == 1


async def test_non_admins_see_and_act_only_on_their_own_and_their_teams_sandboxes(env: Env) -> None:
    alice = env.token("alice", realm=["openshell-operator"], groups=[TEAM_X, "/teams/z"])
    carol = env.token("carol", realm=["openshell-operator"], groups=[TEAM_X])
    bob = env.token("bob", realm=["openshell-operator"], groups=[TEAM_Y])
    admin = env.token("root", realm=["openshell-admin"])
    await env.call("POST", "/api/v1/sandboxes", alice, body={"id": "sb-a", "command": ["true"]}, status=201)
    created = await env.call("GET", "/api/v1/sandboxes/sb-a", alice, status=200)
    assert (created["created_by"], created["team"]) == ("alice", TEAM_X)  # her first team
    await env.call("POST", "/api/v1/sandboxes", bob, body={"id": "sb-b", "command": ["true"]}, status=201)
    # A team that is not the caller's is refused; one of them may be named.
    answer = await env.call(
        "POST", "/api/v1/sandboxes", bob, body={"id": "sb-c", "command": ["true"], "team": TEAM_X}, status=403
    )
    assert "not one of yours" in answer["error"]
    await env.call(
        "POST",
        "/api/v1/sandboxes",
        alice,
        body={"id": "sb-z", "command": ["true"], "team": "/teams/z"},
        status=201,
    )
    await env.call(
        "POST",
        "/api/v1/sandboxes",
        admin,
        body={"id": "sb-y", "command": ["true"], "team": TEAM_Y},
        status=201,
    )
    command = await env.call(
        "POST", "/api/v1/sandboxes/sb-a/commands", alice, body={"kind": "stop"}, status=201
    )

    def ids(answer: Any) -> list[str]:
        return [s["id"] for s in answer["sandboxes"]]

    assert ids(await env.call("GET", "/api/v1/sandboxes", alice, status=200)) == ["sb-a", "sb-z"]
    assert ids(await env.call("GET", "/api/v1/sandboxes", carol, status=200)) == ["sb-a"]  # team-mate
    assert ids(await env.call("GET", "/api/v1/sandboxes", bob, status=200)) == ["sb-b", "sb-y"]
    assert ids(await env.call("GET", "/api/v1/sandboxes", admin, status=200)) == [
        "sb-a",
        "sb-b",
        "sb-y",
        "sb-z",
    ]
    shown = await env.call("GET", "/api/v1/sandboxes/sb-a", carol, status=200)
    assert (shown["created_by"], shown["team"]) == ("alice", TEAM_X)

    # Bob cannot tell sb-a from a sandbox that does not exist, whatever he asks.
    for method, path, body in (
        ("GET", "/api/v1/sandboxes/sb-a", None),
        ("GET", "/api/v1/sandboxes/sb-a/logs", None),
        ("GET", "/api/v1/sandboxes/sb-a/logs?follow=1", None),
        ("GET", "/api/v1/sandboxes/sb-a/commands", None),
        ("POST", "/api/v1/sandboxes/sb-a/commands", {"kind": "stop"}),
        ("DELETE", "/api/v1/sandboxes/sb-a", None),
        ("GET", f"/api/v1/commands/{command['id']}", None),
    ):
        mine = await env.call(method, path, bob, body=body, status=404)
        missing = await env.call(
            method, path.replace("sb-a", "sb-nope").replace(command["id"], "nope"), bob, body=body, status=404
        )
        assert mine["error"].replace("sb-a", "X").replace(command["id"], "X") == missing["error"].replace(
            "sb-nope", "X"
        ).replace("nope", "X")
    assert env.provisioner.deleted == []
    # The team-mate acts on it; the admin too.
    await env.call("GET", f"/api/v1/commands/{command['id']}", carol, status=200)
    await env.call("POST", "/api/v1/sandboxes/sb-a/commands", carol, body={"kind": "stop"}, status=201)
    await env.call("DELETE", "/api/v1/sandboxes/sb-b", admin, status=202)
    await env.call("DELETE", "/api/v1/sandboxes/sb-a", carol, status=202)
    assert env.provisioner.deleted == ["sb-b", "sb-a"]


async def test_the_list_is_filtered_in_the_query_so_pages_stay_full(env: Env) -> None:
    bob = env.token("bob", realm=["openshell-viewer"], groups=[TEAM_Y])
    mine = []
    for n in range(40):
        # One in three is bob's (his own, or of his team), the rest another team's.
        owner, team = [("bob", None), ("dora", TEAM_Y), ("alice", TEAM_X)][n % 3]
        await env.sandboxes.create(f"sb-{n:02d}", driver="test", created_by=owner, team=team)
        if owner != "alice":
            mine.append(f"sb-{n:02d}")
    seen: list[str] = []
    after = ""
    pages = 0
    while True:
        answer = await env.call("GET", f"/api/v1/sandboxes?limit=5&after={after}", bob, status=200)
        page = [s["id"] for s in answer["sandboxes"]]
        pages += 1
        if answer["next"] is None:
            seen += page
            break
        assert len(page) == 5  # full: filtering after the page would leave it short
        assert answer["next"] == page[-1]
        seen += page
        after = answer["next"]
    assert seen == sorted(mine)
    assert pages == len(mine) // 5 + 1
    await env.call("GET", "/api/v1/sandboxes?limit=0", bob, status=400)


def test_roles_come_from_any_claim_path_and_the_highest_wins() -> None:
    settings = OidcSettings.model_validate({"issuer_url": "https://idp.example/realms/r", **OIDC})
    claims = {
        "sub": "id-1",
        "realm_access": {"roles": ["openshell-viewer"]},
        "resource_access": {"openshell": {"roles": "openshell-operator"}},  # one string, not a list
        "groups": ["/teams/a", "/teams/b", "/teams/a", 7],
    }
    person = person_of(claims, settings)
    assert (person.username, person.role, person.teams) == ("id-1", Role.OPERATOR, ("/teams/a", "/teams/b"))
    assert person_of({**claims, "groups": ["openshell-admin"]}, settings).role is Role.ADMIN
    assert person_of({"sub": "x", "realm_access": {"roles": {"openshell-admin": 1}}}, settings).role is None
    assert person_of({"sub": "x", "preferred_username": "xavier"}, settings).username == "xavier"


async def test_without_oidc_every_caller_is_admin(tmp_path: Path) -> None:
    db = await Database.open(f"sqlite:///{tmp_path}/gateway.db")
    sandboxes = SandboxStore(db)
    app = build_api(sandboxes=sandboxes, events=EventStore(db), provisioner=StoreProvisioner(sandboxes))
    try:
        async with TestClient(TestServer(app)) as client:
            await sandboxes.create("theirs", driver="test", created_by="alice", team=TEAM_X)
            resp = await client.post(
                "/api/v1/sandboxes", json={"id": "mine", "command": ["true"], "team": TEAM_Y}
            )
            assert resp.status == 201, await resp.text()
            assert await (await client.get("/api/v1/auth")).json() == {"oidc": False}
            listed = (await (await client.get("/api/v1/sandboxes")).json())["sandboxes"]
            assert [(s["id"], s["created_by"], s["team"]) for s in listed] == [
                ("mine", None, TEAM_Y),
                ("theirs", "alice", TEAM_X),
            ]
    finally:
        await db.close()


async def test_an_id_is_re_created_only_by_whoever_may_see_it_so_its_history_stays_theirs(env: Env) -> None:
    """A re-created id keeps its earlier generations' logs and commands (?generation=N): someone
    who may not see the sandbox there now must not get them by creating the id again."""
    alice = env.token("alice", realm=["openshell-operator"], groups=[TEAM_X])
    carol = env.token("carol", realm=["openshell-operator"], groups=[TEAM_X])
    bob = env.token("bob", realm=["openshell-operator"], groups=[TEAM_Y])
    admin = env.token("root", realm=["openshell-admin"])
    await env.call(
        "POST", "/api/v1/sandboxes", alice, body={"id": "secret-sb", "command": ["true"]}, status=201
    )
    await env.events.store_events(
        "secret-sb", "e1", [Event(1, 1, LogRecord(LogStream.STDOUT, "AWS_SECRET=hunter2"))], generation=1
    )
    command = await env.call(
        "POST", "/api/v1/sandboxes/secret-sb/commands", alice, body={"kind": "stop"}, status=201
    )
    # Running: bob is told it is taken, and nothing more (not its pod's phase) ...
    running = await env.call(
        "POST", "/api/v1/sandboxes", bob, body={"id": "secret-sb", "command": ["true"]}, status=409
    )
    assert running["error"] == "sandbox 'secret-sb' is taken: choose another id"
    # ... and gone (its process exited, its pod deleted): the same answer, and no takeover.
    env.provisioner.gone.add("secret-sb")
    gone = await env.call(
        "POST", "/api/v1/sandboxes", bob, body={"id": "secret-sb", "command": ["true"]}, status=409
    )
    assert gone == running
    for path in (
        "/api/v1/sandboxes/secret-sb/logs?generation=1",
        "/api/v1/sandboxes/secret-sb/commands",
        f"/api/v1/commands/{command['id']}",
    ):
        await env.call("GET", path, bob, status=404)
    logs = await env.call("GET", "/api/v1/sandboxes/secret-sb/logs?generation=1", alice, status=200)
    assert [e["message"] for e in logs["events"]] == ["AWS_SECRET=hunter2"]
    # Alice's team-mate may: the id stays with the people who could read its history anyway.
    again = await env.call(
        "POST", "/api/v1/sandboxes", carol, body={"id": "secret-sb", "command": ["true"]}, status=201
    )
    assert again["generation"] == 2
    await env.call("GET", "/api/v1/sandboxes/secret-sb/logs?generation=1", alice, status=200)
    # The same 409 as before for a live one; an admin may take any id over.
    await env.call(
        "POST", "/api/v1/sandboxes", alice, body={"id": "secret-sb", "command": ["true"]}, status=409
    )
    env.provisioner.gone.add("secret-sb")
    taken = await env.call(
        "POST", "/api/v1/sandboxes", admin, body={"id": "secret-sb", "command": ["true"]}, status=201
    )
    assert taken["generation"] == 3


def test_only_groups_under_the_team_prefix_are_teams_never_a_role_group() -> None:
    settings = OidcSettings.model_validate(
        {
            "issuer_url": "https://idp.example/realms/r",
            **OIDC,
            "roles": {"operator": ["/openshell-operators"], "admin": ["/teams/admins"]},
        }
    )
    claims = {
        "preferred_username": "carol",
        # Keycloak's order, which it does not promise: a role group first, a default group.
        "groups": ["/openshell-operators", "/teams/b", "/everyone", "/teams/a", "/teams/", "/teams/admins"],
    }
    person = person_of(claims, settings)
    assert (person.role, person.teams) == (Role.ADMIN, ("/teams/a", "/teams/b"))
    everything = settings.model_copy(update={"team_prefix": ""})
    assert person_of(claims, everything).teams == ("/everyone", "/teams/", "/teams/a", "/teams/b")


async def test_a_sandbox_created_without_a_team_gets_the_first_team_by_name(env: Env) -> None:
    dora = env.token("dora", realm=["openshell-operator"], groups=["/openshell-everyone", "/teams/z", TEAM_Y])
    await env.call("POST", "/api/v1/sandboxes", dora, body={"id": "sb-d", "command": ["true"]}, status=201)
    assert (await env.call("GET", "/api/v1/sandboxes/sb-d", dora, status=200))["team"] == TEAM_Y
    answer = await env.call(
        "POST",
        "/api/v1/sandboxes",
        dora,
        body={"id": "sb-e", "command": ["true"], "team": "/openshell-everyone"},
        status=403,
    )
    assert "not one of yours" in answer["error"]


async def test_refusal_log_lines_cannot_be_forged_through_the_path(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.api")
    resp = await env.client.get("/api/v1/sandboxes/x%0aINFO%20forged%20line%0d")
    assert resp.status == 401
    lines = [r.getMessage() for r in caplog.records if "401" in r.getMessage()]
    assert lines and all("\n" not in line and "\r" not in line for line in lines)
    assert "/api/v1/sandboxes/x%0ainfo%20forged%20line%0d" in lines[0].lower()  # as sent, still encoded
