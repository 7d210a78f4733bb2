"""``python -m chaos bench``: the scale benchmark (chaos/scale.py). The chaos suite's ``run NAME|all``
will be another subcommand here."""

from __future__ import annotations

import argparse
import sys

from chaos import scale


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
    args = parser.parse_args(argv)
    if args.command == "bench":
        return scale.bench(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
