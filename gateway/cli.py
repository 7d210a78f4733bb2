"""``openshell-gateway``: the control plane's command line, the server and its operators' client.

Server commands (this module)::

    openshell-gateway serve   [--config FILE] [--grpc-listen H:P] [--http-listen H:P]
                              [--ops-listen H:P] [--database-url URL] [--set K=V]
    openshell-gateway migrate [--config FILE] [--database-url URL]
    openshell-gateway demo    [--steps N] [--keep-running]      the main job on the embedded default
    openshell-gateway config check FILE | config schema

Flags override the environment (OPENSHELL_GATEWAY_*), which overrides the file, which overrides
the defaults. Every configuration problem is reported with its key path, exit status 78, before
the database is opened or a port bound; ``config check FILE`` reads FILE with the environment
through the same rules (:mod:`openshell_wire.configcheck`), so it refuses what ``serve`` would. A
database whose schema is newer than this gateway knows is exit status 78 too (``serve`` and
``migrate`` refuse it); one that cannot be reached or migrated is exit status 69.

API commands (:mod:`gateway.ctl`): ``get``, ``logs``, ``create``, ``delete``, ``signal``,
``stop``, ``commands``, ``status``, ``fleet``, ``version``, ``login``, ``logout`` and ``config
get-contexts|current-context|use-context|set-context|delete-context``. They talk to the API
their context names (:mod:`gateway.ctl.contexts`) with a bearer token from ``--token-file``,
``$OPENSHELL_TOKEN``, the context's token file or the login cache (:mod:`gateway.clientauth`);
their exit statuses are :mod:`gateway.ctl.exits`'s. Here only the line is split: everything
after the first ``--`` is ``create``'s sandbox command and never reaches argparse.

Bare, the program prints its help and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from gateway.ctl.contexts import API_ENV, CONFIG_ENV, CONTEXT_ENV, DEFAULT_API
from gateway.ctl.exits import UNAVAILABLE as EX_UNAVAILABLE
from gateway.ctl.parser import (
    MAX_TAIL,
    HelpFormatter,
    add_client_commands,
    add_connection_options,
    add_context_commands,
    add_sandbox_create_delete,
    command_parser,
    count,
)
from openshell_wire.configcheck import check_command, load_checked, report
from openshell_wire.configfile import (
    EX_CONFIG,
    ConfigError,
    config_command,
    deep_merge,
    parse_set_flags,
)
from openshell_wire.logsetup import quiet_vanished_peers, setup_logging

#: The commands this module runs; every other one is an API command (gateway.ctl).
SERVER_COMMANDS = frozenset({"serve", "migrate", "demo"})
#: A third SIGTERM/SIGINT: the stop did not finish.
EX_SIGNALLED = 1
#: After the stop, how long the tasks still running get to end before the process exits anyway.
EXIT_WAIT_S = 1.0

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config file")
    p.add_argument("--grpc-listen", help="host:port for supervisors")
    p.add_argument("--http-listen", help="host:port for the HTTP API")
    p.add_argument("--ops-listen", help="host:port for /healthz, /readyz and /metrics")
    p.add_argument("--database-url", help="SQLAlchemy async URL")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any setting by dotted key"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openshell-gateway",
        description="OpenShell gateway (control plane): run it, and operate its sandboxes through its API",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_connection_options(parser, top=True)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    add_client_commands(sub)
    status = command_parser(
        sub,
        "status",
        help="list sandboxes with their state and last log lines",
        epilog="examples:\n  openshell-gateway status\n  openshell-gateway status --lines 0 --json",
    )
    status.add_argument("--lines", type=count(low=0, high=MAX_TAIL), default=5, help="log lines per sandbox")
    status.add_argument("--json", action="store_true", help="print the API's JSON")
    fleet = command_parser(
        sub,
        "fleet",
        help="the fleet summary: counts by state and health, unhealthy and exited sandboxes, replicas",
        epilog="examples:\n  openshell-gateway fleet\n"
        "  openshell-gateway fleet --since 15m --limit 50 -o json",
    )
    fleet.add_argument(
        "--since", help="exited since: RFC 3339 or a duration back from now (default: the API's, 1h)"
    )
    # Its range (1 to 500) is left to the API, whose sentence names it (exit 1).
    fleet.add_argument("--limit", type=int, help="longest list of unhealthy and of exited sandboxes")
    fleet.add_argument(
        "-o", "--output", choices=["text", "json"], default="text", help="json: the API's document"
    )
    login = command_parser(
        sub,
        "login",
        help="log in through the OIDC issuer (OAuth device flow) and keep the tokens",
        epilog="examples:\n  openshell-gateway login --api https://gateway.example.com\n"
        "  openshell-gateway login --context prod",
    )
    login.add_argument("--issuer", help="the OIDC issuer (default: the one the API names)")
    login.add_argument("--client-id", help="the public client with the device grant (default: the API's)")
    command_parser(
        sub,
        "logout",
        help="forget the login kept for an API URL",
        epilog="example:\n  openshell-gateway logout --context prod",
    )
    sandbox = command_parser(
        sub,
        "sandbox",
        help="create or delete a sandbox (the earlier spelling of create and delete)",
        epilog="examples:\n  openshell-gateway sandbox create sb-1 -- python3 agent.py\n"
        "  openshell-gateway sandbox delete sb-1",
        connection=False,
    )
    add_sandbox_create_delete(sandbox.add_subparsers(dest="sandbox_cmd", required=True, metavar="COMMAND"))
    config = command_parser(
        sub,
        "config",
        help="the client's contexts; or check a gateway config file, or print its schema",
        epilog="examples:\n  openshell-gateway config set-context prod --api https://gw.example.com --use\n"
        "  openshell-gateway config get-contexts\n  openshell-gateway config check gateway.yaml",
        connection=False,
    )
    csub = config.add_subparsers(dest="config_cmd", required=True, metavar="COMMAND")
    check = csub.add_parser(
        "check",
        help="validate a gateway config FILE with the environment's OPENSHELL_GATEWAY_* as serve reads "
        "them; every problem by key path, exit status 78",
        formatter_class=HelpFormatter,
    )
    check.add_argument("file", type=Path)
    csub.add_parser(
        "schema", help="print the JSON Schema of the gateway's config", formatter_class=HelpFormatter
    )
    add_context_commands(csub)
    for name, what in (
        ("serve", "run the gateway"),
        ("migrate", "bring the database schema up to date and exit"),
    ):
        _common(command_parser(sub, name, help=what, epilog="", connection=False))
    demo = command_parser(
        sub,
        "demo",
        help="gateway on SQLite + one local demo sandbox, then its status",
        epilog="",
        connection=False,
    )
    _common(demo)
    demo.add_argument(
        "--steps", type=count(low=0), default=12, help="how many steps the demo agent takes (0.5 s each)"
    )
    demo.add_argument("--keep-running", action="store_true", help="stay up after the sandbox exits")
    return parser


EPILOG = f"""examples:
  openshell-gateway config set-context prod --api https://gateway.example.com --use
  openshell-gateway login
  openshell-gateway get -o wide
  openshell-gateway create sb-1 --env MODE=fast -- python3 agent.py --verbose
  openshell-gateway logs sb-1 -f --stream stderr
  openshell-gateway signal sb-1 USR1 --wait
  openshell-gateway stop sb-1

The API commands talk to: --api, else --context's API, else ${API_ENV}, else the API of
${CONTEXT_ENV}'s context or of the config file's current_context, else {DEFAULT_API}
(the client config file: ${CONFIG_ENV}, else ~/.config/openshell/config.yaml). Options go
before or after the command word. Exit statuses: docs/cli.md."""


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    if args.grpc_listen:
        flags["grpc"] = {"listen": args.grpc_listen}
    if args.http_listen:
        flags["http"] = {"listen": args.http_listen}
    if args.ops_listen:
        flags["ops"] = {"listen": args.ops_listen}
    if args.database_url:
        flags["database"] = {"url": args.database_url}
    if args.log_level:
        flags["log_level"] = args.log_level
    if args.log_format:
        flags["log_format"] = args.log_format
    return deep_merge(parse_set_flags(args.set), flags)


async def _serve(config: GatewayConfig) -> None:
    """Serve until SIGTERM or SIGINT: the first drains (``Gateway.drain``), then stops; a second
    cuts the drain short and stops at once (the stop's own deadline); a third exits the process
    at once. Once stopped, the process exits whatever is left running (``_leave``)."""
    from gateway.app import Gateway  # noqa: PLC0415
    from gateway.gc_tuning import tune_for_serving  # noqa: PLC0415

    gateway = Gateway(config)
    await gateway.start()
    first, second = asyncio.Event(), asyncio.Event()
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s: draining, then stopping", sig.name, extra={"signal": sig.name})
            first.set()
        elif signals == 2:
            log.warning("%s again: stopping now, without the rest of the drain", sig.name)
            second.set()
        else:
            _exit_now(EX_SIGNALLED, f"{sig.name} a third time: exiting at once, nothing more is written")

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    # Once started and the signals are ours (the collection takes a moment): what start-up
    # allocated is frozen out of later collections (gateway.gc_tuning).
    frozen = tune_for_serving()
    log.debug("garbage collection tuned for serving", extra={"frozen_objects": frozen})
    try:
        await first.wait()
        drain = asyncio.create_task(gateway.drain(), name="drain")
        cut = asyncio.create_task(second.wait(), name="second signal")
        await asyncio.wait({drain, cut}, return_when=asyncio.FIRST_COMPLETED)
        for task in (drain, cut):
            task.cancel()
        for outcome in await asyncio.gather(drain, cut, return_exceptions=True):
            if isinstance(outcome, Exception):  # a bug: the stop below still runs
                log.error("the drain failed; stopping", exc_info=outcome)
    finally:
        await gateway.stop()
    await _leave(timeout_s=EXIT_WAIT_S)


async def _leave(*, timeout_s: float) -> None:
    """After the stop: cancel what is still running and wait up to ``timeout_s`` for it; what is
    left after that (a task that ignores its cancellation, a store call stuck in a database driver's
    thread on a locked SQLite file) would keep asyncio.run's teardown, or the interpreter's wait for
    its threads, from ever ending: the process exits at once instead, saying what it left."""
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    for task in tasks:
        task.cancel()
    pending: set[asyncio.Task[Any]] = set()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    threads = [
        thread
        for thread in threading.enumerate()
        if thread is not threading.main_thread() and not thread.daemon and thread.is_alive()
    ]
    if pending or threads:
        names = sorted(
            f"{task.get_name()} ({getattr(task.get_coro(), '__qualname__', '?')})" for task in pending
        )
        names += sorted(f"thread {thread.name}" for thread in threads)
        _exit_now(
            0,
            f"stopped, leaving {len(pending)} tasks and {len(threads)} threads that did not end: "
            + ", ".join(names[:10]),
        )


def _exit_now(code: int, why: str) -> None:
    """Exit the process now, without waiting for tasks or threads; said first (logs flushed)."""
    log.warning("%s (exit status %d)", why, code, extra={"exit_status": code})
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _migrate(config: GatewayConfig) -> None:
    from gateway.store import Database  # noqa: PLC0415

    db = await Database.open(config.database.url, migrate=True)
    await db.close()
    print("database schema is up to date")


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """The words before the first ``--`` (argparse's) and after it (the sandbox's command, never
    parsed: ``python3 agent.py --verbose`` stays the command's), or None without ``--``."""
    words = list(argv)
    if "--" not in words:
        return words, None
    at = words.index("--")
    return words[:at], words[at + 1 :]


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``args`` is for."""
    found = parser
    for dest in ("cmd", "sandbox_cmd", "config_cmd"):
        name = getattr(args, dest, None)
        subs = [a for a in found._actions if isinstance(a, argparse._SubParsersAction)]
        if name is None or not subs or name not in subs[0].choices:
            break
        found = subs[0].choices[name]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not words:
        # Bare: what it can do, as kubectl and helm answer; not an error.
        parser.print_help()
        return 0
    before, command = split_command(words)
    args, unknown = parser.parse_known_args(before)
    creates = args.cmd == "create" or (args.cmd == "sandbox" and args.sandbox_cmd == "create")
    if unknown:
        # Said by the command's own parser (its usage, not the program's); in create, with
        # where the sandbox's command goes.
        hint = " (the sandbox's command and its options go after --)" if creates else ""
        _subparser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if command is not None and not creates:
        parser.error(f"{args.cmd}: takes no command after -- (only create does)")
    args.command = command or []
    if args.cmd == "config" and args.config_cmd in ("check", "schema"):
        if args.config_cmd == "check":
            return check_command(GatewayConfig, args.file, program="openshell-gateway")
        return config_command(GatewayConfig, args.config_cmd, None)
    if args.cmd not in SERVER_COMMANDS:
        from gateway.ctl.commands import run  # noqa: PLC0415

        return run(args)
    try:
        config = load_checked(GatewayConfig, file=args.config, overrides=_overrides(args))
    except ConfigError as exc:
        return report("openshell-gateway", exc)
    setup_logging(config.log_level, config.log_format)
    # gRPC logs a client gone before its reply as an ERROR with a traceback: made a counted debug
    # line (openshell_gateway_peer_vanished_total), so a storm of callers giving up is no error storm.
    quiet_vanished_peers()
    from gateway.app import GatewayStartError  # noqa: PLC0415
    from gateway.store import StoreError  # noqa: PLC0415
    from gateway.store.db import SchemaError  # noqa: PLC0415

    try:
        if args.cmd == "serve":
            asyncio.run(_serve(config))
        elif args.cmd == "migrate":
            asyncio.run(_migrate(config))
        else:
            from gateway.demo import run_demo  # noqa: PLC0415

            return asyncio.run(run_demo(config, steps=args.steps, keep_running=args.keep_running))
    except SchemaError as exc:
        # A database migrated by a newer gateway: a deployment mismatch, not an outage that a
        # restart would outlive, so the configuration status rather than "unavailable".
        print(f"openshell-gateway: {exc}", file=sys.stderr)
        return EX_CONFIG
    except (GatewayStartError, StoreError) as exc:
        print(f"openshell-gateway: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
