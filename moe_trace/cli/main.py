"""`moe-trace` entry point. Each feature area registers its sub-commands from its own module."""
from __future__ import annotations

import argparse
import importlib
import sys

from moe_trace.errors import MoeTraceError

# Modules that define `register(subparsers)`; each adds its commands with `set_defaults(func=...)`.
COMMAND_MODULES = (
    "moe_trace.cli.core_cmds",        # demo, inspect
    "moe_trace.cli.run_cmd",          # run
    "moe_trace.cli.trace_cmds",       # analyze, merge
    "moe_trace.cli.experiment_cmds",  # sweep, compare
    "moe_trace.cli.routing_cmds",     # routing-log, routing-analyze
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-trace", description="Make Mixture-of-Experts inference visible.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MoeTraceError as exc:
        print(f"moe-trace: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
