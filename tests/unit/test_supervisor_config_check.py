"""``openshell-supervisor config check`` refuses exactly what ``run`` would, and accepts what it runs.

Every case runs the real command lines: ``config check FILE`` (``main()``, in process) and ``run
--config FILE -- true`` (the installed ``openshell-supervisor``, in a subprocess with a deadline).
Both must exit 78 (EX_CONFIG) with one line per problem naming the key and no traceback; ``run``
before it started anything (its journal directory is never made). A file without sandbox_id is
what a deployment gives every sandbox (each pod passes ``--sandbox-id``): check accepts it, as
``run`` does with the id on its command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from openshell_wire.configfile import deep_merge
from supervisor import cli as supervisor_cli

SUPERVISOR = Path(sys.executable).with_name("openshell-supervisor")
EX_CONFIG = 78
RUN_DEADLINE_S = 60


def _write(
    tmp_path: Path, overrides: dict[str, Any] | None = None, raw: str = "", *, sandbox_id: str | None = "s1"
) -> Path:
    base: dict[str, Any] = {
        # Nothing listens there: a run that got past its config delivers nothing and gives up at
        # once (exit_delivery_s 0).
        "gateway": {"address": "127.0.0.1:1"},
        "journal": {"directory": str(tmp_path / "journal")},
        "session": {"exit_delivery_s": 0},
    }
    if sandbox_id is not None:
        base["sandbox_id"] = sandbox_id
    path = tmp_path / "supervisor.yaml"
    path.write_text(yaml.safe_dump(deep_merge(base, overrides or {})) + raw)
    return path


@pytest.fixture(autouse=True)
def _no_inherited_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("OPENSHELL_")]:
        monkeypatch.delenv(name)


def _run(path: Path, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SUPERVISOR), "run", "--config", str(path), "--sandbox-id", "s1", "--", "true"],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=RUN_DEADLINE_S,
        check=False,
    )


def _assert_refusal(err: str, expected: list[str]) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("openshell-supervisor: invalid configuration"), err
    assert lines[1:] and all(line.startswith("  - ") for line in lines[1:]), err
    for text in expected:
        assert text in err, err


# (id, file overrides, raw YAML appended to the file, environment, what the message must name)
CASES: list[tuple[str, dict[str, Any], str, dict[str, str], list[str]]] = [
    (
        "listen-port-out-of-range",
        {"http": {"enabled": True, "listen": "localhost:99999"}},
        "",
        {},
        ["http.listen", "out of range 0-65535"],
    ),
    (
        "listen-ip-out-of-range",
        {"http": {"enabled": True, "listen": "999.1.1.1:9469"}},
        "",
        {},
        ["http.listen", "not an IPv4 address"],
    ),
    (
        "listen-port-not-a-number",
        {"http": {"enabled": True, "listen": ":abc"}},
        "",
        {},
        ["http.listen", "not a number"],
    ),
    (
        "duplicate-top-level-key",
        {},
        "log_level: info\nlog_level: debug\n",
        {},
        ["key 'log_level' is given twice"],
    ),
    (
        "duplicate-nested-key",
        {},
        "capture:\n  echo: true\n  echo: false\n",
        {},
        ["key 'echo' is given twice", "first on line"],
    ),
    ("integer-key", {}, "1: x\n", {}, ["key 1 is not a string"]),
    ("boolean-key", {}, "true: x\n", {}, ["key true is not a string"]),
    (
        "unknown-env-section",
        {},
        "",
        {"OPENSHELL_SUPERVISOR_NOSUCH__X": "1"},
        ["environment OPENSHELL_SUPERVISOR_NOSUCH__X", "nosuch is no setting"],
    ),
    (
        "env-key-with-one-underscore",
        {},
        "",
        {"OPENSHELL_SUPERVISOR_JOURNAL_FSYNC": "never"},
        ["environment OPENSHELL_SUPERVISOR_JOURNAL_FSYNC", "journal_fsync is no setting"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_config_check_refuses_what_run_refuses(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: tuple[str, dict[str, Any], str, dict[str, str], list[str]],
) -> None:
    _, overrides, raw, env, expected = case
    path = _write(tmp_path, overrides, raw)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    assert supervisor_cli.main(["config", "check", str(path)]) == EX_CONFIG
    captured = capsys.readouterr()
    assert captured.out == ""
    _assert_refusal(captured.err, expected)

    ran = _run(path)
    assert ran.returncode == EX_CONFIG, ran.stderr
    _assert_refusal(ran.stderr, expected)
    assert not (tmp_path / "journal").exists(), "run started before refusing the config"


def test_a_file_without_sandbox_id_checks_ok_as_run_takes_the_id_from_its_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, sandbox_id=None)
    assert supervisor_cli.main(["config", "check", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: ok") and "--sandbox-id" in out and "sandbox_id" in out

    ran = _run(path)  # --sandbox-id s1
    assert ran.returncode == 0, ran.stderr

    # With the id given to check too: checked like the rest, and no note.
    assert supervisor_cli.main(["config", "check", str(path), "--sandbox-id", "s1"]) == 0
    assert capsys.readouterr().out == f"{path}: ok\n"
    assert supervisor_cli.main(["config", "check", str(path), "--sandbox-id", "Not_A_Name"]) == EX_CONFIG
    _assert_refusal(capsys.readouterr().err, ["sandbox_id", "Not_A_Name"])


def test_a_sandbox_id_in_the_file_or_the_environment_is_checked_not_stood_in_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _write(tmp_path, sandbox_id="Bad_Id")
    assert supervisor_cli.main(["config", "check", str(bad)]) == EX_CONFIG
    _assert_refusal(capsys.readouterr().err, ["sandbox_id", "Bad_Id"])

    path = _write(tmp_path, sandbox_id=None)
    monkeypatch.setenv("OPENSHELL_SUPERVISOR_SANDBOX_ID", "Bad_Id")
    assert supervisor_cli.main(["config", "check", str(path)]) == EX_CONFIG
    _assert_refusal(capsys.readouterr().err, ["sandbox_id", "Bad_Id"])
    monkeypatch.setenv("OPENSHELL_SUPERVISOR_SANDBOX_ID", "from-env")
    assert supervisor_cli.main(["config", "check", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok\n"


def test_run_without_any_sandbox_id_is_still_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, sandbox_id=None)
    ran = subprocess.run(
        [str(SUPERVISOR), "run", "--config", str(path), "--", "true"],
        capture_output=True,
        text=True,
        timeout=RUN_DEADLINE_S,
        check=False,
    )
    assert ran.returncode == EX_CONFIG
    _assert_refusal(ran.stderr, ["sandbox_id: Field required"])
