"""Images per second of a whole evaluation of tiny EoMT on the COCO mini sample (issue 16).

``python -m study.eval.bench_eval_speed --data ROOT [--before-tree DIR] [--repeats 3]`` evaluates tiny EoMT
(random weights, every score threshold as configured) on ``ROOT`` (a COCO instance folder: the shared
``coco_mini``) for the instance task, in a fresh process per run, and prints images/s. Variants alternate, run
after run, and the medians are reported:

- ``sequential``: the current code with eval.batch_size=1, no workers, no overlap;
- ``batched``: eval.batch_size, eval.num_workers and the overlapped post-processing;
- ``before`` (with ``--before-tree``): the code of an older checkout of study/ (e.g. ``git archive``), run
  with that folder first on PYTHONPATH and its own defaults, the batch size aside.

Timings on a shared machine vary: compare medians of interleaved runs, never single runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _child(data: str, size: int, batch: int, workers: int, overlap: bool, task: str, max_images) -> dict:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    from study.config import load_config
    from study.data import build_dataset
    from study.data.config import DataConfig
    from study.eval.config import EvalConfig
    from study.eval.run import evaluate
    from study.models.build import build_model

    torch.manual_seed(0)
    ds = build_dataset(DataConfig(dataset="coco_instance", root=data), "val", "instance")
    model = build_model(load_config(None, ["model.size=tiny", f"model.img_size={size}", "model.num_classes=80",
                                           "model.num_queries=200"]).model).eval()
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    kw = {"batch_size": batch, "num_workers": workers, "overlap": overlap, "max_images": max_images}
    settings = EvalConfig(**{k: v for k, v in kw.items() if k in fields})  # an older EvalConfig lacks some
    t0 = time.perf_counter()
    out = evaluate(model, ds, task, settings, size, progress=False)
    dt = time.perf_counter() - t0
    return {"images": out["num_images"], "seconds": dt, "images_per_s": out["num_images"] / dt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m study.eval.bench_eval_speed", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a COCO instance folder (the shared coco_mini)")
    p.add_argument("--before-tree", help="a folder holding an older study/ package to compare with")
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--task", default="instance")
    p.add_argument("--max-images", type=int, help="the first this-many images only (default: all)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # batch workers overlap
    a = p.parse_args(argv)
    if a.child:
        b, w, o = a.child
        print(json.dumps(_child(a.data, a.size, int(b), int(w), o == "1", a.task, a.max_images)))
        return 0
    variants = {"sequential": (None, (1, 0, 0)), "batched": (None, (a.batch_size, a.num_workers, 1))}
    if a.before_tree:
        variants = {"before": (a.before_tree, (1, 0, 0)), **variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(a.repeats):
        for v, (tree, (b, w, o)) in variants.items():
            env = dict(os.environ)
            if tree:
                env["PYTHONPATH"] = str(Path(tree).resolve()) + os.pathsep + env.get("PYTHONPATH", "")
            cmd = [sys.executable, "-m", "study.eval.bench_eval_speed", "--data", str(Path(a.data).resolve()), "--size", str(a.size),
                   "--task", a.task, *(["--max-images", str(a.max_images)] if a.max_images else []),
                   "--child", str(b), str(w), str(o)]
            if tree:  # the older tree has no copy of this script: run this file's child by path
                cmd[1:3] = [str(Path(__file__).resolve())]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree or None)
            if done.returncode:
                raise RuntimeError(f"{v} run failed:\n{done.stderr}")
            res = json.loads(done.stdout.strip().splitlines()[-1])
            times[v].append(res["images_per_s"])
            print(f"run {r + 1} {v:10s} {res['images']} images in {res['seconds']:.1f} s: "
                  f"{res['images_per_s']:.2f} images/s", flush=True)
    print(f"tiny EoMT, 200 queries, {a.task} at {a.size}, batched = batch {a.batch_size}, "
          f"{a.num_workers} workers, overlapped; medians of {a.repeats} interleaved runs:")
    for v, t in times.items():
        print(f"  {v:10s} {statistics.median(t):.2f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
