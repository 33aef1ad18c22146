"""``study bench``: the command line of the benchmark (study/bench/run.py does the work).

Every flag but ``--json`` and ``--list`` sets a ``bench.*`` config key (study/flags.py), like ``--set``.
"""
from __future__ import annotations

import argparse

from study.flags import add_set_flag, config_flag, csv


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="parameters, GFLOPs and FPS of variants x sizes",
                       description="Parameters, GFLOPs (fvcore convention) and FPS (stated protocol) for every "
                                   "variant x size, by default in the paper's COCO panoptic setting "
                                   "(133 classes, 200 queries); other tasks through --set model.num_classes=... "
                                   "model.num_queries=...")
    p.add_argument("config", nargs="?", help="optional YAML config (bench and model sections)")
    add_set_flag(p, "model.num_queries=100")
    config_flag(p, "--variants", "bench.variants", type=csv, help="comma-separated variant names (study bench --list)")
    config_flag(p, "--sizes", "bench.sizes", type=csv, help="comma-separated sizes: S,B,L,g (or tiny)")
    config_flag(p, "--img-size", "bench.img_size", type=int,
                help="square input size, a multiple of model.patch_size")
    config_flag(p, "--no-fps", "bench.fps", const=False, help="count parameters and GFLOPs only")
    config_flag(p, "--counter", "bench.counter", type=str,
                help="GFLOPs counter: fast (FakeTensors, no arithmetic, seconds) or fvcore (a real traced "
                     "forward, the reference; same numbers)")
    config_flag(p, "--device", "bench.device", type=str, help="auto, cpu, cuda, cuda:1, ...")
    config_flag(p, "--precision", "bench.precision", type=str, help="auto, fp32, bf16 or fp16")
    config_flag(p, "--compile", "bench.compile", const=True, help="torch.compile the model before timing")
    config_flag(p, "--compile-mode", "bench.compile_mode", type=str,
                help="torch.compile mode: torch's plain mode (named 'default') or max-autotune")
    config_flag(p, "--freezing", "bench.freezing", const=True,
                help="compiled rows with inductor's freezing (parameters as graph constants; inference only)")
    config_flag(p, "--warmup", "bench.warmup", type=int, help="untimed interleaved rounds before timing")
    config_flag(p, "--iters", "bench.iters", type=int, help="timed interleaved rounds, at least")
    config_flag(p, "--min-time", "bench.min_time", type=float,
                help="seconds of timed iterations per row, at least (more rounds until each row has them)")
    config_flag(p, "--batch", "bench.batch", type=int, help="images per forward (Table 9 also uses 32)")
    config_flag(p, "--threads", "bench.threads", type=int,
                help="CPU threads for the measurement (unset: every core this process may use)")
    config_flag(p, "--modes", "bench.modes", type=csv,
                help="settings timed side by side in the same rounds, e.g. eager,compile,bf16,compile+bf16 "
                     "('+' joins eager/compile/freeze, fp32/bf16/fp16 and a runtime name)")
    config_flag(p, "--runtime", "bench.runtime", type=str, help="what runs the model: pytorch or a registered "
                                                                "runtime (study/bench/runtimes.py RUNTIMES)")
    config_flag(p, "--reference", "bench.reference", type=str,
                help="the row the ratios are relative to: a variant, or variant:mode (unset: the first row)")
    config_flag(p, "--scope", "bench.scope", type=str, help="what the timed region holds: model or end_to_end")
    config_flag(p, "--no-breakdown", "bench.breakdown", const=False,
                help="skip the per-component time breakdown (taken from the timed iterations themselves)")
    config_flag(p, "--no-limit", "bench.limit", const=False,
                help="skip the matmul probes and each row's ratio to its matrix-multiply limit (x limit)")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--list", action="store_true", help="list the registered variants and sizes, and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from study.bench.run import HEADER, bench_rows, format_table
    from study.config import load_config
    from study.io import atomic_write_json
    from study.models.backbone import SIZES
    from study.models.build import variants

    if args.list:
        for v in variants().values():
            row = f"Table 1 row {v.row}: {v.label}" if v.row is not None else "not in Table 1"
            print(f"{v.name:<22}{row}")
        print("sizes: " + ", ".join(SIZES))
        return 0
    cfg = load_config(args.config, args.overrides)
    b = cfg.bench
    modes = f" x {len(b.modes)} modes" if b.modes else ""
    print(f"study bench: {len(b.variants)} variants x {len(b.sizes)} sizes{modes} at {b.img_size}px, batch "
          f"{b.batch}, {cfg.model.num_classes} classes, {cfg.model.num_queries} queries")
    print(HEADER)
    rows = bench_rows(cfg)  # prints each row as it is measured
    print(format_table(rows, with_rows=False))
    if args.json:
        atomic_write_json(args.json, rows)
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0
