"""``study train [CONFIG] [--set key=value ...]``: train, resume, or skip a finished run."""
from __future__ import annotations

import argparse

from study.flags import add_set_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train any variant (resumes an interrupted run)",
                       description="Train the configured model. The run folder is <output_dir>/<name>-<hash of "
                                   "the config>; running the same command again resumes an interrupted run and "
                                   "skips a finished one. Progress: a line on stdout and in <run>/logs/train.log "
                                   "every train.log_every steps or train.log_every_s seconds (default 30 s); "
                                   "STUDY_PROGRESS=1 draws a bar; train.eval_every=N evaluates every N steps "
                                   "(docs/training.md).")
    p.add_argument("config", nargs="?",
                   help="YAML config, e.g. experiments/quickstart.yaml (tiny EoMT on the built-in synthetic "
                        "set). Without one, the dataclass defaults of study/config.py apply, which describe "
                        "COCO panoptic (133 classes, L at 640) and need data.dataset and data.root set")
    add_set_flag(p, "train.max_steps=200")
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
