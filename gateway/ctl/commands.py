"""The API commands of ``openshell-gateway``, one function each, and the one place where their
failures become exit statuses (:mod:`gateway.ctl.exits`).

Each command resolves where it talks to (:func:`gateway.ctl.contexts.resolve`) and with which
token (:func:`gateway.clientauth.credentials_for`), then runs one asyncio loop for its calls. A
failure is one sentence on stderr, never a traceback: a bad client config file (78, file and key
named), a token problem (77, what to run), the API's refusal (its sentence; 404 is 3, 401/403 77,
5xx or no answer 69, any other 4xx 1). ``get --watch`` and ``logs -f`` end on Ctrl-C with 0: that
is how one stops them; any other command interrupted by Ctrl-C exits 130. A ``logs -f`` whose
stream the gateway ended before its end (a shutdown) says so and exits 69.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from gateway.clientauth import ClientAuthError, Credentials, TokenCache, credentials_for, device_login, logout
from gateway.ctl import contexts, exits
from gateway.ctl.calls import Api, ApiCallError
from gateway.ctl.contexts import ClientConfig, Context, Target
from gateway.ctl.output import (
    Columns,
    command_table,
    dump,
    event_line,
    render_fleet,
    sandbox_headers,
    sandbox_row,
    table,
)
from gateway.drivers.podspec import SandboxRequest, request_problem
from gateway.status import render
from openshell_wire.configfile import ConfigError

PROGRAM = "openshell-gateway"
#: The installed distribution whose version ``version`` prints as the client's.
DISTRIBUTION = "openshell-supervisor"
#: How often ``--wait`` asks whether the supervisor answered a command.
WAIT_POLL_S = 0.2
#: What ``get --watch`` compares to tell a changed sandbox (the heartbeat's time changes always).
WATCHED_FIELDS = ("state", "exit_code", "generation", "driver_state", "connected", "session_id")


class UsageError(Exception):
    """A command line argparse took but that makes no sense (exit status 2)."""


def _say(message: str) -> None:
    print(f"{PROGRAM}: {message}", file=sys.stderr)


def client_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def run(args: argparse.Namespace) -> int:
    """Run the API command ``args`` describes (``args.cmd``, ``args.config_cmd``...)."""
    endless = getattr(args, "watch", False) or getattr(args, "follow", False)
    try:
        if args.cmd == "config":
            return _contexts_command(args)
        target = contexts.resolve(api=args.api, context=args.context)
        if args.cmd in ("login", "logout"):
            return _login(args, target)
        if args.cmd == "version" and args.client:
            return _print_version(args, None, None)
        credentials = credentials_for(
            target.api,
            token_file=args.token_file,
            insecure=args.insecure or target.insecure,
            context_token_file=target.token_file,
            context=target.context,
        )
        return asyncio.run(_with_api(args, target, credentials))
    except KeyboardInterrupt:
        # Ctrl-C is how one ends a watch or a follow (0); any other command was cut short, and
        # says so as a shell expects of an interrupted program (130, exits.INTERRUPTED).
        if endless:
            return exits.OK
        _say(f"{args.cmd} interrupted" + ("; nothing was kept" if args.cmd == "login" else ""))
        return exits.INTERRUPTED
    except BrokenPipeError:
        # The reader had enough (``| head``): no traceback, and none at exit from the flush either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exits.OK
    except UsageError as exc:
        _say(str(exc))
        return exits.USAGE
    except ConfigError as exc:
        _say(str(exc))
        return exits.CONFIG
    except ClientAuthError as exc:
        _say(str(exc))
        return exits.NOPERM
    except ApiCallError as exc:
        _say(str(exc))
        return exits.for_status(exc.status)


async def _with_api(args: argparse.Namespace, target: Target, credentials: Credentials) -> int:
    name = args.sandbox_cmd if args.cmd == "sandbox" else args.cmd
    handler = _HANDLERS[name]
    async with Api(target.api, credentials) as api:
        return await handler(args, api)


# -- get ------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


async def _get(args: argparse.Namespace, api: Api) -> int:
    if args.id is not None and not args.id:
        raise UsageError("get: the sandbox id is empty (no id lists them all)")

    async def read() -> list[dict[str, Any]]:
        return [await api.sandbox(args.id)] if args.id else await api.sandboxes()

    found = await read()
    wide = args.output == "wide"
    if args.watch and args.output in ("json", "yaml"):
        # A stream of documents, one per sandbox from the first (kubectl's watch): JSON one
        # object per line (NDJSON), YAML one document each; never the list's envelope.
        for sb in found:
            _print_watched(sb, args.output)
    elif args.output in ("json", "yaml"):
        print(dump(found[0] if args.id else {"sandboxes": found}, args.output), flush=True)
        return exits.OK
    # The widest cell of each column so far, not the rows: a watch over thousands of sandboxes
    # for days holds one number per column, and a later row is never narrower than an earlier.
    columns = Columns(sandbox_headers(wide=wide))
    headed = False  # the header goes before the first rows, whenever they come
    if args.output in ("table", "wide"):
        rows = [sandbox_row(sb, wide=wide, now=_now()) for sb in found]
        if found:
            columns.widen(rows)
            print("\n".join(columns.line(row) for row in [columns.headers, *rows]), flush=True)
            headed = True
        else:
            print("no sandboxes", flush=True)
    if not args.watch:
        return exits.OK
    # One short string per sandbox seen: what the next read is compared with.
    seen = {sb["id"]: _watched(sb) for sb in found}
    while True:
        await asyncio.sleep(args.interval)
        changed = []
        for sb in await read():
            key = _watched(sb)
            if seen.get(sb["id"]) != key:
                seen[sb["id"]] = key
                changed.append(sb)
        if not changed:
            continue
        if args.output in ("json", "yaml"):
            for sb in changed:
                _print_watched(sb, args.output)
        else:
            rows = [sandbox_row(sb, wide=wide, now=_now()) for sb in changed]
            columns.widen(rows)
            print(
                "\n".join(columns.line(row) for row in ([] if headed else [columns.headers]) + rows),
                flush=True,
            )
            headed = True


def _print_watched(sb: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(sb, separators=(",", ":")), flush=True)
    else:
        print("---\n" + dump(sb, "yaml"), flush=True)


def _watched(sb: dict[str, Any]) -> str:
    return json.dumps([sb.get(k) for k in WATCHED_FIELDS], sort_keys=True)


# -- logs -----------------------------------------------------------------------------------


async def _logs(args: argparse.Namespace, api: Api) -> int:
    params: dict[str, str | int] = {}
    for name in ("tail", "since", "until", "stream", "level", "text", "kinds", "generation"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    if args.until_exit:
        if not args.follow:
            raise UsageError("--until-exit goes with -f/--follow")
        params["until_exit"] = 1

    def show(event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":")) if args.output == "json" else event_line(event)
        print(line, flush=True)

    if not args.follow:
        for event in await api.logs(args.id, params):
            show(event)
        return exits.OK
    async for event in api.follow(args.id, params):
        show(event)
    return await _follow_ended(args, api)


async def _follow_ended(args: argparse.Namespace, api: Api) -> int:
    """After the follow stream ended by the server's own end of the body: 0 when that was its
    end (the sandbox exited with --until-exit; the --generation asked for has been followed by
    another), else 69 and why on stderr, since a script must not take a cut follow for a whole one.

    The gateway also ends every follow when it shuts down, and the stream cannot say which;
    the sandbox's record does. A follow cannot be resumed where it stopped (the API's follow
    takes no event id to start after), so it is not reconnected."""
    try:
        sb = await api.sandbox(args.id)
    except ApiCallError as exc:
        _say(f"logs {args.id}: the follow ended before the sandbox exited ({exc})")
        return exits.UNAVAILABLE
    if args.generation is not None and sb.get("generation") != args.generation:
        return exits.OK
    if args.until_exit and sb.get("exit_code") is not None:
        return exits.OK
    what = "exited" if sb.get("exit_code") is not None else "was still running"
    _say(
        f"logs {args.id}: the gateway ended the follow while the sandbox {what} "
        "(shutting down or restarting?); run the command again to go on"
    )
    return exits.UNAVAILABLE


# -- commands for the supervisor -------------------------------------------------------------


def parse_env(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    return env


def signal_value(text: str) -> str | int:
    """``USR1``, ``sigusr1``, ``SIGUSR1`` as ``SIGUSR1``; ``10`` as 10; else a UsageError."""
    if text.isdigit():
        return int(text)
    name = text.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    if name not in signal.Signals.__members__:
        raise UsageError(f"signal {text!r}: not a signal name like USR1 or SIGTERM, nor a number")
    return name


async def _signal(args: argparse.Namespace, api: Api) -> int:
    return await _send(args, api, {"kind": "signal", "signal": signal_value(args.signal)})


async def _stop(args: argparse.Namespace, api: Api) -> int:
    body: dict[str, Any] = {"kind": "stop"}
    if args.grace is not None:  # parse time checked it: finite, 0 to the API's most
        body["grace_ms"] = round(args.grace * 1000)
    return await _send(args, api, body)


async def _send(args: argparse.Namespace, api: Api, body: dict[str, Any]) -> int:
    if args.expires_in is not None:
        body["expires_in_s"] = args.expires_in
    sent = await api.send_command(args.id, body)
    what = _what(sent)
    if not args.wait:
        if args.output != "text":
            print(dump(sent, args.output))
        else:
            taken = "delivered to its session" if sent.get("delivered") else "stored, not yet delivered"
            print(f"{what} for {args.id}: command {sent['id']} {taken}")
        return exits.OK
    answered = await _await_answer(api, sent, timeout_s=args.timeout)
    if args.output != "text":
        print(dump(answered, args.output))
    state = answered["state"]
    if state == "applied":
        if args.output == "text":
            print(f"{what} for {args.id}: command {answered['id']} applied")
        return exits.OK
    if state == "failed":
        _say(f"{what} for {args.id}: the supervisor failed command {answered['id']}: {answered.get('error')}")
        return exits.REFUSED
    if state == "expired":
        _say(f"{what} for {args.id}: command {answered['id']} expired: no session took it in time")
    else:
        _say(
            f"{what} for {args.id}: command {answered['id']} still {state} after {args.timeout:g}s "
            f"(is a supervisor connected? `{PROGRAM} get {args.id}` says)"
        )
    return exits.UNAVAILABLE


def _what(command: dict[str, Any]) -> str:
    if command.get("kind") == "signal":
        number = command.get("signal")
        try:
            return f"signal {signal.Signals(number).name}" if isinstance(number, int) else f"signal {number}"
        except ValueError:
            return f"signal {number}"
    return str(command.get("kind"))


async def _await_answer(api: Api, command: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while command["state"] == "pending" and time.monotonic() < deadline:
        await asyncio.sleep(WAIT_POLL_S)
        command = await api.command(command["id"])
    return command


async def _commands(args: argparse.Namespace, api: Api) -> int:
    found = await api.commands(args.id)
    if args.output != "table":
        print(dump({"sandbox_id": args.id, "commands": found}, args.output))
    elif found:
        print(command_table(found, now=_now()))
    else:
        print(f"no commands for {args.id}")
    return exits.OK


# -- create, delete ---------------------------------------------------------------------------


async def _create(args: argparse.Namespace, api: Api) -> int:
    env = parse_env(args.env)
    command = list(args.command)
    problem = request_problem(SandboxRequest(args.id, command, image=args.image or None, env=env))
    if problem is not None:
        raise ApiCallError(problem, 400)
    body: dict[str, Any] = {"id": args.id}
    if command:  # none: the image's own ENTRYPOINT and CMD
        body["command"] = command
    if args.image:
        body["image"] = args.image
    if env:
        body["env"] = env
    created = await api.create(body)
    if args.output != "text":
        print(dump(created, args.output))
    else:
        runs = created.get("command")
        print(f"sandbox {args.id} created" + (f": {json.dumps(runs)}" if runs else ""))
    return exits.OK


async def _delete(args: argparse.Namespace, api: Api) -> int:
    answer = await api.delete(args.id)
    if args.output != "text":
        print(dump(answer, args.output))
    elif answer.get("deleted"):
        print(f"sandbox {args.id} deleted")
    else:
        print(f"sandbox {args.id}: nothing was running (its record and logs stay)")
    return exits.OK


# -- version, status, fleet -------------------------------------------------------------------


async def _version(args: argparse.Namespace, api: Api) -> int:
    try:
        server = await api.version()
    except ApiCallError as exc:
        _print_version(args, None, None)
        raise exc from None
    return _print_version(args, server, api.api_url)


def _print_version(args: argparse.Namespace, server: dict[str, Any] | None, api_url: str | None) -> int:
    doc: dict[str, Any] = {"client": {"version": client_version()}}
    if server is not None:
        doc["server"] = {**server, "url": api_url}
    if args.output != "text":
        print(dump(doc, args.output))
        return exits.OK
    print(f"client: {doc['client']['version']}")
    if server is not None:
        print(f"server: {server.get('version')} (API {server.get('api')}) at {api_url}")
    return exits.OK


async def _status(args: argparse.Namespace, api: Api) -> int:
    sandboxes = await api.sandboxes()
    for sb in sandboxes:
        sb["_events"] = await api.logs(sb["id"], {"tail": args.lines}) if args.lines > 0 else []
    print(json.dumps(sandboxes, indent=2) if args.json else render(sandboxes))
    return exits.OK


async def _fleet(args: argparse.Namespace, api: Api) -> int:
    params = {k: str(v) for k, v in (("since", args.since), ("limit", args.limit)) if v is not None}
    doc = await api.fleet(params)
    print(json.dumps(doc, indent=2) if args.output == "json" else render_fleet(doc))
    return exits.OK


_HANDLERS: dict[str, Callable[[argparse.Namespace, Api], Awaitable[int]]] = {
    "get": _get,
    "logs": _logs,
    "signal": _signal,
    "stop": _stop,
    "commands": _commands,
    "create": _create,
    "delete": _delete,
    "version": _version,
    "status": _status,
    "fleet": _fleet,
}


# -- login, logout --------------------------------------------------------------------------


def _login(args: argparse.Namespace, target: Target) -> int:
    cache = TokenCache()
    api = target.api
    if args.cmd == "logout":
        found = asyncio.run(logout(api, cache=cache))
        print(f"logged out of {api}" if found else f"no login kept for {api}")
        return exits.OK
    login = asyncio.run(
        device_login(
            api,
            cache=cache,
            issuer=args.issuer,
            client_id=args.client_id,
            out=lambda line: print(line, flush=True),
            insecure=args.insecure or target.insecure,
        )
    )
    who = f" as {login.username}" if login.username else ""
    print(f"logged in{who} at {login.issuer} for {login.api_url} (tokens kept in {cache.path})")
    return exits.OK


# -- config: the contexts -------------------------------------------------------------------


def _contexts_command(args: argparse.Namespace) -> int:
    path = contexts.config_path()
    config = contexts.load(path)
    if args.config_cmd == "get-contexts":
        if args.output != "table":
            print(dump(config.model_dump(mode="json"), args.output))
        elif not config.contexts:
            print(f"no contexts in {path}")
        else:
            rows = [
                [
                    "*" if name == config.current_context else "",
                    name,
                    ctx.api,
                    str(ctx.token_file or "-"),
                    "yes" if ctx.insecure else "no",
                ]
                for name, ctx in sorted(config.contexts.items())
            ]
            print(table(("CURRENT", "NAME", "API", "TOKEN FILE", "INSECURE"), rows))
        return exits.OK
    if args.config_cmd == "current-context":
        if config.current_context is None:
            raise ConfigError(str(path), ["current_context: not set (config use-context NAME sets it)"])
        print(config.current_context)
        return exits.OK
    if args.config_cmd == "use-context":
        if args.name not in config.contexts:
            known = ", ".join(sorted(config.contexts)) or "none"
            raise ConfigError(str(path), [f"contexts.{args.name}: no such context; known: {known}"])
        contexts.save(path, config.model_copy(update={"current_context": args.name}))
        print(f"switched to context {args.name} ({config.contexts[args.name].api})")
        return exits.OK
    if args.config_cmd == "delete-context":
        if args.name not in config.contexts:
            raise ConfigError(str(path), [f"contexts.{args.name}: no such context"])
        rest = {k: v for k, v in config.contexts.items() if k != args.name}
        current = None if config.current_context == args.name else config.current_context
        contexts.save(path, ClientConfig(current_context=current, contexts=rest))
        print(f"deleted context {args.name} from {path}")
        return exits.OK
    # set-context
    before = config.contexts.get(args.name)
    fields: dict[str, Any] = before.model_dump() if before is not None else {}
    for key, value in (
        ("api", args.set_api),
        ("token_file", args.set_token_file),
        ("insecure", args.set_insecure),
    ):
        if value is not None:
            fields[key] = value
    if args.set_token_file is not None:
        # Made absolute here, from where it was typed (as kubectl config set-credentials does):
        # kept relative, it would be read beside the config file, the rule for a hand-written one.
        fields["token_file"] = args.set_token_file.expanduser().absolute()
    if "api" not in fields:
        raise UsageError(f"config set-context: a new context needs --api URL ({args.name!r} is new)")
    try:
        ctx = Context.model_validate(fields)
    except ValidationError as exc:
        raise UsageError(f"config set-context {args.name}: {'; '.join(contexts.problems(exc))}") from None
    current = args.name if args.use else config.current_context
    contexts.save(path, ClientConfig(current_context=current, contexts={**config.contexts, args.name: ctx}))
    print(
        f"context {args.name} {'changed' if before else 'added'} in {path}"
        + (", now current" if args.use else "")
    )
    return exits.OK
