"""``GET /api/v1/version`` and ``openshell-gateway version`` against an API with OIDC: the route
takes a token as every read does, and the CLI sends the one its context names.

Real parts: the API over a real SQLite store with a real token verifier, an issuer made in the
test (tests/support/oidc.py), the CLI's ``main()`` calling the served API over HTTP with a client
config file of the test's own.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from gateway.ctl import exits
from tests.unit.test_api_auth import Env, env, people  # noqa: F401 (env: the fixture)

RELEASE = importlib.metadata.version("openshell-supervisor")


async def test_the_version_route_answers_every_role_and_nobody_without_a_token(env: Env) -> None:  # noqa: F811
    for role, token in people(env).items():
        answer = await env.call("GET", "/api/v1/version", token, status=403 if role == "none" else 200)
        if role != "none":
            assert answer == {"version": RELEASE, "api": "v1"}
    refused = await env.call("GET", "/api/v1/version", None, status=401)
    assert "error" in refused


async def test_the_cli_sends_its_contexts_token(
    env: Env,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    api = str(env.client.make_url("")).rstrip("/")
    tokens = people(env)
    (tmp_path / "viewer.token").write_text(tokens["viewer"] or "")
    (tmp_path / "none.token").write_text(tokens["none"] or "")
    config = tmp_path / "client.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "current_context": "viewer",
                "contexts": {
                    "viewer": {"api": api, "token_file": "viewer.token"},  # beside the file
                    "nobody": {"api": api, "token_file": str(tmp_path / "none.token")},
                    "tokenless": {"api": api},
                },
            }
        )
    )
    for name in ("OPENSHELL_API", "OPENSHELL_CONTEXT", "OPENSHELL_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENSHELL_CONFIG", str(config))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))

    # main() runs its own event loop: in a thread, while this loop serves the API.
    assert await asyncio.to_thread(main, ["version", "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"client": {"version": RELEASE}, "server": {"version": RELEASE, "api": "v1", "url": api}}

    assert await asyncio.to_thread(main, ["version", "--context", "nobody"]) == exits.NOPERM
    captured = capsys.readouterr()
    assert captured.out == f"client: {RELEASE}\n" and "no OpenShell role" in captured.err

    assert await asyncio.to_thread(main, ["--context", "tokenless", "version"]) == exits.NOPERM
    assert "openshell-gateway login --api" in capsys.readouterr().err
