"""Training benchmark: variants trained from scratch for the same wall-clock minutes, then scored.

    python -m study.bench.train_budget camvid --minutes 5 [--variants eomt,vit_adapter_m2f] [--json PATH]
    python -m study.bench.train_budget synthetic --minutes 3
    python -m study.bench.train_budget camvid --minutes 3 --variants eomt --token-merging [--json PATH]

Each variant is first timed for a few steps; its number of steps is then set so that it trains for the
same number of minutes (the lr schedule and mask annealing stay complete, over that many steps). The result
is the score on the validation split (CamVid: mIoU with the windowed protocol at crop 240, i.e. images at
240x320; synthetic: PQ) and the training throughput in images per second. This is a benchmark, not a test:
it prints figures and asserts nothing.

``--token-merging`` (EoMT variants): the trained model is then also evaluated and benchmarked with ALGM token
merging at inference (Table 9; study/bench/merging.py: score, GFLOPs mean +- std over the validation crops, and
interleaved FPS at batch 1 and 32, each without and with merging), printed as a table and added to the row.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from study.config import Config, load_config
from study.runs import RunDir

# A tiny ViT under every variant; the Mask2Former widths narrowed to the ViT's 64 channels so that the
# decoder does not dwarf the backbone (our choice for a CPU-sized comparison, recorded in each row).
NARROW_M2F = ["model.baseline.hidden_dim=64", "model.baseline.encoder_ffn=256", "model.baseline.decoder_ffn=256",
              "model.baseline.encoder_heads=4", "model.baseline.decoder_heads=4"]

PRESETS = {
    "camvid": ["task=semantic", "data.dataset=list", "model.num_classes=11", "model.num_queries=50",
               "model.img_size=240", "data.batch_size=4", "train.batch_size=4"],
    "synthetic": ["task=panoptic", "data.dataset=synthetic", "model.num_classes=6", "model.num_queries=20",
                  "model.img_size=128", "data.batch_size=8", "train.batch_size=8"],
}
# From scratch rather than from DINOv2 (the paper's lr 1e-4 and layer decay assume a pre-trained backbone).
SCRATCH = ["model.size=tiny", "train.lr=1e-3", "train.layer_decay=1.0", "train.warmup_steps=20",
           "train.backbone_warmup_steps=20", "train.num_points=2048", "train.tensorboard=false",
           "train.checkpoint_every=100000"]


def config_for(preset: str, variant: str, root: str | None, steps: int, out: Path) -> Config:
    sets = PRESETS[preset] + SCRATCH + [f"model.variant={variant}", f"train.max_steps={steps}",
                                        f"output_dir={out}", f"name={preset}-{variant}"]
    if root:
        sets.append(f"data.root={root}")
    if not variant.startswith("eomt"):
        sets += NARROW_M2F
    return load_config(None, sets)


def seconds_per_step(preset: str, variant: str, root: str | None, out: Path, steps: int = 8) -> float:
    """Steady-state wall-clock seconds per optimiser step, from a short run of the same configuration.

    The log's images_per_s is cumulative, so the elapsed time at step k is k x batch / images_per_s; the
    first two steps (data loader start, allocator warm-up) are left out.
    """
    import csv

    from study.train.loop import train

    cfg = config_for(preset, variant, root, steps, out / "calibration")
    with open(train(cfg).csv_log) as f:
        rows = list(csv.DictReader(f))
    elapsed = [int(r["step"]) * cfg.train.batch_size / float(r["images_per_s"]) for r in rows]
    return (elapsed[-1] - elapsed[1]) / (len(elapsed) - 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("--minutes", type=float, default=5.0, help="training minutes per variant")
    p.add_argument("--variants", default="eomt,vit_adapter_m2f")
    p.add_argument("--root", help="data folder (CamVid: a CamVid folder with train.txt / val.txt)")
    p.add_argument("--out", help="folder for the runs (default: a temporary folder)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--token-merging", action="store_true",
                   help="EoMT variants: also evaluate and benchmark the trained model with ALGM token merging")
    args = p.parse_args(argv)
    if args.preset == "camvid" and not args.root:
        p.error("camvid needs --root (the CamVid folder with train.txt / val.txt)")

    from dataclasses import replace

    from study.bench.flops import count_flops, count_params
    from study.eval.run import evaluate_run
    from study.models.build import build_model

    out = Path(args.out or tempfile.mkdtemp(prefix="train_budget_"))
    rows = []
    for variant in args.variants.split(","):
        sec = seconds_per_step(args.preset, variant, args.root, out)
        steps = max(1, int(args.minutes * 60 / sec))
        cfg = config_for(args.preset, variant, args.root, steps, out)
        from study.train.loop import train

        run: RunDir = train(cfg)  # a finished run of the same config is reused, not retrained
        images_per_s = run.metrics()["train"]["images_per_s"]
        train_min = steps * cfg.train.batch_size / images_per_s / 60  # the loop's own clock
        metrics = evaluate_run(cfg, run.final_weights, run, progress=False)  # recorded in the run folder
        score = metrics["miou"] if cfg.task == "semantic" else metrics["All"]["pq"]
        model = build_model(replace(cfg.model, checkpoint=None, pretrained=None))  # FLOPs need no weights
        row = {"variant": variant, "preset": args.preset, "steps": steps, "train_minutes": round(train_min, 2),
               "images_per_s": round(images_per_s, 2),
               "params_m": round(count_params(model) / 1e6, 3),
               "gflops": round(count_flops(model, cfg.model.img_size).gflops, 3),
               "metric": "mIoU" if cfg.task == "semantic" else "PQ", "score": score,
               "baseline_options": cfg.model.baseline, "run": str(run.path)}
        if args.token_merging and hasattr(model, "set_token_merging"):
            from study.bench import merging

            _, trained, _ = merging.load_run(run.path, run.final_weights, [])
            row["token_merging"] = merging.compare(cfg, trained)
            print(merging.table(row["token_merging"]), flush=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'variant':<20}{'steps':>7}{'minutes':>9}{'img/s':>8}{'params M':>10}{'GFLOPs':>8}  metric")
    for r in rows:
        print(f"{r['variant']:<20}{r['steps']:>7}{r['train_minutes']:>9.2f}{r['images_per_s']:>8.2f}"
              f"{r['params_m']:>10.3f}{r['gflops']:>8.3f}  {r['metric']} {r['score']:.4f}")
    if args.json:
        from study.io import atomic_write_json

        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
