"""The CLI's own rules, without a gateway: where a command talks to (contexts and their
precedence), with which token, how its line is parsed, what a bad client config file says, and
what a bare invocation prints. The command line itself runs as a process where the exit status
and the streams are the point."""

from __future__ import annotations

import os
import signal as signals
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from gateway import api
from gateway.cli import _parser, split_command
from gateway.clientauth import ClientAuthError, StaticToken, credentials_for
from gateway.ctl import exits, parser
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


# -------------------------------------------------------- issue 23 point 4: the review's findings


def _cli_in(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI run from ``cwd`` (``python -m gateway`` finds the checkout through PYTHONPATH)."""
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [PYTHON, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": path},
        cwd=cwd,
        timeout=60,
    )


def test_set_context_stores_a_relative_token_file_from_where_it_was_typed(
    env: dict[str, str], tmp_path: Path
) -> None:
    work, cfg = tmp_path / "work", tmp_path / "cfg"
    work.mkdir()
    (work / "prod.token").write_text("secret")
    env = {**env, "OPENSHELL_CONFIG": str(cfg / "config.yaml")}
    dead = f"http://127.0.0.1:{_closed_port()}"
    set_context = _cli_in(
        work, env, "config", "set-context", "prod", "--api", dead, "--token-file", "prod.token"
    )
    assert set_context.returncode == 0, set_context
    stored = yaml.safe_load((cfg / "config.yaml").read_text())["contexts"]["prod"]["token_file"]
    assert stored == str(work / "prod.token")
    # Read from anywhere: the token is found (the call then fails to connect: 69, not 77).
    done = _cli_in(tmp_path, env, "get", "--context", "prod")
    assert done.returncode == exits.UNAVAILABLE and "cannot reach" in done.stderr, done


def test_a_hand_written_relative_token_file_is_beside_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "config.yaml"
    path.parent.mkdir()
    path.write_text("contexts: {prod: {api: 'http://x', token_file: prod.token}}")
    target = resolve(api=None, context="prod", env={}, path=path)
    assert target.token_file == tmp_path / "cfg" / "prod.token"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["stop", "sb", "--grace", "nan"], "--grace"),
        (["stop", "sb", "--grace", "inf"], "--grace"),
        (["stop", "sb", "--grace", "-1"], "--grace"),
        (["stop", "sb", "--grace", "3601"], "--grace"),  # the API's most: 3600000 ms
        (["get", "--watch", "--interval", "nan"], "--interval"),
        (["get", "--watch", "--interval", "0"], "--interval"),
        (["get", "--watch", "--interval", "1e300"], "--interval"),
        (["signal", "sb", "USR1", "--wait", "--timeout", "nan"], "--timeout"),
        (["signal", "sb", "USR1", "--wait", "--timeout", "-5"], "--timeout"),
        (["signal", "sb", "USR1", "--expires-in", "inf"], "--expires-in"),
        (["stop", "sb", "--expires-in", "0.5"], "--expires-in"),  # the API's least: 1 s
        (["logs", "sb", "--tail", "-1"], "--tail"),
        (["logs", "sb", "--tail", "10001"], "--tail"),
        (["logs", "sb", "--generation", "0"], "--generation"),
        (["status", "--lines", "-3"], "--lines"),
        (["demo", "--steps", "-1"], "--steps"),
    ],
)
def test_a_numeric_option_out_of_its_range_is_a_usage_error_naming_it(
    env: dict[str, str], args: list[str], option: str
) -> None:
    done = _cli({**env, "OPENSHELL_API": f"http://127.0.0.1:{_closed_port()}"}, *args)
    assert done.returncode == exits.USAGE, done
    assert f"argument {option}:" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_clients_numeric_bounds_are_the_apis() -> None:
    assert parser.MAX_TAIL == api.MAX_TAIL
    most = round(parser.MAX_GRACE_S * 1000)
    assert api._command_args({"kind": "stop", "grace_ms": most})[1] == {"grace_ms": most}
    with pytest.raises(api.ApiError):
        api._command_args({"kind": "stop", "grace_ms": most + 1})
    settings = api.CommandSettings()
    assert api._command_ttl({"expires_in_s": parser.MIN_EXPIRES_IN_S}, settings) == parser.MIN_EXPIRES_IN_S
    with pytest.raises(api.ApiError):
        api._command_ttl({"expires_in_s": parser.MIN_EXPIRES_IN_S - 0.01}, settings)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("gw.example.com:7080", "it needs its scheme"),
        ("http://127.0.0.1:99999", "Port out of range"),
        ("http://exa mple.com", "not a host and port"),
        ("http://[::1", "Invalid IPv6 URL"),
    ],
)
def test_a_bad_api_url_is_said_before_anything_is_sent(env: dict[str, str], url: str, problem: str) -> None:
    done = _cli(env, "get", "--api", url)
    assert done.returncode == exits.CONFIG and problem in done.stderr, done


def test_an_empty_sandbox_id_is_refused_not_a_listing(env: dict[str, str]) -> None:
    done = _cli({**env, "OPENSHELL_API": f"http://127.0.0.1:{_closed_port()}"}, "get", "")
    assert done.returncode == exits.USAGE and "sandbox id is empty" in done.stderr, done


def test_any_interrupted_one_shot_command_exits_130_as_the_table_says(env: dict[str, str]) -> None:
    """A gateway that takes the connection and never answers: Ctrl-C cuts ``get`` short."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        api = f"http://127.0.0.1:{mute.getsockname()[1]}"
        proc = subprocess.Popen(
            [PYTHON, "-m", "gateway", "get", "--api", api],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        mute.settimeout(30)
        conn, _ = mute.accept()  # the request is on its way: the command is waiting for the answer
        with conn:
            time.sleep(0.2)
            proc.send_signal(signals.SIGINT)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == exits.INTERRUPTED == 130 and "get interrupted" in err and "Traceback" not in err
    meaning = dict(exits.TABLE)[exits.INTERRUPTED]
    assert "any command" in meaning and "`get --watch` and `logs -f` (0)" in meaning, meaning


def test_a_config_file_that_cannot_be_written_is_78_naming_it(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "config.yaml"  # its directory is a file
    done = _cli({**env, "OPENSHELL_CONFIG": str(path)}, "config", "set-context", "a", "--api", "http://x")
    assert done.returncode == exits.CONFIG and "cannot write" in done.stderr, done
    assert str(path) in done.stderr and "Traceback" not in done.stderr
