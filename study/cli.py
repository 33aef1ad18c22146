"""The `study` command: one sub-command per job (bench, train, eval, score, ...).

Each sub-command lives next to the code it drives and registers itself through ``register(subparsers)``;
this file only lists them. A user mistake (config, input, checkpoint) ends in one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, in the order `study --help` lists them.
COMMANDS = [
    "study.train.cli",
    "study.bench.cli",
    "study.eval.cli",
    "study.launch.cli",
    "analysis.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, KeyError) as e:
        # User mistakes: one readable line. Programming errors (anything else) keep their traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"study {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
