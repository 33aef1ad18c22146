"""``study bench``: the command line of the benchmark (study/bench/run.py does the work)."""
from __future__ import annotations

import argparse


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="parameters, GFLOPs and FPS of variants x sizes",
                       description="Parameters, GFLOPs (fvcore convention) and FPS (stated protocol) for every "
                                   "variant x size, by default in the paper's COCO panoptic setting "
                                   "(133 classes, 200 queries); other tasks through --set model.num_classes=... "
                                   "model.num_queries=...")
    p.add_argument("config", nargs="?", help="optional YAML config (bench and model sections)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable (e.g. --set model.num_queries=100)")
    p.add_argument("--variants", type=_csv, help="comma-separated variant names (study bench --list)")
    p.add_argument("--sizes", type=_csv, help="comma-separated sizes: S,B,L,g (or tiny)")
    p.add_argument("--img-size", type=int, help="square input size, divisible by the patch size (16)")
    p.add_argument("--no-fps", action="store_true", help="count parameters and GFLOPs only")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model before timing")
    p.add_argument("--warmup", type=int, help="untimed iterations before timing")
    p.add_argument("--iters", type=int, help="timed iterations")
    p.add_argument("--scope", choices=["model", "end_to_end"], help="what the timed region holds")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-component time breakdown")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--list", action="store_true", help="list the registered variants and sizes, and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from study.bench.run import bench_rows, format_table
    from study.config import load_config
    from study.io import atomic_write_json
    from study.models.backbone import SIZES
    from study.models.build import variants

    if args.list:
        print("variants: " + ", ".join(variants()))
        print("sizes: " + ", ".join(SIZES))
        return 0
    overrides = list(args.overrides)
    for flag, key in (("variants", "variants"), ("sizes", "sizes"), ("img_size", "img_size"),
                      ("device", "device"), ("precision", "precision"), ("warmup", "warmup"),
                      ("iters", "iters"), ("scope", "scope")):
        value = getattr(args, flag)
        if value is not None:
            value = "[" + ",".join(value) + "]" if isinstance(value, list) else value
            overrides.append(f"bench.{key}={value}")
    if args.no_fps:
        overrides.append("bench.fps=false")
    if args.compile:
        overrides.append("bench.compile=true")
    if args.no_breakdown:
        overrides.append("bench.breakdown=false")
    cfg = load_config(args.config, overrides)
    from study.bench.run import HEADER, check_bench

    check_bench(cfg)
    print(f"study bench: {len(cfg.bench.variants)} variants x {len(cfg.bench.sizes)} sizes at "
          f"{cfg.bench.img_size}px, {cfg.model.num_classes} classes, {cfg.model.num_queries} queries")
    print(HEADER)
    rows = bench_rows(cfg)  # prints each row as it is measured
    print(format_table(rows, with_rows=False))
    if args.json:
        atomic_write_json(args.json, rows)
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0
