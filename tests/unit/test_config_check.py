"""``openshell-gateway config check`` refuses exactly what ``serve`` would, and both say so alike.

Every case runs the real command lines: ``config check FILE`` (``main()``, in process) and
``serve --config FILE`` (the installed ``openshell-gateway``, in a subprocess with a deadline, as
a serve that accepted the file would run until stopped). Both must exit 78 (EX_CONFIG) with one
line per problem naming the key, no traceback and no password; ``serve`` before it opened its
database (the file of the SQLite URL is never made), so before it bound anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import cli as gateway_cli
from openshell_wire.configfile import deep_merge
from openshell_wire.hostport import listen_address_problem

GATEWAY = Path(sys.executable).with_name("openshell-gateway")
EX_CONFIG = 78
#: A serve that accepted its config runs until stopped: the deadline ends it (and fails the case).
SERVE_DEADLINE_S = 60


def _base(tmp_path: Path) -> dict[str, Any]:
    return {
        "grpc": {"listen": "127.0.0.1:0"},
        "http": {"listen": "127.0.0.1:0"},
        "ops": {"listen": "127.0.0.1:0"},
        "database": {"url": f"sqlite:///{tmp_path / 'db' / 'gateway.db'}"},
    }


def _write(tmp_path: Path, overrides: dict[str, Any] | None = None, raw: str = "") -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(deep_merge(_base(tmp_path), overrides or {})) + raw)
    return path


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("OPENSHELL_")}
    return {**env, **(extra or {})}


def _assert_refusal(err: str, expected: list[str], *, program: str = "openshell-gateway") -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"{program}: invalid configuration"), err
    assert lines[1:] and all(line.startswith("  - ") for line in lines[1:]), err
    for text in expected:
        assert text in err, err
    assert "hunter2" not in err, err


# (id, file overrides, raw YAML appended to the file, environment, what the message must name)
CASES: list[tuple[str, dict[str, Any], str, dict[str, str], list[str]]] = [
    (
        "mysql-url",
        {"database": {"url": "mysql://u:hunter2@db/x"}},
        "",
        {},
        ["database.url", "unsupported database 'mysql'", "mysql://u:***@db/x"],
    ),
    (
        "sync-driver",
        {"database": {"url": "postgresql+psycopg2://u:hunter2@db/x"}},
        "",
        {},
        ["database.url", "through asyncpg only, not psycopg2"],
    ),
    (
        "sqlite-relative-no-url",
        {"database": {"url": "sqlite:relative"}},
        "",
        {},
        ["database.url", "not a database URL"],
    ),
    (
        # A rule across keys quotes the whole input back: never the database's password.
        "password-in-a-rule-across-keys",
        {"http": {"listen": "0.0.0.0:0"}, "database": {"url": "postgresql://u:hunter2@db/x"}},
        "",
        {},
        ["http.listen 0.0.0.0:0 is reachable from the network", "postgresql://u:***@db/x"],
    ),
    ("ip-out-of-range", {"grpc": {"listen": "999.1.1.1:80"}}, "", {}, ["grpc.listen", "not an IPv4 address"]),
    (
        "port-out-of-range",
        {"http": {"listen": "host:99999"}},
        "",
        {},
        ["http.listen", "out of range 0-65535"],
    ),
    ("port-not-a-number", {"ops": {"listen": ":abc"}}, "", {}, ["ops.listen", "'abc' is not a number"]),
    ("grpc-without-host", {"grpc": {"listen": ":7070"}}, "", {}, ["grpc.listen", "has no host"]),
    ("ipv6-without-brackets", {"ops": {"listen": "::1:7090"}}, "", {}, ["ops.listen", "in brackets"]),
    (
        "duplicate-top-level-key",
        {},
        "log_level: info\nlog_level: debug\n",
        {},
        ["key 'log_level' is given twice", "first on line"],
    ),
    (
        "duplicate-section-key",
        {},
        "sessions:\n  grace_s: 5\n  grace_s: 6\n",
        {},
        ["key 'grace_s' is given twice"],
    ),
    (
        "duplicate-deep-key",
        {},
        "auth:\n  oidc:\n    roles:\n      admin: [a]\n      admin: [b]\n",
        {},
        ["key 'admin' is given twice"],
    ),
    ("integer-key", {}, "1: x\n", {}, ["key 1 is not a string", "line "]),
    ("boolean-key", {}, "true: x\n", {}, ["key true is not a string"]),
    (
        "unknown-env-section",
        {},
        "",
        {"OPENSHELL_GATEWAY_NOSUCH__X": "1"},
        ["environment OPENSHELL_GATEWAY_NOSUCH__X", "nosuch is no setting"],
    ),
    (
        "unknown-env-section-after-a-double-underscore",
        {},
        "",
        {"OPENSHELL_GATEWAY__NOSUCH__X": "1"},
        ["environment OPENSHELL_GATEWAY__NOSUCH__X"],
    ),
    (
        "bad-value-from-the-environment",
        {},
        "",
        {"OPENSHELL_GATEWAY_GRPC__LISTEN": "localhost:70000"},
        ["grpc.listen", "out of range"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_config_check_refuses_what_serve_refuses(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: tuple[str, dict[str, Any], str, dict[str, str], list[str]],
) -> None:
    _, overrides, raw, env, expected = case
    path = _write(tmp_path, overrides, raw)
    for name in [name for name in os.environ if name.startswith("OPENSHELL_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    assert gateway_cli.main(["config", "check", str(path)]) == EX_CONFIG
    captured = capsys.readouterr()
    assert captured.out == ""
    _assert_refusal(captured.err, expected)

    served = subprocess.run(
        [str(GATEWAY), "serve", "--config", str(path)],
        env=_clean_env(env),
        capture_output=True,
        text=True,
        timeout=SERVE_DEADLINE_S,
        check=False,
    )
    assert served.returncode == EX_CONFIG, served.stderr
    _assert_refusal(served.stderr, expected)
    assert not (tmp_path / "db").exists(), "serve opened its database before refusing the config"


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"grpc": {"listen": "[::1]:0"}, "http": {"listen": "localhost:0"}, "ops": {"listen": ":0"}},
        {"grpc": {"listen": "gateway.example.com:7070"}},
        {
            "database": {
                "url": "postgresql://u:p@db/x?host=a:5432&host=b:5432&target_session_attrs=read-write"
            }
        },
        {"database": {"url": "postgresql+asyncpg://u:p@db/x"}},
        {"database": {"url": "postgres://u:p@db/x"}},
        {"database": {"url": "sqlite+aiosqlite:///relative.db"}},
    ],
    ids=[
        "defaults",
        "other-listen-forms",
        "host-name",
        "multi-host",
        "asyncpg",
        "postgres-alias",
        "aiosqlite",
    ],
)
def test_config_check_accepts_what_serve_accepts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, Any],
) -> None:
    for name in [name for name in os.environ if name.startswith("OPENSHELL_")]:
        monkeypatch.delenv(name)
    path = _write(tmp_path, overrides)
    assert gateway_cli.main(["config", "check", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out == f"{path}: ok\n"


def test_a_merge_key_may_be_overridden_but_a_key_not_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """YAML's merge key (<<) brings keys the mapping's own override: that is no duplicate."""
    for name in [name for name in os.environ if name.startswith("OPENSHELL_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "merge.yaml"
    path.write_text(
        "http: &listener\n  listen: 127.0.0.1:0\nops:\n  <<: *listener\n  listen: 127.0.0.1:1\n"
        f"database:\n  url: sqlite:///{tmp_path / 'x.db'}\n"
    )
    assert gateway_cli.main(["config", "check", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("address", "host_required", "problem"),
    [
        ("127.0.0.1:7070", True, None),
        ("0.0.0.0:0", True, None),
        ("[::]:7070", True, None),
        ("gateway-0.gateway.svc.cluster.local:7070", True, None),
        (":7080", False, None),
        (":7080", True, "has no host"),
        ("999.1.1.1:80", False, "not an IPv4 address"),
        ("1.2.3:80", False, "not an IPv4 address"),
        ("host:65536", False, "out of range"),
        ("host:-1", False, "not a number"),
        ("host", False, "is not host:port"),
        ("host:", False, "has no port"),
        ("[zz]:80", False, "not an IPv6 address"),
        ("::1:80", False, "in brackets"),
        ("under_score:80", False, "neither an IP address nor a host name"),
        ("http://host:80", False, "is not host:port"),
    ],
)
def test_listen_address_rules(address: str, host_required: bool, problem: str | None) -> None:
    found = listen_address_problem(address, host_required=host_required)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found and repr(address) in found


def test_kubernetes_service_links_are_no_unknown_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Services named openshell-gateway(-external) put these in every pod of their namespace (unless
    enableServiceLinks: false): they must not stop the gateway; a look-alike typo still does."""
    for name in [name for name in os.environ if name.startswith("OPENSHELL_")]:
        monkeypatch.delenv(name)
    links = {
        "OPENSHELL_GATEWAY_SERVICE_HOST": "10.0.0.7",
        "OPENSHELL_GATEWAY_SERVICE_PORT": "7070",
        "OPENSHELL_GATEWAY_SERVICE_PORT_GRPC": "7070",
        "OPENSHELL_GATEWAY_PORT": "tcp://10.0.0.7:7070",
        "OPENSHELL_GATEWAY_PORT_7070_TCP": "tcp://10.0.0.7:7070",
        "OPENSHELL_GATEWAY_PORT_7070_TCP_PROTO": "tcp",
        "OPENSHELL_GATEWAY_PORT_7070_TCP_PORT": "7070",
        "OPENSHELL_GATEWAY_PORT_7070_TCP_ADDR": "10.0.0.7",
        "OPENSHELL_GATEWAY_EXTERNAL_SERVICE_HOST": "10.0.0.8",
        "OPENSHELL_GATEWAY_EXTERNAL_PORT": "tcp://10.0.0.8:443",
    }
    for name, value in links.items():
        monkeypatch.setenv(name, value)
    path = _write(tmp_path)
    assert gateway_cli.main(["config", "check", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out == f"{path}: ok\n"

    monkeypatch.setenv("OPENSHELL_GATEWAY_GRPC_PORT", "7071")
    assert gateway_cli.main(["config", "check", str(path)]) == EX_CONFIG
    err = capsys.readouterr().err
    _assert_refusal(err, ["environment OPENSHELL_GATEWAY_GRPC_PORT: grpc_port is no setting"])
    assert "SERVICE_HOST" not in err
