"""The `study` command: one sub-command per job (bench, train, eval, score, ...).

Each sub-command lives next to the code it drives and registers itself through ``register(subparsers)``;
this file only lists them. It is the composition root of the command line, and so the one module of
``study/`` that imports ``analysis`` (``study report``); tests/test_layering.py holds that exception.
Model variants do not come through here: study/models/build.py loads them in every process.

A user mistake (:class:`study.errors.UserError`: config, input, checkpoint, flag) ends in one line on
stderr and exit status 2. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys

import analysis.cli
import study.bench.cli
import study.eval.cli
import study.export.cli
import study.launch.cli
import study.train.cli
from study.errors import UserError

# Sub-command modules, in the order `study --help` lists them.
COMMANDS = [study.train.cli, study.bench.cli, study.eval.cli, study.export.cli, study.launch.cli, analysis.cli]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"study {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
