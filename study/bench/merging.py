"""Token merging benchmark (Table 9): a trained EoMT with and without ALGM (model.token_merging), on real images.

    python -m study.bench.merging RUN_FOLDER [--weights FILE] [--set model.token_merging.threshold=0.8 ...]
        [--max-images N] [--batches 1,32] [--rounds 7] [--iters 3] [--no-eval] [--json PATH]

RUN_FOLDER is a finished training run (its config.yaml and checkpoints/model_final.pt; ``python -m
study.bench.train_budget camvid --token-merging`` trains one and calls this). Reported, each without and with
merging:

- accuracy: the configuration's evaluation (study/eval, ``eval.split`` or ``data.val_split``; semantic: mIoU
  with the windowed protocol), one crop per forward so that each crop merges by itself;
- GFLOPs per forward (one crop at ``model.img_size``, the suite's convention: docs/paper.md section 8) as mean
  +- std over the crops of the evaluated images, as detectron2's ``analyze_model`` reports them. With merging
  the count depends on the image. It is counted with fvcore on the real forward of each crop: the fast counter
  (study/bench/count_fake.py) runs on FakeTensors, which cannot give the data-dependent number of merged
  tokens. A forward's FLOPs are a function of its token counts alone, so crops with the token counts of an
  earlier crop reuse its count (exact, and the benchmark stays fast);
- the patch tokens left after each merge (mean, min, max over the crops);
- FPS at each batch size of ``--batches`` (crops of the evaluated images, cycled to fill the batch; merging
  takes the batch minimum of mergeable tokens, the paper's protocol, docs/paper.md section 4), measured
  interleaved: ``--rounds`` rounds, each times ``--iters`` forwards of the plain model then of the merged one
  (the order alternates between rounds), so that drifts of the machine hit both alike; the median images/s over
  the rounds and its spread (min, max) are reported, and the speedup with a 95% bootstrap interval that
  resamples whole rounds (study/bench/stats.py's ratio interval).

This is a benchmark: it prints figures and asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from study.bench.flops import count_forward
from study.errors import UserError


def load_run(run: str | Path, weights: str | Path | None, overrides: list[str]):
    """The run's configuration (with ``overrides``) and its trained model, merging off."""
    from study.config import load_config
    from study.models.build import build_model
    from study.models.checkpoint import load_checkpoint

    run = Path(run)
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{run} is not a run folder (no config.yaml); give a finished training run")
    cfg = load_config(cfg_file, overrides)
    weights = Path(weights) if weights else run / "checkpoints" / "model_final.pt"
    if not weights.is_file():
        raise UserError(f"no trained weights at {weights}; finish the run or give --weights")
    model = build_model(replace(cfg.model, checkpoint=None, pretrained=None,
                                token_merging=replace(cfg.model.token_merging, enabled=False)))
    load_checkpoint(model, weights)
    if not hasattr(model, "set_token_merging"):
        raise UserError(f"model.variant '{cfg.model.variant}' is not EoMT; token merging applies to EoMT only")
    return cfg, model.eval(), weights


def merge_settings(cfg):
    """ALGM's settings of the configuration (model.token_merging, enabled), for its model size."""
    return replace(cfg.model.token_merging, enabled=True).resolve(cfg.model.size)


def crops_of(dataset, n: int, size: int) -> list[torch.Tensor]:
    """The windowed protocol's crops (3, S, S) in [0, 1] of the first ``n`` images of ``dataset``."""
    from study.eval.inference import window_crops

    out = []
    for i in range(min(n, len(dataset))):
        crops, _, _ = window_crops(dataset[i].image, size)
        out.extend(crops)
    return out


def cost(model, crops: list[torch.Tensor], settings) -> dict:
    """GFLOPs per forward and patch tokens after each merge, over ``crops`` one at a time, without and with
    merging (``settings``)."""
    model.set_token_merging(None)
    plain = count_forward(model, crops[0][None]) / 1e9
    model.set_token_merging(settings)
    by_tokens: dict[tuple, float] = {}
    gflops, tokens = [], []
    with torch.no_grad():
        for crop in crops:
            model(crop[None])
            key = tuple(model.last_merges)
            if key not in by_tokens:
                by_tokens[key] = count_forward(model, crop[None]) / 1e9
                assert tuple(model.last_merges) == key  # the traced forward merged as the counted one
            gflops.append(by_tokens[key])
            tokens.append([after for _, _, after in key])
    model.set_token_merging(None)
    per_merge = list(zip(*tokens))
    num_patches = model.backbone.grid_size[0] * model.backbone.grid_size[1]
    return {
        "crops": len(crops),
        "patch_tokens": num_patches,
        "gflops_plain": round(plain, 4),
        "gflops_merged_mean": round(statistics.fmean(gflops), 4),
        "gflops_merged_std": round(statistics.pstdev(gflops), 4),
        "gflops_merged_min": round(min(gflops), 4),
        "gflops_merged_max": round(max(gflops), 4),
        "tokens_after_merges": [{"block": blk, "mean": round(statistics.fmean(t), 2), "min": min(t), "max": max(t)}
                                for (blk, _, _), t in zip(next(iter(by_tokens)), per_merge)],
        "distinct_token_counts": len(by_tokens),
    }


def interleaved_fps(model, crops: list[torch.Tensor], settings, batch: int, rounds: int, iters: int,
                    device: str = "auto", precision: str = "auto", warmup: int = 2) -> dict:
    """Images/s of the plain and the merged model, timed in alternating rounds (see the module docstring)."""
    from study.bench.stats import speed_ratios
    from study.bench.timing import device_context, time_iterations
    from study.device import autocast, resolve_device, resolve_precision, synchronize

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    images = torch.stack([crops[i % len(crops)] for i in range(batch)]).to(dev)
    model = model.to(dev).eval()
    arms = {"plain": None, "merged": settings}
    fps: dict[str, list[float]] = {k: [] for k in arms}
    seconds: dict[str, list[float]] = {k: [] for k in arms}  # per forward, each round (paired for the interval)

    def step():
        return model(images)

    with device_context(dev), torch.no_grad(), autocast(dev, prec):
        for name, s in arms.items():
            model.set_token_merging(s)
            for _ in range(warmup):
                step()
        synchronize(dev)
        for r in range(rounds):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for name in order:
                model.set_token_merging(arms[name])
                times = time_iterations(step, dev, iters)
                fps[name].append(iters * batch / sum(times))
                seconds[name].append(sum(times) / iters)
    model.set_token_merging(None)
    out = {"batch": batch, "rounds": rounds, "iters": iters, "device": str(dev), "precision": prec}
    for name, v in fps.items():
        out[f"fps_{name}"] = round(statistics.median(v), 2)
        out[f"fps_{name}_min"] = round(min(v), 2)
        out[f"fps_{name}_max"] = round(max(v), 2)
    out["speedup"] = round(out["fps_merged"] / out["fps_plain"], 3)
    # the speedup's interval resamples whole rounds, both arms of a round together (speed.py's ratios)
    merged = speed_ratios([seconds["plain"], seconds["merged"]], reference=0)[1]
    out["speedup_ci"] = [round(merged["ci_low"], 3), round(merged["ci_high"], 3)]
    return out


def compare(cfg, model, max_images: Optional[int] = None, batches=(1, 32), rounds: int = 7, iters: int = 3,
            evaluate_accuracy: bool = True) -> dict:
    """Everything the module docstring lists, for a trained EoMT ``model`` of configuration ``cfg``."""
    from study.data import build_dataset
    from study.eval.run import evaluate

    settings = merge_settings(cfg)
    split = cfg.eval.split or cfg.data.val_split
    dataset = build_dataset(cfg.data, split, cfg.task)
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    size = cfg.eval.input_size or cfg.model.img_size
    out: dict = {"settings": settings._asdict(), "split": split, "images": n, "input_size": size}
    if evaluate_accuracy:
        eval_cfg = replace(cfg.eval, batch_size=1, max_images=n)  # one crop per forward: each merges by itself
        metric = "miou" if cfg.task == "semantic" else None
        for name, s in (("plain", None), ("merged", settings)):
            model.set_token_merging(s)
            result = evaluate(model, dataset, cfg.task, eval_cfg, size, progress=False)
            out[f"score_{name}"] = result[metric] if metric else result.get("All", {}).get("pq")
        model.set_token_merging(None)
        out["metric"] = "mIoU" if metric else "PQ"
    crops = crops_of(dataset, n, size)
    model.to("cpu")
    out["cost"] = cost(model, crops, settings)
    out["fps"] = [interleaved_fps(model, crops, settings, b, rounds, iters) for b in batches]
    return out


def table(result: dict) -> str:
    """The with/without table (markdown)."""
    c = result["cost"]
    fps = {f["batch"]: f for f in result["fps"]}
    head = "| Token merging | " + result.get("metric", "score") + " | GFLOPs | " + \
        " | ".join(f"FPS (batch {b})" for b in fps) + " |"
    lines = [head, "|" + "---|" * (3 + len(fps))]
    for name, mark in (("plain", "no"), ("merged", "ALGM")):
        score = result.get(f"score_{name}")
        g = (f"{c['gflops_plain']:.3f}" if name == "plain"
             else f"{c['gflops_merged_mean']:.3f} ± {c['gflops_merged_std']:.3f}")
        cells = [f"{f[f'fps_{name}']:.1f} [{f[f'fps_{name}_min']:.1f}, {f[f'fps_{name}_max']:.1f}]" for f in fps.values()]
        lines.append(f"| {mark} | {'' if score is None else f'{100 * score:.1f}'} | {g} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("FPS speedup with ALGM (median over rounds, 95% bootstrap interval over paired rounds): " + ", ".join(
        f"batch {b} {f['speedup']:.2f}x" + (f" [{f['speedup_ci'][0]:.2f}-{f['speedup_ci'][1]:.2f}]"
                                             if f.get("speedup_ci") else "") for b, f in fps.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a finished training run folder")
    p.add_argument("--weights", help="weights file (default: the run's checkpoints/model_final.pt)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="configuration override, e.g. model.token_merging.threshold=0.8")
    p.add_argument("--max-images", type=int, help="evaluate and count on the first N images of the split")
    p.add_argument("--batches", default="1,32", help="batch sizes of the FPS measurement")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--no-eval", action="store_true", help="cost and FPS only")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    try:
        cfg, model, weights = load_run(args.run, args.weights, args.set)
        result = compare(cfg, model, args.max_images, batches, args.rounds, args.iters, not args.no_eval)
    except UserError as e:  # a user mistake: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(run=str(args.run), weights=str(weights))
    print(json.dumps(result), flush=True)
    print()
    print(table(result))
    if args.json:
        from study.io import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
