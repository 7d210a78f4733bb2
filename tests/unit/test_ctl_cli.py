"""The CLI's own rules, without a gateway: where a command talks to (contexts and their
precedence), with which token, how its line is parsed, what a bad client config file says, and
what a bare invocation prints. The command line itself runs as a process where the exit status
and the streams are the point."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from gateway.cli import _parser, split_command
from gateway.clientauth import ClientAuthError, StaticToken, credentials_for
from gateway.ctl import exits
from gateway.ctl.commands import UsageError, signal_value
from gateway.ctl.contexts import DEFAULT_API, resolve
from gateway.ctl.output import table
from openshell_wire.configfile import ConfigError
from tests.support.procs import PYTHON, REPO

LIVE, DEAD = "https://live.example", "http://dead.example:7080"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "gateway", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENSHELL_")}
    return {**clean, "XDG_CONFIG_HOME": str(tmp_path / "config")}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "client.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "current_context": "dead",
                "contexts": {
                    "live": {"api": LIVE + "/", "token_file": str(tmp_path / "live.token")},
                    "dead": {"api": DEAD, "insecure": True},
                },
            }
        )
    )
    return path


def test_bare_invocation_prints_the_help_and_exits_0(env: dict[str, str]) -> None:
    done = _cli(env)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("usage: openshell-gateway") and "examples:" in done.stdout
    for command in ("get", "logs", "create", "delete", "signal", "stop", "commands", "version", "serve"):
        assert f"\n    {command} " in done.stdout, command


def test_help_shows_defaults_and_examples(env: dict[str, str]) -> None:
    get = _cli(env, "get", "--help").stdout
    assert (
        "(default: table)" in get and "(default: 2.0)" in get and "openshell-gateway get sb-1 -o yaml" in get
    )
    logs = _cli(env, "logs", "--help").stdout
    assert "--since T" in logs and "-f, --follow" in logs and "examples:" in logs


@pytest.mark.parametrize(
    ("args", "env", "api", "source"),
    [
        ({}, {}, DEAD, "context dead"),
        ({}, {"OPENSHELL_CONTEXT": "live"}, LIVE, "context live"),
        ({}, {"OPENSHELL_API": "http://env.example"}, "http://env.example", "$OPENSHELL_API"),
        ({"context": "live"}, {"OPENSHELL_API": "http://env.example"}, LIVE, "context live"),
        ({"api": "http://flag.example/"}, {"OPENSHELL_CONTEXT": "live"}, "http://flag.example", "--api"),
        ({"api": "http://flag.example", "context": "live"}, {}, "http://flag.example", "--api"),
    ],
)
def test_the_api_comes_from_flag_then_env_then_file(
    config_file: Path, args: dict[str, str], env: dict[str, str], api: str, source: str
) -> None:
    target = resolve(api=args.get("api"), context=args.get("context"), env=env, path=config_file)
    assert (target.api, target.source) == (api, source)
    # A context's token file and insecure come with its api only.
    if source == "context live":
        assert target.token_file == config_file.parent / "live.token" and not target.insecure
    elif source == "context dead":
        assert target.token_file is None and target.insecure
    else:
        assert target.context is None and target.token_file is None and not target.insecure


def test_without_a_file_or_anything_the_default_api(tmp_path: Path) -> None:
    target = resolve(api=None, context=None, env={}, path=tmp_path / "absent.yaml")
    assert (target.api, target.source) == (DEFAULT_API, "default")
    with pytest.raises(ConfigError, match=r"contexts\.prod: no such context.*the file does not exist"):
        resolve(api=None, context="prod", env={}, path=tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("contexts: {a: {api: ftp://x}}", "contexts.a.api: not an http:// or https:// URL with a host"),
        ("contexts: {a: {api: http://x, colour: red}}", "contexts.a.colour: unknown key"),
        (
            "current_context: b\ncontexts: {a: {api: http://x}}",
            "current_context 'b' is not one of the contexts",
        ),
        ("contexts: [a, b]", "contexts: Input should be a valid dictionary"),
        ("contexts: {a: {api: http://x}", "not valid YAML"),
        ("- a list", "the top level must be a mapping"),
    ],
)
def test_a_bad_client_config_file_is_78_naming_the_file_and_key(
    env: dict[str, str], tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    done = _cli({**env, "OPENSHELL_CONFIG": str(path)}, "get")
    assert done.returncode == exits.CONFIG, done
    assert str(path) in done.stderr and problem in done.stderr and "Traceback" not in done.stderr


def test_the_context_commands_edit_the_file(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "config" / "openshell" / "config.yaml"
    assert _cli(env, "config", "set-context", "a", "--api", "http://a.example:7080/").returncode == 0
    assert _cli(env, "config", "set-context", "a", "--insecure", "--use").returncode == 0
    assert _cli(env, "config", "set-context", "b", "--token-file", "/t").returncode == exits.USAGE  # no api
    assert yaml.safe_load(path.read_text()) == {
        "current_context": "a",
        "contexts": {"a": {"api": "http://a.example:7080", "insecure": True}},
    }
    bad = _cli(env, "config", "use-context", "nope")
    assert bad.returncode == exits.CONFIG and "contexts.nope" in bad.stderr and str(path) in bad.stderr
    assert _cli(env, "config", "delete-context", "a").returncode == 0
    assert yaml.safe_load(path.read_text()) == {}
    none = _cli(env, "config", "current-context")
    assert none.returncode == exits.CONFIG and "current_context: not set" in none.stderr
    # The server's config commands are still there.
    assert _cli(env, "config", "schema").returncode == 0


def test_a_contexts_token_file_ranks_below_the_flag_and_the_environment(tmp_path: Path) -> None:
    context_file, flag_file = tmp_path / "context.token", tmp_path / "flag.token"
    context_file.write_text("from-context")
    flag_file.write_text("from-flag")

    def token_of(*, token_file: Path | None, env: dict[str, str]) -> str:
        found = credentials_for(
            LIVE, token_file=token_file, env=env, context_token_file=context_file, context="live"
        )
        assert isinstance(found, StaticToken)
        return found.origin

    assert token_of(token_file=None, env={}).startswith("context live's token_file")
    assert token_of(token_file=None, env={"OPENSHELL_TOKEN": "t"}) == "OPENSHELL_TOKEN"
    assert token_of(token_file=flag_file, env={"OPENSHELL_TOKEN": "t"}).startswith("--token-file")
    context_file.unlink()
    with pytest.raises(ClientAuthError, match=r"context live's token_file .*: no such file"):
        token_of(token_file=None, env={})


def test_connection_options_go_before_or_after_the_command_word() -> None:
    parser = _parser()
    after = parser.parse_args(
        ["get", "sb", "--api", "http://x", "--context", "c", "--insecure", "-o", "wide"]
    )
    before = parser.parse_args(
        ["--api", "http://x", "--context", "c", "--insecure", "get", "sb", "-o", "wide"]
    )
    assert vars(after) == vars(before)
    assert (after.api, after.context, after.insecure, after.output, after.id) == (
        "http://x",
        "c",
        True,
        "wide",
        "sb",
    )
    # Not given after the command word: the top level's value stays.
    assert parser.parse_args(["--api", "http://y", "logs", "sb"]).api == "http://y"
    assert parser.parse_args(["logs", "sb"]).api is None


def test_the_sandboxs_command_is_what_follows_the_first_dashes() -> None:
    assert split_command(["create", "sb", "--env", "A=1"]) == (["create", "sb", "--env", "A=1"], None)
    assert split_command(["create", "sb", "--", "sh", "-c", "x", "--", "-y"]) == (
        ["create", "sb"],
        ["sh", "-c", "x", "--", "-y"],
    )


def test_signals_by_name_or_number() -> None:
    assert [signal_value(s) for s in ("usr1", "SIGUSR1", "Hup", "9")] == ["SIGUSR1", "SIGUSR1", "SIGHUP", 9]
    with pytest.raises(UsageError, match="SIGNOPE"):
        signal_value("SIGNOPE")


def test_tables_never_cut_a_cell() -> None:
    long = "x" * 80
    text = table(("ID", "STATE"), [[long, "connected"], ["a", "exited"]])
    assert text.splitlines() == [
        "ID" + " " * 81 + "STATE",
        long + "   connected",
        "a" + " " * 82 + "exited",
    ]


def test_each_api_status_has_one_exit_status() -> None:
    assert [exits.for_status(s) for s in (None, 400, 401, 403, 404, 409, 422, 500, 503)] == [
        69, 1, 77, 77, 3, 1, 1, 69, 69,
    ]  # fmt: skip
