"""``study train CONFIG [--set key=value ...]``: train, resume, or skip a finished run."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train any variant (resumes an interrupted run)",
                       description="Train the configured model. The run folder is <output_dir>/<name>-<hash of "
                                   "the config>; running the same command again resumes an interrupted run and "
                                   "skips a finished one.")
    p.add_argument("config", nargs="?", help="YAML config (defaults: tiny EoMT on the built-in synthetic set)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable (e.g. --set train.max_steps=200)")
    p.add_argument("--run-dir", help="use this folder instead of <output_dir>/<name>-<hash>")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from study.config import load_config
    from study.runs import RunDir
    from study.train.loop import train

    cfg = load_config(args.config, args.overrides)
    done = train(cfg, RunDir(args.run_dir) if args.run_dir else None)
    print(f"study train: run folder {done.path}")
    return 0
