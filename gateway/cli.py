"""``openshell-gateway``: the control plane's command line.

    openshell-gateway serve   [--config FILE] [--grpc-listen H:P] [--http-listen H:P]
                              [--ops-listen H:P] [--database-url URL] [--set K=V]
    openshell-gateway migrate [--config FILE] [--database-url URL]
    openshell-gateway demo    [--steps N] [--keep-running]      the main job on the embedded default
    openshell-gateway status  [--api URL] [--lines N] [--json] [--token-file FILE] [--insecure]
    openshell-gateway fleet   [--api URL] [--since T] [--limit N] [-o text|json] [--token-file FILE]
    openshell-gateway login   [--api URL] [--issuer URL] [--client-id ID] [--insecure]   device flow
    openshell-gateway logout  [--api URL]
    openshell-gateway config check FILE | config schema

Flags override the environment (OPENSHELL_GATEWAY_*), which overrides the file, which overrides
the defaults. Every configuration problem is reported with its key path, exit status 78, before
the database is opened or a port bound; ``config check FILE`` reads FILE with the environment
through the same rules (:mod:`openshell_wire.configcheck`), so it refuses what ``serve`` would. A
database whose schema is newer than this gateway knows is exit status 78 too (``serve`` and
``migrate`` refuse it); one that cannot be reached or migrated is exit status 69.

The API commands (status, fleet, sandbox) send a bearer token from ``--token-file``, ``$OPENSHELL_TOKEN``
or the login cache (``login``), refreshed as needed (:mod:`gateway.clientauth`); a token problem is
said with what to run, exit status 77. A token is never sent (nor a login made) over plain http to
a host that is not loopback unless ``--insecure`` says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from openshell_wire.configcheck import check_command, load_checked, report
from openshell_wire.configfile import (
    EX_CONFIG,
    ConfigError,
    config_command,
    deep_merge,
    parse_set_flags,
)
from openshell_wire.logsetup import quiet_vanished_peers, setup_logging

EX_UNAVAILABLE = 69
EX_NOPERM = 77  # no usable token: the message says what to run
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
        prog="openshell-gateway", description="OpenShell gateway (control plane)"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    _common(sub.add_parser("serve", help="run the gateway"))
    _common(sub.add_parser("migrate", help="bring the database schema up to date and exit"))
    demo = sub.add_parser("demo", help="gateway on SQLite + one local demo sandbox, then its status")
    _common(demo)
    demo.add_argument(
        "--steps", type=int, default=12, help="how many steps the demo agent takes (0.5 s each)"
    )
    demo.add_argument("--keep-running", action="store_true", help="stay up after the sandbox exits")
    status = sub.add_parser("status", help="list sandboxes with their state and last log lines")
    status.add_argument("--api", default="http://127.0.0.1:7080", help="the gateway's HTTP API URL")
    status.add_argument("--lines", type=int, default=5, help="log lines per sandbox")
    status.add_argument("--json", action="store_true", help="print the API's JSON")
    fleet = sub.add_parser(
        "fleet",
        help="the fleet summary: counts by state and health, unhealthy and exited sandboxes, replicas",
    )
    fleet.add_argument("--api", default="http://127.0.0.1:7080", help="the gateway's HTTP API URL")
    fleet.add_argument(
        "--since", help="exited since: RFC 3339 or a duration back from now (default: the API's, 1h)"
    )
    fleet.add_argument("--limit", type=int, help="longest list of unhealthy and of exited sandboxes")
    fleet.add_argument(
        "-o", "--output", choices=["text", "json"], default="text", help="json: the API's document"
    )
    login = sub.add_parser(
        "login", help="log in through the OIDC issuer (OAuth device flow) and keep the tokens"
    )
    login.add_argument("--api", default="http://127.0.0.1:7080", help="the gateway's HTTP API URL")
    login.add_argument("--issuer", help="the OIDC issuer (default: the one the API names)")
    login.add_argument("--client-id", help="the public client with the device grant (default: the API's)")
    logout = sub.add_parser("logout", help="forget the login kept for an API URL")
    logout.add_argument("--api", default="http://127.0.0.1:7080", help="the gateway's HTTP API URL")
    sandbox = sub.add_parser("sandbox", help="create or delete a sandbox through the HTTP API")
    ssub = sandbox.add_subparsers(dest="sandbox_cmd", required=True)
    create = ssub.add_parser("create", help="create a sandbox: [--image IMAGE] [--env N=V] ID -- COMMAND ...")
    create.add_argument("id")
    create.add_argument("--image", help="sandbox image (default: the driver's default_image)")
    create.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    # Everything after the id is the command (options go before the id), so the command's own
    # options are never taken for ours.
    create.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    delete = ssub.add_parser("delete", help="delete a sandbox's pod")
    delete.add_argument("id")
    for p in (create, delete):
        p.add_argument("--api", default="http://127.0.0.1:7080", help="the gateway's HTTP API URL")
    for p in (status, fleet, create, delete):
        p.add_argument(
            "--token-file",
            type=Path,
            help="a file holding the bearer token (else $OPENSHELL_TOKEN, else the login)",
        )
    for p in (status, fleet, create, delete, login):
        p.add_argument(
            "--insecure",
            action="store_true",
            help="send tokens (or log in) over plain http to a host that is not loopback: anyone on "
            "the path can read them",
        )
    config = sub.add_parser("config", help="check a config file or print the schema")
    csub = config.add_subparsers(dest="config_cmd", required=True)
    check = csub.add_parser(
        "check",
        help="validate FILE with the environment's OPENSHELL_GATEWAY_* as serve reads them; every "
        "problem by key path, exit status 78",
    )
    check.add_argument("file", type=Path)
    csub.add_parser("schema", help="print the JSON Schema of the config")
    return parser


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


def _sandbox_command(args: argparse.Namespace) -> int:
    from gateway.clientauth import ClientAuthError, credentials_for  # noqa: PLC0415
    from gateway.sandboxcli import SandboxCallError, create_sandbox, delete_sandbox, parse_env  # noqa: PLC0415

    api = args.api.rstrip("/")
    try:
        credentials = credentials_for(api, token_file=args.token_file, insecure=args.insecure)
        if args.sandbox_cmd == "create":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            answer = asyncio.run(
                create_sandbox(
                    api, args.id, command, image=args.image, env=parse_env(args.env), credentials=credentials
                )
            )
        else:
            answer = asyncio.run(delete_sandbox(api, args.id, credentials=credentials))
    except ClientAuthError as exc:
        print(f"openshell-gateway: {exc}", file=sys.stderr)
        return EX_NOPERM
    except SandboxCallError as exc:
        print(f"openshell-gateway: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE if exc.status is None or exc.status >= 500 else 1
    print(json.dumps(answer, indent=2))
    return 0


def _fleet_command(args: argparse.Namespace) -> int:
    from gateway.clientauth import ClientAuthError, credentials_for  # noqa: PLC0415
    from gateway.sandboxcli import SandboxCallError, fetch_fleet, render_fleet  # noqa: PLC0415

    api = args.api.rstrip("/")
    try:
        credentials = credentials_for(api, token_file=args.token_file, insecure=args.insecure)
        doc = asyncio.run(fetch_fleet(api, since=args.since, limit=args.limit, credentials=credentials))
    except ClientAuthError as exc:
        print(f"openshell-gateway: {exc}", file=sys.stderr)
        return EX_NOPERM
    except SandboxCallError as exc:
        print(f"openshell-gateway: {exc}", file=sys.stderr)
        # A token refused (401) or without an OpenShell role (403), as status says: not an outage.
        if exc.status in (401, 403):
            return EX_NOPERM
        return EX_UNAVAILABLE if exc.status is None or exc.status >= 500 else 1
    print(json.dumps(doc, indent=2) if args.output == "json" else render_fleet(doc))
    return 0


def _login_command(args: argparse.Namespace) -> int:
    from gateway.clientauth import ClientAuthError, TokenCache, device_login, logout  # noqa: PLC0415

    cache = TokenCache()
    try:
        if args.cmd == "logout":
            found = asyncio.run(logout(args.api, cache=cache))
            print(f"logged out of {args.api}" if found else f"no login kept for {args.api}")
            return 0
        login = asyncio.run(
            device_login(
                args.api,
                cache=cache,
                issuer=args.issuer,
                client_id=args.client_id,
                out=lambda line: print(line, flush=True),
                insecure=args.insecure,
            )
        )
    except ClientAuthError as exc:
        print(f"openshell-gateway: {exc}", file=sys.stderr)
        return EX_NOPERM
    except KeyboardInterrupt:
        print("openshell-gateway: login interrupted; nothing was kept", file=sys.stderr)
        return 130
    who = f" as {login.username}" if login.username else ""
    print(f"logged in{who} at {login.issuer} for {login.api_url} (tokens kept in {cache.path})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "config":
        if args.config_cmd == "check":
            return check_command(GatewayConfig, args.file, program="openshell-gateway")
        return config_command(GatewayConfig, args.config_cmd, None)
    if args.cmd in ("login", "logout"):
        return _login_command(args)
    if args.cmd == "status":
        from gateway.clientauth import ClientAuthError, credentials_for  # noqa: PLC0415
        from gateway.status import StatusError, fetch_status, render  # noqa: PLC0415

        api = args.api.rstrip("/")
        try:
            credentials = credentials_for(api, token_file=args.token_file, insecure=args.insecure)
            sandboxes = asyncio.run(fetch_status(api, lines=max(0, args.lines), credentials=credentials))
        except ClientAuthError as exc:
            print(f"openshell-gateway: {exc}", file=sys.stderr)
            return EX_NOPERM
        except StatusError as exc:
            print(f"openshell-gateway: {exc}", file=sys.stderr)
            # 403: a token without an OpenShell role (the message says so): not an outage.
            return EX_NOPERM if exc.status == 403 else EX_UNAVAILABLE
        if args.json:
            print(json.dumps(sandboxes, indent=2))
        else:
            print(render(sandboxes))
        return 0
    if args.cmd == "sandbox":
        return _sandbox_command(args)
    if args.cmd == "fleet":
        return _fleet_command(args)
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
