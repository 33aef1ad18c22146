"""The `study` command: one sub-command per job (bench, train, eval, score, ...).

Each sub-command lives next to the code it drives and registers itself through ``register(subparsers)``;
this file only lists them. It is the composition root of the command line, and so the one module of
``study/`` that imports ``analysis`` (``study report``); tests/test_layering.py holds that exception.
Model variants do not come through here: study/models/build.py loads them in every process.

A user mistake (:class:`study.errors.UserError`: config, input, checkpoint, flag) ends in one line on
stderr and exit status 2. So do what the machine refuses (an OSError: a read-only output folder or mount, a
permission, a missing device; :func:`study.errors.os_error_line` names the path and the operation), Ctrl-C
(exit 130: what was interrupted is recorded as interrupted by the code that was running) and a reader that
stops reading (``study status | head``: quiet, exit 0 as for other Unix tools). Any other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

import analysis.cli
import study.bench.cli
import study.eval.cli
import study.export.cli
import study.launch.cli
import study.predict.cli
import study.train.cli
from study.errors import UserError, os_error_line

# Sub-command modules, in the order `study --help` lists them.
COMMANDS = [study.train.cli, study.bench.cli, study.eval.cli, study.predict.cli, study.export.cli, study.launch.cli,
            analysis.cli]


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
    except KeyboardInterrupt:
        print(f"study {args.command}: interrupted (Ctrl-C); a run it was writing is marked interrupted and "
              f"resumes when launched again", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except OSError as e:
        print(f"study {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2


def _quiet_stdout() -> None:
    """The reader of stdout is gone (``| head``): point stdout at /dev/null so that Python's own flush at exit
    does not raise a second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (a test's captured stdout)
        pass


if __name__ == "__main__":
    sys.exit(main())
