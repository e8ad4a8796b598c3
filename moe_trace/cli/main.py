"""`moe-trace` entry point. Each feature area registers its sub-commands from its own module."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from moe_trace.errors import MoeTraceError

from .options import HelpFormatter

# Modules that define `register(subparsers)`; each adds its commands with `set_defaults(func=...)`.
COMMAND_MODULES = (
    "moe_trace.cli.core_cmds",        # demo, inspect
    "moe_trace.cli.run_cmd",          # run
    "moe_trace.cli.trace_cmds",       # analyze, merge
    "moe_trace.cli.experiment_cmds",  # sweep, compare
    "moe_trace.cli.routing_cmds",     # routing-log, routing-analyze
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-trace", description="Make Mixture-of-Experts inference visible.",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    for command in sub.choices.values():  # every command's --help shows each option's default
        if command.formatter_class is argparse.HelpFormatter:
            command.formatter_class = HelpFormatter
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
    except BrokenPipeError:  # `moe-trace ... | head`: the reader left; stop quietly like other CLI tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
