"""``openshell-gateway`` as an operator runs it: the real CLI, as a process, against a real gateway
process whose local driver starts real supervisors (and their main processes) for the sandboxes
the CLI creates.

What is checked is what the operator sees: the exit status, stdout and stderr of each command,
and the sandboxes' effects (their log lines, their exits) read back through the API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.ctl import exits
from tests.support.procs import PYTHON, REPO, GatewayProcess, wait_until

#: An id longer than the 24 characters the old status table cut ids to.
LONG_ID = "ctl-a-sandbox-id-longer-than-twenty-four-characters"

#: A main process that says which signals it got, and waits for a file before its last line.
SIGNALLED = textwrap.dedent(
    """
    import os, signal, sys, time
    def said(number, frame):
        print("got", signal.Signals(number).name, flush=True)
    signal.signal(signal.SIGUSR1, said)
    signal.signal(signal.SIGHUP, said)
    print("ready", flush=True)
    print("a warning on stderr", file=sys.stderr, flush=True)
    go = sys.argv[1]
    while not os.path.exists(go):
        time.sleep(0.05)
    print("after the go", flush=True)
    while True:
        time.sleep(0.1)
    """
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path_factory.mktemp("ctl-gateway"))
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def env(gateway: GatewayProcess, tmp_path: Path) -> dict[str, str]:
    """The CLI's environment: no OPENSHELL_* of the machine's, a config dir of the test's own."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENSHELL_")}
    return {**clean, "XDG_CONFIG_HOME": str(tmp_path / "config"), "OPENSHELL_API": api_of(gateway)}


def api_of(gateway: GatewayProcess) -> str:
    return f"http://127.0.0.1:{gateway.http_port}"


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "gateway", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )


#: The CLI as ``python -m gateway``, with SIGINT turned back into KeyboardInterrupt first: a test run
#: started in the background (nohup, ``&``, a CI runner) ignores SIGINT, a child inherits that,
#: Python then installs no KeyboardInterrupt, and the Ctrl-C the tests send would never arrive.
_CLI_WITH_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'openshell-gateway'; runpy.run_module('gateway', run_name='__main__')"
)


def popen(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-c", _CLI_WITH_CTRL_C, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def api_get(gateway: GatewayProcess, path: str) -> Any:
    with urllib.request.urlopen(f"{api_of(gateway)}/api/v1{path}", timeout=10) as resp:
        return json.loads(resp.read())


def messages(gateway: GatewayProcess, sandbox_id: str) -> list[str]:
    return [e["message"] for e in api_get(gateway, f"/sandboxes/{sandbox_id}/logs?tail=1000")["events"]]


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def interrupt(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Ctrl-C, as a terminal sends it; the exit status and what was left to read."""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    return proc.returncode, out, err


def read_until(proc: subprocess.Popen[str], wanted: str, *, timeout: float = 30) -> list[str]:
    """Lines of ``proc``'s stdout up to the first holding ``wanted``."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if wanted in line:
            return lines
    proc.kill()
    raise AssertionError(f"{wanted!r} never printed; got {lines}, stderr {proc.communicate()[1]}")


def started(env: dict[str, str], gateway: GatewayProcess, sandbox_id: str, go: Path) -> None:
    """A sandbox running SIGNALLED, created through the CLI, once its main process said ready."""
    ok(cli(env, "create", sandbox_id, "--", PYTHON, "-u", "-c", SIGNALLED, str(go)))
    wait_until(lambda: "ready" in messages(gateway, sandbox_id), timeout=30, what=f"{sandbox_id} ready")


# ------------------------------------------------------------------------------------ create


def test_create_takes_options_after_the_id_and_the_command_after_dashes(
    env: dict[str, str], gateway: GatewayProcess
) -> None:
    """Options after the id are ours; everything after -- is the command, its own options too.
    (On the old CLI, ``sandbox create ID --env ...`` made "--env" the command's first word.)"""
    script = "import os, sys; print(os.environ['GREETING'], sys.argv[1:], flush=True)"
    # The earlier spelling first: on the old CLI it ran "--env" as the command.
    for verb, sandbox_id in ((["sandbox", "create"], "ctl-create-old"), (["create"], "ctl-create-new")):
        out = ok(
            cli(env, *verb, sandbox_id, "--env", "GREETING=hello", "-o", "json", "--",
                PYTHON, "-c", script, "--verbose", "-x", "--")
        )  # fmt: skip
        assert json.loads(out)["id"] == sandbox_id
        wait_until(
            lambda sid=sandbox_id: "hello ['--verbose', '-x', '--']" in messages(gateway, sid),
            timeout=30,
            what=f"{sandbox_id}'s line",
        )


def test_an_unknown_option_before_the_dashes_is_refused_and_nothing_is_created(
    env: dict[str, str], gateway: GatewayProcess
) -> None:
    for verb in (["sandbox", "create"], ["create"]):
        done = cli(env, *verb, "ctl-never", "--imagee", "x", "--", "python3", "-c", "pass")
        assert done.returncode == exits.USAGE, done
        assert "--imagee" in done.stderr and "go after --" in done.stderr and "Traceback" not in done.stderr
        # A command's words without -- are not taken as the command either.
        done = cli(env, *verb, "ctl-never", "python3", "-c", "pass")
        assert done.returncode == exits.USAGE and "python3" in done.stderr, done
    missing = cli(env, "get", "ctl-never")
    assert missing.returncode == exits.NOT_FOUND and "no sandbox 'ctl-never'" in missing.stderr


def test_only_create_takes_a_command(env: dict[str, str]) -> None:
    done = cli(env, "get", "x", "--", "ls")
    assert done.returncode == exits.USAGE and "only create" in done.stderr


# ------------------------------------------------------------------------------------- get


def test_get_lists_and_shows_one_in_every_format_ids_whole(
    env: dict[str, str], gateway: GatewayProcess, tmp_path: Path
) -> None:
    started(env, gateway, LONG_ID, tmp_path / "go")
    table = ok(cli(env, "get"))
    header, *rows = table.splitlines()
    assert header.split()[:3] == ["ID", "STATE", "EXIT"]
    row = next(r for r in rows if r.startswith(LONG_ID + " "))
    assert row.split()[1] == "connected"
    # Columns aligned: every row's STATE starts where the header's does.
    column = header.index("STATE")
    assert all(r[column - 3 : column] == "   " and r[column] != " " for r in rows), table

    wide = ok(cli(env, "get", LONG_ID, "-o", "wide")).splitlines()
    assert "GENERATION" in wide[0] and "DRIVER STATE" in wide[0] and len(wide) == 2
    assert wide[1].split()[:2] == [LONG_ID, "connected"] and "local" in wide[1].split()

    one = json.loads(ok(cli(env, "get", LONG_ID, "-o", "json")))
    api_doc = api_get(gateway, f"/sandboxes/{LONG_ID}")
    assert (
        one.keys() == api_doc.keys() and one["id"] == LONG_ID and one["generation"] == api_doc["generation"]
    )
    listed = yaml.safe_load(ok(cli(env, "get", "-o", "yaml")))
    assert LONG_ID in [sb["id"] for sb in listed["sandboxes"]]
    assert yaml.safe_load(ok(cli(env, "get", LONG_ID, "--output=yaml")))["id"] == LONG_ID

    status = ok(cli(env, "status", "--lines", "1"))
    assert any(line.startswith(LONG_ID + " ") for line in status.splitlines()), status


def test_get_watch_prints_a_sandbox_that_changed_and_ends_on_ctrl_c(
    env: dict[str, str], gateway: GatewayProcess, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    script = f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)\nraise SystemExit(7)"
    ok(cli(env, "create", "ctl-watched", "--", PYTHON, "-c", script))
    wait_until(
        lambda: api_get(gateway, "/sandboxes/ctl-watched")["state"] == "connected",
        timeout=30,
        what="connected",
    )
    watch = popen(env, "get", "--watch", "--interval", "0.3")
    try:
        first = read_until(watch, "ctl-watched")
        assert first[0].split()[:2] == ["ID", "STATE"] and "connected" in first[-1]
        go.touch()
        changed = read_until(watch, "ctl-watched")
        assert changed[-1].split()[1:3] == ["exited", "7"], changed
    finally:
        code, _, err = interrupt(watch)
    assert code == 0 and "Traceback" not in err, err
    # A follow until the exit ends by itself, with the exit's record last.
    last = ok(cli(env, "logs", "ctl-watched", "-f", "--until-exit", "--kinds", "lifecycle")).splitlines()[-1]
    assert "exited with code 7" in last, last


# ------------------------------------------------------------------------------------ logs


def test_logs_by_stream_text_tail_and_time(
    env: dict[str, str], gateway: GatewayProcess, tmp_path: Path
) -> None:
    started(env, gateway, "ctl-logs", tmp_path / "go")
    everything = ok(cli(env, "logs", "ctl-logs"))
    assert "ready" in everything and "a warning on stderr" in everything and "lifecycle" in everything

    stderr = ok(cli(env, "logs", "ctl-logs", "--stream", "stderr")).splitlines()
    assert [line.split(None, 2)[1:] for line in stderr] == [["stderr", "a warning on stderr"]]

    # (--kinds log: the lifecycle record of the start holds the whole script, "warn" included.)
    found = ok(cli(env, "logs", "--grep", "warn", "ctl-logs", "--kinds", "log", "-o", "json")).splitlines()
    assert [json.loads(line)["message"] for line in found] == ["a warning on stderr"]

    assert len(ok(cli(env, "logs", "ctl-logs", "--tail", "2")).splitlines()) == 2
    assert ok(cli(env, "logs", "ctl-logs", "--until", "2000-01-01T00:00:00Z")) == ""
    # A level is a floor over the lines that carry one; captured lines carry none.
    assert ok(cli(env, "logs", "ctl-logs", "--level", "warn", "--kinds", "log")) == ""
    assert "ready" in ok(cli(env, "logs", "ctl-logs", "--since", "10m"))

    bad = cli(env, "logs", "ctl-logs", "--since", "soon")
    assert bad.returncode == exits.REFUSED and "since" in bad.stderr, bad
    unknown = cli(env, "logs", "ctl-nobody")
    assert unknown.returncode == exits.NOT_FOUND, unknown


def test_logs_follow_prints_a_line_written_after_it_started(
    env: dict[str, str], gateway: GatewayProcess, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    started(env, gateway, "ctl-follow", go)
    follow = popen(env, "logs", "ctl-follow", "-f", "--stream", "stdout")
    try:
        assert "ready" in read_until(follow, "ready")[-1]
        go.touch()
        line = read_until(follow, "after the go")[-1]
        assert line.split(None, 2)[1:] == ["stdout", "after the go\n"]
    finally:
        code, rest, err = interrupt(follow)
    assert code == 0 and "Traceback" not in err, err
    assert "stderr" not in rest


def test_logs_follow_cut_by_the_gateways_shutdown_says_so_and_exits_69(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The gateway ends every follow when it shuts down, with a clean end of the body: that must
    not read as the end of the sandbox's logs (exit 0 and nothing said)."""
    own = GatewayProcess(tmp_path / "gateway")
    own.start()
    try:
        env = {**env, "OPENSHELL_API": api_of(own)}
        started(env, own, "ctl-cut", tmp_path / "go")
        follow = popen(env, "logs", "ctl-cut", "-f")
        assert "ready" in read_until(follow, "ready")[-1]
        own.stop()
        _, err = follow.communicate(timeout=30)
    finally:
        own.stop()
    assert follow.returncode == exits.UNAVAILABLE, (follow.returncode, err)
    assert "ctl-cut" in err and "follow" in err and "Traceback" not in err, err


def test_get_watch_json_is_one_sandbox_object_per_line(
    env: dict[str, str], gateway: GatewayProcess, tmp_path: Path
) -> None:
    ok(cli(env, "create", "ctl-ndjson-a", "--", PYTHON, "-c", "import time; time.sleep(60)"))
    watch = popen(env, "get", "--watch", "--interval", "0.3", "-o", "json")
    try:
        first = json.loads(read_until(watch, '"ctl-ndjson-a"')[-1])
        assert first["id"] == "ctl-ndjson-a"
        ok(cli(env, "create", "ctl-ndjson-b", "--", PYTHON, "-c", "import time; time.sleep(60)"))
        lines = read_until(watch, '"ctl-ndjson-b"')
    finally:
        code, rest, err = interrupt(watch)
    assert code == 0 and "Traceback" not in err, err
    # Every line one whole sandbox object, from the first: no list envelope, no indented document.
    for line in [*lines, *rest.splitlines()]:
        doc = json.loads(line)
        assert isinstance(doc, dict) and "id" in doc and "state" in doc, line


# ---------------------------------------------------------------------- signal, stop, commands


def test_signal_and_stop_reach_the_supervisor(
    env: dict[str, str], gateway: GatewayProcess, tmp_path: Path
) -> None:
    started(env, gateway, "ctl-signals", tmp_path / "go")
    out = ok(cli(env, "signal", "ctl-signals", "usr1", "--wait"))
    assert "SIGUSR1" in out and "applied" in out
    wait_until(lambda: "got SIGUSR1" in messages(gateway, "ctl-signals"), timeout=20, what="SIGUSR1 seen")
    sent = json.loads(ok(cli(env, "signal", "ctl-signals", str(int(signal.SIGHUP)), "--wait", "-o", "json")))
    assert (sent["kind"], sent["signal"], sent["state"]) == ("signal", int(signal.SIGHUP), "applied")
    wait_until(lambda: "got SIGHUP" in messages(gateway, "ctl-signals"), timeout=20, what="SIGHUP seen")

    bogus = cli(env, "signal", "ctl-signals", "SIGBOGUS")
    assert bogus.returncode == exits.USAGE and "SIGBOGUS" in bogus.stderr

    stopped = ok(cli(env, "stop", "ctl-signals", "--grace", "1", "--wait"))
    assert "stop" in stopped and "applied" in stopped
    wait_until(
        lambda: api_get(gateway, "/sandboxes/ctl-signals")["state"] == "exited", timeout=30, what="the exit"
    )
    # SIGTERM ended the main process: 128 + 15.
    assert ok(cli(env, "get", "ctl-signals")).splitlines()[1].split()[1:3] == ["exited", "143"]

    table = ok(cli(env, "commands", "ctl-signals")).splitlines()
    assert table[0].split()[:4] == ["ID", "KIND", "ARGUMENT", "STATE"]
    # Newest first, as the API lists them.
    assert [(r.split()[1], r.split()[2]) for r in table[1:]] == [
        ("stop", "grace"), ("signal", "SIGHUP"), ("signal", "SIGUSR1"),
    ]  # fmt: skip
    listed = yaml.safe_load(ok(cli(env, "commands", "ctl-signals", "-o", "yaml")))
    assert [c["state"] for c in listed["commands"]] == ["applied"] * 3

    # Nothing left to take a command: --wait gives up, saying so, as unavailable.
    late = cli(env, "signal", "ctl-signals", "USR1", "--wait", "--timeout", "1")
    assert late.returncode == exits.UNAVAILABLE and "still pending" in late.stderr, late


def test_delete_stops_the_sandbox(env: dict[str, str], gateway: GatewayProcess, tmp_path: Path) -> None:
    started(env, gateway, "ctl-deleted", tmp_path / "go")
    assert "deleted" in ok(cli(env, "delete", "ctl-deleted"))
    wait_until(
        lambda: api_get(gateway, "/sandboxes/ctl-deleted")["state"] == "exited", timeout=30, what="the exit"
    )


# ---------------------------------------------------------------------------------- version


def test_version_names_the_client_and_the_server(env: dict[str, str], gateway: GatewayProcess) -> None:
    import importlib.metadata

    release = importlib.metadata.version("openshell-supervisor")
    lines = ok(cli(env, "version")).splitlines()
    assert lines == [f"client: {release}", f"server: {release} (API v1) at {api_of(gateway)}"]
    doc = json.loads(ok(cli(env, "version", "-o", "json")))
    assert doc["client"]["version"] == doc["server"]["version"] == release
    # No gateway: the client's line all the same, then why not the server's.
    away = cli({**env, "OPENSHELL_API": "http://127.0.0.1:1"}, "version")
    assert away.returncode == exits.UNAVAILABLE and away.stdout == f"client: {release}\n", away
    assert "cannot reach the gateway API at http://127.0.0.1:1" in away.stderr
    assert (
        ok(cli({**env, "OPENSHELL_API": "http://127.0.0.1:1"}, "version", "--client"))
        == f"client: {release}\n"
    )


# ---------------------------------------------------------------------------------- contexts


def test_contexts_choose_the_api_flag_over_env_over_file(
    env: dict[str, str], gateway: GatewayProcess, tmp_path: Path
) -> None:
    """Two contexts, one at the gateway, one at a port nothing listens on; the exit status says
    which API each command called (0 there, 69 at the dead one)."""
    live, dead = api_of(gateway), "http://127.0.0.1:1"
    base = {k: v for k, v in env.items() if k != "OPENSHELL_API"}
    ok(cli(base, "config", "set-context", "live", "--api", live))
    ok(cli(base, "config", "set-context", "dead", "--api", dead, "--use"))
    config_file = tmp_path / "config" / "openshell" / "config.yaml"
    assert yaml.safe_load(config_file.read_text())["current_context"] == "dead"
    assert config_file.stat().st_mode & 0o777 == 0o600
    listed = ok(cli(base, "config", "get-contexts")).splitlines()
    assert listed[1].split()[:2] == ["*", "dead"] and listed[2].split()[:1] == ["live"]

    def called(extra_env: dict[str, str], *args: str) -> str:
        done = cli({**base, **extra_env}, "get", *args)
        assert done.returncode in (0, exits.UNAVAILABLE), done
        return "live" if done.returncode == 0 else "dead"

    assert called({}) == "dead"  # the file's current context
    assert called({}, "--context", "live") == "live"  # a flag after the command word
    assert called({"OPENSHELL_CONTEXT": "live"}) == "live"  # env over the file
    assert called({"OPENSHELL_API": live}) == "live"
    assert called({"OPENSHELL_CONTEXT": "live"}, "--api", dead) == "dead"  # flag over env
    assert called({"OPENSHELL_API": dead}, "--context", "live") == "live"
    done = cli(base, "--context", "live", "get")  # a flag before the command word
    assert done.returncode == 0, done
    ok(cli(base, "config", "use-context", "live"))
    assert called({}) == "live" and ok(cli(base, "config", "current-context")) == "live\n"

    unknown = cli({**base, "OPENSHELL_CONTEXT": "nope"}, "get")
    assert unknown.returncode == exits.CONFIG and str(config_file) in unknown.stderr
    assert "contexts.nope" in unknown.stderr and "$OPENSHELL_CONTEXT" in unknown.stderr
