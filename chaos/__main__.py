"""``python -m chaos bench``: the scale benchmark (chaos/scale.py); ``python -m chaos run NAME|all|ci``:
the chaos suite (chaos/run.py); ``python -m chaos rebalance``: three replicas, all sessions on one at first
(chaos/rebalance.py)."""

from __future__ import annotations

import argparse
import sys

from chaos import rebalance, run, scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos", description="Scale and chaos runs against real gateways."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="the scale benchmark: a gateway and the echo baseline under the Go simulator, then storms",
        description=(scale.__doc__ or "").split("\n\n")[0],
    )
    scale.add_arguments(bench)
    chaos_run = commands.add_parser(
        "run",
        help="the chaos suite: scenarios by name, 'all' or 'ci', with a JSON and markdown report",
        description=(run.__doc__ or "").split("\n\n")[0],
    )
    run.add_arguments(chaos_run)
    chaos_rebalance = commands.add_parser(
        "rebalance",
        help="three replicas on PostgreSQL, every simulated session on one at first: time until each holds "
        "a third, nothing lost or doubled",
        description=(rebalance.__doc__ or "").split("\n\n")[0],
    )
    rebalance.add_arguments(chaos_rebalance)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return scale.bench(args)
    if args.command == "run":
        return run.run(args)
    if args.command == "rebalance":
        return rebalance.rebalance(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
