"""Peak memory of evaluating one 1280 x 1280 image with EoMT at 200 queries (issue 16, docs/paper.md section 7).

``python -m study.eval.bench_memory [--size 1280] [--queries 200] [--backbone tiny]`` runs each variant in a
fresh subprocess and prints its peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

- ``forward``: the model's forward alone (the floor every variant shares);
- ``whole``: the former path, every query of the batch upsampled at once to (B, Q, S, S), cropped, resized to
  (Q, H, W), then the panoptic merge on every query's full-size masks;
- ``chunked``: the evaluation loop's path, a chunk of ``eval.query_chunk`` queries upsampled and merged at a
  time (study/eval/inference.py, study/eval/postprocess.py).

The weights are random (memory does not depend on them); every score threshold is 0 so that every query is
kept and reaches the merge, the worst case. The backbone size only changes the forward's share.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from torch.nn import functional as F

VARIANTS = ("forward", "whole", "chunked")


def _child(variant: str, size: int, queries: int, backbone: str, chunk: int) -> dict:
    from study.config import load_config
    from study.eval.inference import padded_forward
    from study.eval.postprocess import panoptic_merge, panoptic_merge_chunks
    from study.models.build import build_model

    torch.manual_seed(0)
    cfg = load_config(None, [f"model.size={backbone}", f"model.img_size={size}", "model.num_classes=133",
                             f"model.num_queries={queries}"])
    model = build_model(cfg.model).eval()
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
    is_thing = [True] * 80 + [False] * 53
    with torch.no_grad():
        pred = padded_forward(model, [image], size)
        if variant == "whole":
            masks = F.interpolate(pred.mask_logits.float(), size=(size, size), mode="bilinear", align_corners=False)
            nh, nw = pred.kept[0]
            full = F.interpolate(masks[:1, :, :nh, :nw], size=(size, size), mode="bilinear", align_corners=False)[0]
            del masks
            r = panoptic_merge(full, pred.classes(0), is_thing, 0.0, 0.0, 0.5)
        elif variant == "chunked":
            r = panoptic_merge_chunks(pred.chunks(0, chunk), pred.classes(0), (size, size), is_thing, 0.0, 0.0, 0.5)
        else:
            r = None
    return {"variant": variant, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "segments": None if r is None else len(r.segments),
            "mask_logits": list(pred.mask_logits.shape)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m study.eval.bench_memory", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1280)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--query-chunk", type=int, default=32)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child, a.size, a.queries, a.backbone, a.query_chunk)))
        return 0
    print(f"EoMT ({a.backbone} backbone, random weights), one {a.size}x{a.size} image, {a.queries} queries, "
          f"panoptic merge with every query kept; peak RSS of a fresh process per variant")
    rows = {}
    for v in VARIANTS:
        out = subprocess.run([sys.executable, "-m", "study.eval.bench_memory", "--child", v, "--size", str(a.size),
                              "--queries", str(a.queries), "--backbone", a.backbone, "--query-chunk",
                              str(a.query_chunk)], capture_output=True, text=True, check=True)
        rows[v] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["forward"]["peak_mib"]
    for v in VARIANTS:
        r = rows[v]
        print(f"{v:8s} peak {r['peak_mib']:8.0f} MiB  (+{r['peak_mib'] - base:6.0f} MiB over the forward)"
              + (f"  segments {r['segments']}" if r["segments"] is not None else f"  mask logits {r['mask_logits']}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
