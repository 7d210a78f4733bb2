"""People through a real Keycloak: the operators' realm (docs/keycloak/openshell-realm.json), users,
groups and roles made through its admin API, a real gateway checking their tokens, and the CLI's
device-flow login driven through Keycloak's own pages.

Keycloak starts once per session (tests/support/keycloak.py; ~30 s quiet, up to ~3 min on a
loaded machine) and skips with the reason where Java 21+ or the distribution cannot be had. Run
under ``flock /tmp/openshell-keycloak.lock`` on a shared machine.

Tokens for the role tests come from a password grant on a confidential client made here through
the admin API (``openshell-tests``): the realm file keeps direct grants off.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.support.keycloak import Keycloak, KeycloakUnavailable, approve_device_login, running_keycloak
from tests.support.procs import PYTHON, REPO, GatewayProcess, wait_until

pytestmark = pytest.mark.timeout(900)

AGENT = [PYTHON, "-u", "-c", "import time; print('agent up', flush=True); time.sleep(60)"]
TEST_CLIENT = "openshell-tests"


@pytest.fixture(scope="session")
def keycloak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keycloak]:
    try:
        with running_keycloak(tmp_path_factory.mktemp("keycloak")) as kc:
            yield kc
    except KeycloakUnavailable as exc:
        print(f"Keycloak tests skipped: {exc}", file=sys.stderr)
        pytest.skip(str(exc))


@dataclass
class People:
    kc: Keycloak
    secret: str
    passwords: dict[str, str]

    def token(self, username: str, *, client: str = TEST_CLIENT, secret: str | None = None) -> str:
        doc = self.kc.password_token(client, secret or self.secret, username, self.passwords[username])
        return str(doc["access_token"])


@pytest.fixture(scope="module")
def people(keycloak: Keycloak) -> People:
    passwords = {
        "alice": keycloak.create_user("alice", roles=["openshell-operator"], groups=["/teams/a"]),
        "bob": keycloak.create_user("bob", roles=["openshell-operator"], groups=["/teams/b"]),
        "carol": keycloak.create_user("carol", roles=["openshell-viewer"], groups=["/teams/a"]),
        "root": keycloak.create_user("root", roles=["openshell-admin"]),
        "dave": keycloak.create_user("dave", groups=["/teams/a"]),  # no OpenShell role
    }
    return People(keycloak, keycloak.create_test_client(TEST_CLIENT), passwords)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, keycloak: Keycloak) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(
        tmp_path_factory.mktemp("kc-gateway") / "gateway",
        auth=True,
        extra=[
            "--set", f"auth.oidc.issuer_url={keycloak.issuer}",
            # One clock here: no skew to allow, so an expired token is refused as soon as it expires.
            "--set", "auth.oidc.leeway_s=0",
            # Rotation: an unknown key id refetches at once, and a removed key ages out quickly.
            "--set", "auth.oidc.jwks_min_refetch_s=0",
            "--set", "auth.oidc.jwks_cache_s=2",
            # The CLI's client and the test clients made here; no other client's token is taken.
            "--set", f"auth.oidc.allowed_clients=[openshell-cli, {TEST_CLIENT}, openshell-short]",
        ],
    )  # fmt: skip
    gw.start()
    yield gw
    gw.stop()


def call(
    gw: GatewayProcess, method: str, path: str, token: str | None, body: object = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"http://127.0.0.1:{gw.http_port}/api/v1{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers=headers,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def visible(gw: GatewayProcess, token: str) -> set[str]:
    status, doc = call(gw, "GET", "/sandboxes", token)
    assert status == 200, doc
    return {sb["id"] for sb in doc["sandboxes"]}


def test_the_realm_gives_tokens_the_gateway_reads(people: People) -> None:
    """The realm file's mappers: aud names the API, groups are full paths, roles are realm roles."""
    claims = jwt.decode(people.token("alice"), options={"verify_signature": False})
    assert "openshell" in ([claims["aud"]] if isinstance(claims["aud"], str) else claims["aud"])
    assert claims["groups"] == ["/teams/a"]
    assert "openshell-operator" in claims["realm_access"]["roles"]
    assert claims["preferred_username"] == "alice"
    cli = people.kc.client("openshell-cli")
    assert cli["publicClient"] and not cli["standardFlowEnabled"] and not cli["directAccessGrantsEnabled"]
    assert cli["attributes"]["oauth2.device.authorization.grant.enabled"] == "true"
    assert cli["attributes"]["pkce.code.challenge.method"] == "S256"  # the login sends one


def test_roles_and_teams_through_the_api(people: People, gateway: GatewayProcess) -> None:
    alice, bob, carol, root, dave = (people.token(u) for u in ("alice", "bob", "carol", "root", "dave"))
    status, doc = call(gateway, "GET", "/auth", None)
    assert status == 200 and doc["issuer"] == people.kc.issuer and doc["cli_client_id"] == "openshell-cli"

    assert call(gateway, "GET", "/sandboxes", None)[0] == 401
    assert call(gateway, "GET", "/sandboxes", "not-a-token")[0] == 401
    assert call(gateway, "GET", "/sandboxes", dave)[0] == 403  # a person, but no OpenShell role

    status, doc = call(gateway, "POST", "/sandboxes", alice, {"id": "kc-alice", "command": AGENT})
    assert status == 201, doc
    status, doc = call(gateway, "GET", "/sandboxes/kc-alice", alice)
    assert status == 200 and doc["created_by"] == "alice" and doc["team"] == "/teams/a", doc
    status, doc = call(gateway, "POST", "/sandboxes", bob, {"id": "kc-bob", "command": AGENT})
    assert status == 201, doc
    status, doc = call(gateway, "POST", "/sandboxes", carol, {"id": "kc-carol", "command": AGENT})
    assert status == 403, doc  # a viewer creates nothing

    assert visible(gateway, alice) == {"kc-alice"}
    assert visible(gateway, carol) == {"kc-alice"}  # her team's
    assert visible(gateway, bob) == {"kc-bob"}
    assert {"kc-alice", "kc-bob"} <= visible(gateway, root)

    assert call(gateway, "GET", "/sandboxes/kc-alice", carol)[0] == 200
    assert call(gateway, "GET", "/sandboxes/kc-alice/logs", carol)[0] == 200
    assert call(gateway, "GET", "/sandboxes/kc-alice", bob)[0] == 404  # another team's: as if absent
    assert call(gateway, "GET", "/sandboxes/kc-alice/logs", bob)[0] == 404
    assert call(gateway, "DELETE", "/sandboxes/kc-alice", carol)[0] == 403  # sees it, cannot delete
    assert call(gateway, "DELETE", "/sandboxes/kc-alice", bob)[0] == 404
    assert call(gateway, "DELETE", "/sandboxes/kc-bob", root)[0] == 202  # admin: any sandbox
    assert call(gateway, "DELETE", "/sandboxes/kc-alice", alice)[0] == 202


def test_a_token_without_the_api_audience_is_refused(people: People, gateway: GatewayProcess) -> None:
    """A client without the audience mapper (the commonest set-up mistake, docs/auth.md)."""
    secret = people.kc.create_test_client("openshell-no-audience", mappers=False)
    token = people.token("alice", client="openshell-no-audience", secret=secret)
    status, doc = call(gateway, "GET", "/sandboxes", token)
    assert status == 401 and "aud" in doc["error"], doc


def test_a_token_of_another_client_is_refused_though_keycloak_gives_it_the_audience(
    people: People, gateway: GatewayProcess
) -> None:
    """Keycloak's default audience-resolve mapper puts openshell in the aud of ANY client's token
    for a person holding an openshell client role, no audience mapper needed: only azp
    (auth.oidc.allowed_clients) tells an unrelated application's token from the CLI's."""
    kc = people.kc
    api = kc.client("openshell")
    kc.admin("POST", f"/clients/{api['id']}/roles", {"name": "openshell-operator"})
    password = kc.create_user("eve", groups=["/teams/a"])
    user_id = kc.admin("GET", "/users?username=eve&exact=true")[0]["id"]
    role = kc.admin("GET", f"/clients/{api['id']}/roles/openshell-operator")
    kc.admin("POST", f"/users/{user_id}/role-mappings/clients/{api['id']}", [role])
    secret = kc.create_test_client("unrelated-app", mappers=False)
    token = str(kc.password_token("unrelated-app", secret, "eve", password)["access_token"])
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["azp"] == "unrelated-app"
    assert "openshell" in ([claims["aud"]] if isinstance(claims["aud"], str) else claims["aud"])
    assert claims["resource_access"]["openshell"]["roles"] == ["openshell-operator"]
    status, doc = call(gateway, "GET", "/sandboxes", token)
    assert status == 401 and "'unrelated-app'" in doc["error"] and "allowed_clients" in doc["error"], doc


def test_an_expired_token_is_refused(people: People, gateway: GatewayProcess) -> None:
    secret = people.kc.create_test_client("openshell-short", access_token_lifespan_s=2)
    token = people.token("alice", client="openshell-short", secret=secret)
    assert call(gateway, "GET", "/sandboxes", token)[0] == 200
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    wait_until(lambda: time.time() > exp + 1, timeout=30, what="the token's exp to pass")
    status, doc = call(gateway, "GET", "/sandboxes", token)
    assert status == 401 and "expired" in doc["error"], doc


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "gateway", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )


def test_cli_device_login_then_calls_refresh(people: People, gateway: GatewayProcess, tmp_path: Path) -> None:
    kc = people.kc
    # Poll every second (the realm's 5 s is for people); access tokens shorter than the CLI's 30 s
    # refresh margin, so that every call after the login refreshes first.
    kc.set_client_attributes(
        "openshell-cli", {"oauth2.device.polling.interval": "1", "access.token.lifespan": "20"}
    )
    api = f"http://127.0.0.1:{gateway.http_port}"
    env = {k: v for k, v in os.environ.items() if k != "OPENSHELL_TOKEN"}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    cache = tmp_path / "config" / "openshell" / "tokens.json"

    # No login yet: the CLI says what to do, no traceback.
    before = _cli(env, "status", "--api", api)
    assert before.returncode == 77, before
    assert "openshell-gateway login --api" in before.stderr and "Traceback" not in before.stderr

    login = subprocess.Popen(
        [PYTHON, "-m", "gateway", "login", "--api", api],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert login.stdout is not None
    printed: list[str] = []
    try:
        while (line := login.stdout.readline()) and not re.search(r"enter the code: (\S+)", line):
            printed.append(line)
        found = re.search(r"open (\S+) and enter the code: (\S+)", line)
        assert found, f"no user code printed: {[*printed, line]}"
        asyncio.run(
            approve_device_login(
                found.group(1), found.group(2), username="alice", password=people.passwords["alice"],
                base_url=kc.base_url,
            )
        )  # fmt: skip
        assert login.wait(60) == 0
        rest = login.stdout.read()
    finally:
        if login.poll() is None:
            login.kill()
            login.wait()
    assert "logged in as alice" in rest, rest
    assert cache.stat().st_mode & 0o777 == 0o600
    first = json.loads(cache.read_text())["logins"][api]

    created = _cli(env, "sandbox", "create", "--api", api, "kc-cli", "--", *AGENT)
    assert created.returncode == 0, created
    refreshed = json.loads(cache.read_text())["logins"][api]
    assert refreshed["access_token"] != first["access_token"], "the near-expiry token was not refreshed"

    # A token the gateway refuses (here: garbled) though not yet expired on this clock: the call is
    # answered 401, the CLI refreshes once and sends it again.
    doc = json.loads(cache.read_text())
    doc["logins"][api]["access_token"] = "garbled.token.value"
    doc["logins"][api]["expires_at"] = time.time() + 3600
    cache.write_text(json.dumps(doc))
    status = _cli(env, "status", "--api", api, "--json")
    assert status.returncode == 0, status
    assert ("kc-cli", "alice") in [(sb["id"], sb["created_by"]) for sb in json.loads(status.stdout)]
    assert json.loads(cache.read_text())["logins"][api]["access_token"] != "garbled.token.value"

    # The session ends at Keycloak (logged out there): the refresh fails, and the CLI says to log in.
    user = kc.admin("GET", "/users?username=alice&exact=true")[0]
    kc.admin("POST", f"/users/{user['id']}/logout")
    doc = json.loads(cache.read_text())
    doc["logins"][api]["expires_at"] = time.time()  # due for a refresh
    cache.write_text(json.dumps(doc))
    ended = _cli(env, "sandbox", "delete", "--api", api, "kc-cli")
    assert ended.returncode == 77, ended
    assert "openshell-gateway login --api" in ended.stderr and "Traceback" not in ended.stderr

    token_file = tmp_path / "token"
    token_file.write_text(people.token("alice") + "\n")
    deleted = _cli(env, "sandbox", "delete", "--api", api, "--token-file", str(token_file), "kc-cli")
    assert deleted.returncode == 0, deleted

    token_file.write_text("two words\n")
    bad = _cli(env, "status", "--api", api, "--token-file", str(token_file))
    assert bad.returncode == 77 and "not a bearer token" in bad.stderr and "Traceback" not in bad.stderr


def test_key_rotation_is_followed_without_a_restart(people: People, gateway: GatewayProcess) -> None:
    """A new signing key (higher priority) is taken on its first token (the JWKS refetched on an
    unknown key id); once the old key is removed, its tokens are refused. Last in this module: every
    token after it is signed by the new key."""
    kc = people.kc
    old_token = people.token("alice")
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    assert call(gateway, "GET", "/sandboxes", old_token)[0] == 200
    old_providers = [
        p for p in kc.key_providers() if p["providerId"] == "rsa-generated"
    ]  # the realm's RS256 key(s) before the rotation
    kc.add_rsa_key("rotated", priority=1000)
    new_token = people.token("alice")
    assert jwt.get_unverified_header(new_token)["kid"] != old_kid
    assert call(gateway, "GET", "/sandboxes", new_token)[0] == 200
    assert call(gateway, "GET", "/sandboxes", old_token)[0] == 200  # both keys published meanwhile

    for provider in old_providers:
        kc.remove_component(provider["id"])
    # Refused once the gateway's copy of the keys (auth.oidc.jwks_cache_s, 2 s here) is renewed.
    wait_until(
        lambda: call(gateway, "GET", "/sandboxes", old_token)[0] == 401,
        timeout=30,
        interval=0.5,
        what="a token of the removed key to be refused",
    )
    assert call(gateway, "GET", "/sandboxes", new_token)[0] == 200
    assert gateway.proc is not None and gateway.proc.poll() is None  # never restarted
