"""`llmp`: the command line. Each group of subcommands lives in its own module, which exposes
`register(subparsers)`; add a module to COMMAND_MODULES to add its commands."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that register subcommands, in the order `llmp --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "cli.stack",  # up, down, status
    "cli.resources",  # dataset, train, jobs, models, deploy, complete, keys
    "cli.chat",  # chat
    "cli.embed",  # embed
)


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmp", description="Build, train, register and serve language models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in modules:
        importlib.import_module(module).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
