"""One typed config per component: flags > env > file > defaults, every problem named by key path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway import cli as gateway_cli
from gateway.config import GatewayConfig
from openshell_wire.configfile import ConfigError, load_settings, parse_set_flags
from supervisor import cli as supervisor_cli
from supervisor.config import SupervisorConfig


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_precedence_is_flags_then_env_then_file_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(
        tmp_path,
        "sandbox_id: from-file\njournal:\n  fsync: never\n  max_bytes: 16777216\n"
        "gateway:\n  address: file:1\n",
    )
    monkeypatch.setenv("OPENSHELL_SUPERVISOR_JOURNAL__FSYNC", "always")
    monkeypatch.setenv("OPENSHELL_SUPERVISOR_GATEWAY__ADDRESS", "env:2")
    config = load_settings(SupervisorConfig, file=path, overrides={"gateway": {"address": "flag:3"}})
    assert config.sandbox_id == "from-file"  # only the file sets it
    assert config.journal.max_bytes == 16777216  # file beats the default
    assert config.journal.fsync == "always"  # env beats the file
    assert config.gateway.address == "flag:3"  # flags beat env
    assert config.journal.segment_bytes == 4 * 1024 * 1024  # default


def test_every_problem_is_reported_with_its_key_path(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "grpc:\n  listen: 1.2.3.4:5\n  max_receive_message_bytes: lots\n"
        "sessions:\n  heartbeat_interval_s: -1\n"
        "surprise: true\ndatabase:\n  uri: x\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(GatewayConfig, file=path, use_env=False)
    problems = "\n".join(info.value.problems)
    assert "grpc.max_receive_message_bytes: Input should be a valid integer" in problems
    assert "sessions.heartbeat_interval_s: Input should be greater than or equal to 0.1" in problems
    assert "surprise: unknown key" in problems
    assert "database.uri: unknown key" in problems
    assert len(info.value.problems) == 4
    assert str(path) in str(info.value)


def test_yaml_syntax_errors_name_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "grpc:\n  listen: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_settings(GatewayConfig, file=path, use_env=False)
    assert "line 3" in info.value.problems[0] or "line 2" in info.value.problems[0]
    assert "not valid YAML" in info.value.problems[0]


def test_missing_file_and_non_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(GatewayConfig, file=tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_settings(GatewayConfig, file=_write(tmp_path, "- a\n- b\n"))


def test_unknown_env_keys_under_our_prefix_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENSHELL_GATEWAY_GRPC__LISTN", "typo")
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings(GatewayConfig)


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="at least twice segment_bytes"):
        load_settings(
            SupervisorConfig,
            overrides={"sandbox_id": "s", "journal": {"segment_bytes": 1 << 20, "max_bytes": 1 << 20}},
            use_env=False,
        )
    with pytest.raises(ConfigError, match=r"both 127\.0\.0\.1:9"):
        load_settings(
            GatewayConfig, overrides={"grpc": {"listen": "127.0.0.1:9"}, "http": {"listen": "127.0.0.1:9"}}
        )


def test_the_deprecated_exit_window_name_keeps_the_layer_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """session.exit_flush_timeout_s in one layer and session.exit_delivery_s in another: the higher
    layer wins, as for any other key (not a conflict), and the old name is warned about."""
    path = _write(tmp_path, "sandbox_id: s\nsession:\n  exit_flush_timeout_s: 30\n")
    assert load_settings(SupervisorConfig, file=path).session.exit_delivery_s == 30
    assert "session.exit_flush_timeout_s is deprecated" in caplog.text
    flag = load_settings(
        SupervisorConfig, file=path, overrides=parse_set_flags(["session.exit_delivery_s=45"])
    )
    assert flag.session.exit_delivery_s == 45 and flag.session.exit_flush_timeout_s == 45
    monkeypatch.setenv("OPENSHELL_SUPERVISOR_SESSION__EXIT_DELIVERY_S", "90")
    assert load_settings(SupervisorConfig, file=path).session.exit_delivery_s == 90
    # The old name in a higher layer beats the new one in a lower layer just the same.
    old_flag = parse_set_flags(["session.exit_flush_timeout_s=20"])
    assert load_settings(SupervisorConfig, file=path, overrides=old_flag).session.exit_delivery_s == 20
    monkeypatch.setenv("OPENSHELL_SUPERVISOR_SESSION__EXIT_FLUSH_TIMEOUT_S", "12")
    with pytest.raises(ConfigError, match=r"set session\.exit_delivery_s only"):
        load_settings(SupervisorConfig, file=path)  # both names in the environment, disagreeing


def test_set_flags_build_nested_values() -> None:
    expected = {"a": {"b": 1, "c": "x"}, "d": True, "e": ""}
    assert parse_set_flags(["a.b=1", "a.c=x", "d=true", "e="]) == expected
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set_flags(["novalue"])


def test_gateway_config_check_and_schema_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _write(tmp_path, "sessions:\n  heartbeat_interval_s: 5\n")
    assert gateway_cli.main(["config", "check", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("sessions:\n  heartbeat_interval_s: often\n")
    assert gateway_cli.main(["config", "check", str(bad)]) == 78
    assert "sessions.heartbeat_interval_s" in capsys.readouterr().err
    assert gateway_cli.main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"grpc", "http", "database", "sessions", "drivers"} <= set(schema["properties"])


def test_supervisor_cli_reports_config_errors_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    code = supervisor_cli.main(["run", "--set", "journal.max_bytes=many", "--", "true"])
    err = capsys.readouterr().err
    assert code == 78
    assert "sandbox_id: Field required" in err
    assert "journal.max_bytes" in err
    assert "Traceback" not in err
    assert supervisor_cli.main(["config", "schema"]) == 0
    assert "sandbox_id" in json.loads(capsys.readouterr().out)["required"]
