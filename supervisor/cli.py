"""``openshell-supervisor``: run a sandbox's main process under supervision, or check a config.

    openshell-supervisor run [--config FILE] [--sandbox-id ID] [--gateway HOST:PORT]
                             [--journal-dir DIR] [--set KEY=VALUE ...] -- COMMAND [ARG ...]
    openshell-supervisor install DIR          copy this bundle into DIR (init-container fallback)
    openshell-supervisor config check FILE [--sandbox-id ID]
    openshell-supervisor config schema

Flags override the environment (OPENSHELL_SUPERVISOR_*), which overrides the file, which
overrides the defaults. Exit status of ``run`` is the main process's (128 + signal for a signal);
a configuration problem is exit status 78, each problem on its line, before anything starts.
``config check`` reads FILE with the environment through the same rules
(:mod:`openshell_wire.configcheck`), so it refuses what ``run`` would; a FILE without sandbox_id
is ok there (each pod gives its own with ``--sandbox-id``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from openshell_wire.configcheck import check_command, load_checked, report
from openshell_wire.configfile import (
    ConfigError,
    config_command,
    deep_merge,
    parse_set_flags,
)
from openshell_wire.logsetup import setup_logging
from supervisor.config import SupervisorConfig

#: The sandbox id ``config check`` validates a file with when no layer gives one (a valid id).
_CHECK_SANDBOX_ID = "sandbox-id-given-when-run"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openshell-supervisor", description="OpenShell sandbox supervisor")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run COMMAND as the sandbox's main process")
    run.add_argument("--config", type=Path, help="YAML config file")
    run.add_argument("--sandbox-id")
    run.add_argument("--instance-id")
    run.add_argument("--gateway", help="gateway gRPC address host:port")
    run.add_argument("--journal-dir", type=Path)
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["text", "json"])
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any setting by dotted key"
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    install = sub.add_parser("install", help="copy this bundle into DIR (the init-container fallback)")
    install.add_argument("dir", type=Path)
    config = sub.add_parser("config", help="check a config file or print the schema")
    csub = config.add_subparsers(dest="config_cmd", required=True)
    check = csub.add_parser(
        "check",
        help="validate FILE with the environment's OPENSHELL_SUPERVISOR_* as run reads them; every "
        "problem by key path, exit status 78",
    )
    check.add_argument("file", type=Path)
    check.add_argument(
        "--sandbox-id",
        help="the id run will be given (else a file without sandbox_id is checked as one that gets it "
        "on the command line)",
    )
    csub.add_parser("schema", help="print the JSON Schema of the config")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    if args.sandbox_id is not None:
        flags["sandbox_id"] = args.sandbox_id
    if args.instance_id is not None:
        flags["instance_id"] = args.instance_id
    if args.gateway is not None:
        flags["gateway"] = {"address": args.gateway}
    if args.journal_dir is not None:
        flags["journal"] = {"directory": str(args.journal_dir)}
    if args.log_level is not None:
        flags["log_level"] = args.log_level
    if args.log_format is not None:
        flags["log_format"] = args.log_format
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if command:
        flags["command"] = command
    return deep_merge(parse_set_flags(args.set), flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "install":
        from supervisor.install import InstallError, install  # noqa: PLC0415

        try:
            print(install(args.dir))
        except InstallError as exc:
            print(f"openshell-supervisor: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "config":
        if args.config_cmd == "check":
            # One file commonly serves every sandbox, each pod giving its id as --sandbox-id.
            return check_command(
                SupervisorConfig,
                args.file,
                program="openshell-supervisor",
                overrides={"sandbox_id": args.sandbox_id} if args.sandbox_id is not None else None,
                given_when_run={"sandbox_id": _CHECK_SANDBOX_ID},
            )
        return config_command(SupervisorConfig, args.config_cmd, None)
    try:
        config = load_checked(SupervisorConfig, file=args.config, overrides=_overrides(args))
    except ConfigError as exc:
        return report("openshell-supervisor", exc)
    setup_logging(config.log_level, config.log_format)
    from supervisor.agent import run  # noqa: PLC0415 - keeps `config` subcommands light

    return asyncio.run(run(config))


if __name__ == "__main__":
    raise SystemExit(main())
