"""The API commands' parsers, added to ``openshell-gateway``'s (``gateway.cli``).

kubectl's habits, within argparse:

- the connection options (``--api``, ``--context``, ``--token-file``, ``--insecure``) are taken
  before the command word and after it alike: the top-level parser has them with their defaults,
  each command's parser has them again with ``SUPPRESS`` as default, so that one not given after
  the command word leaves the top-level's value alone;
- options go anywhere among the arguments; in ``create``, everything after the first ``--`` is
  the sandbox's command and is never parsed as options (``gateway.cli`` cuts it off before
  argparse sees the line, so an unknown option before ``--`` is an error, not a command word);
- every help shows its defaults and examples.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.ctl.contexts import API_ENV, CONFIG_ENV, CONTEXT_ENV, DEFAULT_API
from gateway.ctl.output import FORMATS
from gateway.store.events import LOG_LEVELS
from openshell_wire.records import LogStream

#: ``get --watch`` re-reads the list this often unless ``--interval`` says otherwise.
WATCH_INTERVAL_S = 2.0
#: ``signal``/``stop --wait`` gives up (exit 69) after this long without the supervisor's answer.
WAIT_TIMEOUT_S = 30.0

# The API's own bounds (gateway/api.py; tests/unit/test_ctl_cli.py checks they agree), so that a
# value it would refuse is a usage error naming the option before anything is sent. The client
# cannot import them: gateway.api pulls in the store and the server.
#: ``stop --grace``: the API takes grace_ms from 0 to 3600000.
MAX_GRACE_S = 3600.0
#: ``logs --tail`` and ``status --lines``: the API's MAX_TAIL.
MAX_TAIL = 10_000
#: ``--expires-in``: the API's least; its greatest is the gateway's commands.max_ttl_s (its
#: sentence says which when a value is over it).
MIN_EXPIRES_IN_S = 1.0
#: The longest ``--interval`` and ``--timeout``: a day (a longer sleep is a typo, and asyncio's
#: timers refuse some huge values with an OverflowError).
MAX_CLIENT_WAIT_S = 86400.0


def seconds(*, low: float, high: float | None, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds from ``low`` (excluded if ``low_open``) to
    ``high`` (None: no bound of ours); anything else (``nan``, ``inf``, ``-1``, ``soon``) is a
    usage error that argparse prints naming the option (exit 2)."""
    if high is None:
        shown = f"more than {low:g}" if low_open else f"of {low:g} or more"
    else:
        shown = f"more than {low:g} up to {high:g}" if low_open else f"from {low:g} to {high:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        too_high = high is not None and value > high
        if not math.isfinite(value) or too_high or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"expected a number of seconds {shown}, got {text!r}")
        return value

    parse.__name__ = "seconds"  # argparse names the type in some of its messages
    return parse


def count(*, low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high`` (None: no upper bound)."""
    shown = f"from {low} to {high}" if high is not None else f"of {low} or more"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number {shown}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected a whole number {shown}, got {text!r}")
        return value

    parse.__name__ = "count"
    return parse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs kept as written (examples), and every option's default shown, unless it is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or not action.option_strings
            or default in (None, False, [], argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)"


def add_connection_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """``--api``, ``--context``, ``--token-file``, ``--insecure``: on the top-level parser with
    their defaults (``top``), on a command's with SUPPRESS (see the module's docstring)."""
    # argparse's stubs type default by action; any value is what argparse takes here.
    keep: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    group = p.add_argument_group("connection (before or after the command word)")
    group.add_argument(
        "--api",
        metavar="URL",
        help=f"the gateway's HTTP API URL (default: --context's, else ${API_ENV}, else the current "
        f"context's, else {DEFAULT_API})",
        **keep,
    )
    group.add_argument(
        "--context",
        metavar="NAME",
        help=f"a context of the client config file (default: ${CONTEXT_ENV}, else its current_context)",
        **keep,
    )
    group.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="a file holding the bearer token (default: $OPENSHELL_TOKEN, else the context's "
        "token_file, else the login)",
        **keep,
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="send tokens (or log in) over plain http to a host that is not loopback: anyone on "
        "the path can read them",
        **({"default": False} if top else keep),
    )


def command_parser(sub: Any, name: str, *, help: str, epilog: str, connection: bool = True, **kw: Any) -> Any:
    p = sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=HelpFormatter, **kw)
    if connection:
        add_connection_options(p, top=False)
    return p


def _output(p: argparse.ArgumentParser, choices: tuple[str, ...], default: str) -> None:
    p.add_argument("-o", "--output", choices=choices, default=default, help="output format")


def _wait(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait until the supervisor has applied the command (exit 1 if it failed it)",
    )
    p.add_argument(
        "--timeout",
        type=seconds(low=0, high=MAX_CLIENT_WAIT_S, low_open=True),
        default=WAIT_TIMEOUT_S,
        metavar="S",
        help="with --wait: the longest wait",
    )
    p.add_argument(
        "--expires-in",
        type=seconds(low=MIN_EXPIRES_IN_S, high=None),
        metavar="S",
        help="drop the command if no session took it within S seconds "
        "(default: the gateway's commands.ttl_s)",
    )
    _output(p, ("text", "json", "yaml"), "text")


def add_sandbox_create_delete(sub: Any) -> tuple[Any, Any]:
    """``create`` and ``delete`` (also under ``sandbox``, their earlier spelling)."""
    create = command_parser(
        sub,
        "create",
        help="create a sandbox; its command goes after --",
        usage="%(prog)s [options] ID [-- COMMAND [ARG ...]]",
        epilog="examples:\n"
        "  openshell-gateway create sb-1 -- python3 agent.py --verbose\n"
        "  openshell-gateway create sb-1 --image ghcr.io/acme/agent:1.4 --env MODE=fast\n"
        "  openshell-gateway create sb-1 --env A=1 -o json -- sh -c 'echo hi'\n"
        "\nOptions go anywhere before --; everything after -- is the sandbox's command, never an\n"
        "option of ours. Without a command: the image's own ENTRYPOINT and CMD (Kubernetes driver).",
    )
    create.add_argument("id", help="the sandbox's id")
    create.add_argument("--image", help="sandbox image (default: the driver's default_image)")
    create.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable (repeatable)",
    )
    _output(create, ("text", "json", "yaml"), "text")
    delete = command_parser(
        sub,
        "delete",
        help="delete a sandbox (stop its supervisor, or delete its pod)",
        epilog="examples:\n  openshell-gateway delete sb-1\n  openshell-gateway delete sb-1 --context prod",
    )
    delete.add_argument("id", help="the sandbox's id")
    _output(delete, ("text", "json", "yaml"), "text")
    return create, delete


def add_client_commands(sub: Any) -> None:
    """Every API command, on ``openshell-gateway``'s subparsers ``sub``."""
    get = command_parser(
        sub,
        "get",
        help="list the sandboxes, or show one",
        epilog="examples:\n"
        "  openshell-gateway get                     every sandbox you may see\n"
        "  openshell-gateway get sb-1 -o yaml        one, as the API's document\n"
        "  openshell-gateway get -o wide --watch     and again whenever a row changes (Ctrl-C ends)\n"
        "\nwide adds generation, driver, driver state, connected, created by and team. --watch\n"
        "re-reads every --interval seconds and prints the rows that changed (state, exit code,\n"
        "generation, driver state, connection); with -o json|yaml each changed document.",
    )
    get.add_argument("id", nargs="?", help="one sandbox's id (default: all of them)")
    _output(get, FORMATS, "table")
    get.add_argument("-w", "--watch", action="store_true", help="keep printing the rows that change")
    get.add_argument(
        "--interval",
        type=seconds(low=0, high=MAX_CLIENT_WAIT_S, low_open=True),
        default=WATCH_INTERVAL_S,
        metavar="S",
        help="with --watch: seconds between reads",
    )

    logs = command_parser(
        sub,
        "logs",
        help="a sandbox's log lines and lifecycle records, or follow them",
        epilog="examples:\n"
        "  openshell-gateway logs sb-1 --tail 20\n"
        "  openshell-gateway logs sb-1 -f --stream stderr          follow (Ctrl-C ends)\n"
        "  openshell-gateway logs sb-1 --since 10m --grep timeout\n"
        "  openshell-gateway logs sb-1 --since 2026-12-07T09:00:00Z --until 2026-12-07T10:00:00Z\n"
        "  openshell-gateway logs sb-1 --level warn -o json        one API event per line\n"
        "\nThe filters are the API's (docs/log-queries.md): --since/--until on the record's own time,\n"
        "RFC 3339 or a duration back from now; --level a floor over the lines that carry one\n"
        "(captured stdout/stderr lines carry none); --grep a case-sensitive substring; gap records\n"
        "(lines the supervisor lost) are never filtered out.",
    )
    logs.add_argument("id", help="the sandbox's id")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="after the tail, print each new event as it is stored"
    )
    logs.add_argument(
        "--until-exit",
        action="store_true",
        help="with -f: end once the sandbox has exited and all is printed",
    )
    logs.add_argument(
        "--tail",
        type=count(low=0, high=MAX_TAIL),
        metavar="N",
        help=f"the last N events, up to {MAX_TAIL} (default: the API's, 100)",
    )
    logs.add_argument("--since", metavar="T", help="from T: RFC 3339 or a duration back from now (10m, 2h)")
    logs.add_argument("--until", metavar="T", help="up to T, as --since")
    logs.add_argument("--stream", choices=[s.value for s in LogStream], help="only this stream's lines")
    logs.add_argument("--level", choices=LOG_LEVELS, help="only lines at this level or above")
    logs.add_argument("--grep", "--text", dest="text", metavar="TEXT", help="only lines holding TEXT")
    logs.add_argument(
        "--kinds", metavar="K,K", help="record kinds: log, lifecycle, gap, health (default: the API's)"
    )
    logs.add_argument("--generation", type=count(low=1), metavar="N", help="an earlier sandbox of this id")
    _output(logs, ("text", "json"), "text")

    signal = command_parser(
        sub,
        "signal",
        help="send a signal to a sandbox's main process group",
        epilog="examples:\n"
        "  openshell-gateway signal sb-1 USR1\n"
        "  openshell-gateway signal sb-1 SIGHUP --wait\n"
        "  openshell-gateway signal sb-1 15 -o json\n"
        "\nThe signal by name (with or without SIG) or number. Without --wait the command returns once\n"
        "the gateway stored it (and says whether the live session took it).",
    )
    signal.add_argument("id", help="the sandbox's id")
    signal.add_argument("signal", help="USR1, SIGTERM, 9, ...")
    _wait(signal)

    stop = command_parser(
        sub,
        "stop",
        help="stop a sandbox's main process (SIGTERM, then SIGKILL after the grace)",
        epilog="examples:\n  openshell-gateway stop sb-1\n  openshell-gateway stop sb-1 --grace 30 --wait",
    )
    stop.add_argument("id", help="the sandbox's id")
    stop.add_argument(
        "--grace",
        type=seconds(low=0, high=MAX_GRACE_S),
        metavar="S",
        help=f"seconds before SIGKILL, 0 to {MAX_GRACE_S:g} (default: the supervisor's process.stop_grace_s)",
    )
    _wait(stop)

    commands = command_parser(
        sub,
        "commands",
        help="a sandbox's commands (stop, signal, heartbeat) and their state",
        epilog="examples:\n  openshell-gateway commands sb-1\n  openshell-gateway commands sb-1 -o yaml",
    )
    commands.add_argument("id", help="the sandbox's id")
    _output(commands, ("table", "json", "yaml"), "table")

    add_sandbox_create_delete(sub)

    version = command_parser(
        sub,
        "version",
        help="this client's version and the gateway's",
        epilog="examples:\n  openshell-gateway version\n  openshell-gateway version --client -o json\n"
        "\nThe client's line is printed even when the gateway cannot be reached (then exit 69).",
    )
    version.add_argument("--client", action="store_true", help="only the client's: ask no gateway")
    _output(version, ("text", "json", "yaml"), "text")


def add_context_commands(csub: Any) -> None:
    """The client half of ``config``: the contexts of the client config file."""
    where = (
        f"\nThe file: ${CONFIG_ENV}, else $XDG_CONFIG_HOME/openshell/config.yaml "
        "(~/.config/openshell/config.yaml)."
    )
    get_contexts = csub.add_parser(
        "get-contexts",
        help="list the client config file's contexts (* the current one)",
        description="list the client config file's contexts (* the current one)",
        epilog=where,
        formatter_class=HelpFormatter,
    )
    _output(get_contexts, ("table", "json", "yaml"), "table")
    csub.add_parser(
        "current-context",
        help="print the current context's name",
        description="print the current context's name (exit 78 when none is set)",
        epilog=where,
        formatter_class=HelpFormatter,
    )
    use = csub.add_parser(
        "use-context",
        help="make a context the current one",
        description="make a context the current one",
        epilog="example:\n  openshell-gateway config use-context prod" + where,
        formatter_class=HelpFormatter,
    )
    use.add_argument("name")
    set_context = csub.add_parser(
        "set-context",
        help="add a context or change one",
        description="add a context or change one; the options not given keep their value",
        epilog="examples:\n"
        "  openshell-gateway config set-context prod --api https://gateway.example.com --use\n"
        "  openshell-gateway config set-context dev --api http://10.0.0.7:7080 --insecure\n"
        "  openshell-gateway config set-context ci --token-file /run/secrets/openshell-token" + where,
        formatter_class=HelpFormatter,
    )
    set_context.add_argument("name")
    set_context.add_argument("--api", dest="set_api", metavar="URL", help="the gateway's HTTP API URL")
    set_context.add_argument(
        "--token-file",
        dest="set_token_file",
        type=Path,
        metavar="FILE",
        help="a file holding the bearer token",
    )
    set_context.add_argument(
        "--insecure",
        dest="set_insecure",
        action=argparse.BooleanOptionalAction,
        help="send tokens over plain http to a host that is not loopback",
    )
    set_context.add_argument("--use", action="store_true", help="and make it the current context")
    delete = csub.add_parser(
        "delete-context",
        help="remove a context",
        description="remove a context (and the current_context, if it was that one)",
        epilog=where,
        formatter_class=HelpFormatter,
    )
    delete.add_argument("name")
