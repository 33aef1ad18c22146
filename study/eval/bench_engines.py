"""Benchmark of the scoring engines, PQ and segm AP, in process and as whole processes, interleaved.

    python -m study.eval.bench_engines --data DIR [--copies 100] [--replicas 30] [--repeats 3]

PQ: the COCO panoptic sample, ``2 x copies`` images with perturbed predictions (study.eval.bench_score's
set). AP: coco_mini val replicated ``replicas`` times (79 images each), shifted GT masks as predictions, random
scores, 10 % relabelled. Rows: every engine in process (study.eval.engines through our checks), then whole
processes: ``python -m study.eval.cli score ...`` (ours, hotcoco by default) against a bare hotcoco process on
the same files. Medians and min-max of ``repeats`` rounds, the order rotated each round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The shared sample data folder (coco_panoptic_sample, coco_mini): --data, else $STUDY_DATA.
DATA = Path(os.environ["STUDY_DATA"]) if os.environ.get("STUDY_DATA") else None


def build_instance(out: Path, replicas: int, seed: int = 0, data: Path | None = None) -> tuple[Path, Path]:
    from pycocotools import mask as mu

    from study.eval.coco_ap import encode_mask, prepare_ground_truth

    data = data or DATA
    gt = prepare_ground_truth(json.loads((data / "coco_mini/annotations/instances_val2017.json").read_text()))
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    images, anns, res = [], [], []
    by_image = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for r in range(replicas):
        for im in gt["images"]:
            new_id = r * 1_000_000 + im["id"]
            images.append({**im, "id": new_id})
            h, w = im["height"], im["width"]
            for a in by_image.get(im["id"], []):
                anns.append({**a, "id": len(anns) + 1, "image_id": new_id})
                s = a["segmentation"]
                rle = mu.merge(mu.frPyObjects(s, h, w)) if isinstance(s, list) else (
                    mu.frPyObjects(s, h, w) if isinstance(s["counts"], list) else s)
                m = np.roll(mu.decode(rle).astype(bool), tuple(rng.integers(-5, 6, 2)), (0, 1))
                cat = a["category_id"] if rng.random() > 0.1 else int(rng.choice(cats))
                res.append({"image_id": new_id, "category_id": cat, "segmentation": encode_mask(m),
                            "score": float(rng.random())})
    gt_json, pred_json = out / "instances_gt.json", out / "instances_pred.json"
    gt_json.write_text(json.dumps({**gt, "images": images, "annotations": anns}))
    pred_json.write_text(json.dumps(res))
    return gt_json, pred_json


_HOTCOCO_PQ = ("import sys, json; from hotcoco import panoptic; ev = panoptic.PanopticEval(sys.argv[1], sys.argv[2], "
               "gt_folder=sys.argv[3], pred_folder=sys.argv[4]); ev.evaluate(); print(ev.results()['All'])")
_HOTCOCO_AP = ("import sys, hotcoco; g = hotcoco.COCO(sys.argv[1]); ev = hotcoco.COCOeval(g, g.load_res(sys.argv[2]), "
               "'segm'); ev.evaluate(); ev.accumulate(); ev.summarize()")


def _proc(args: list[str]):
    return lambda: subprocess.run([sys.executable, *args], check=True, capture_output=True)


def rounds(runs: dict, repeats: int) -> dict:
    names, out = list(runs), {n: [] for n in runs}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            runs[n]()
            out[n].append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=100)
    ap.add_argument("--replicas", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=DATA, help="the shared sample folder (default: $STUDY_DATA)")
    args = ap.parse_args(argv)
    if args.data is None or not (args.data / "coco_mini").is_dir():
        ap.error(f"no sample data at {args.data}: pass --data DIR or set STUDY_DATA")
    from study.eval.bench_score import build
    from study.eval.coco_ap import score_instance_files
    from study.eval.pq_files import score_panoptic_files

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gt_json, gt_dir, pred_json, pred_dir = build(args.data / "coco_panoptic_sample", tmp / "pq", args.copies)
        igt, ipred = build_instance(tmp, args.replicas, data=args.data)
        n_ap = len(json.loads(igt.read_text())["images"])
        pq = {f"PQ in process, {e}": (lambda e=e: score_panoptic_files(gt_json, pred_json, gt_dir, pred_dir, 0,
                                                                         engine=e))
              for e in ("hotcoco", "panopticapi", "ours")}
        pq["PQ whole process, study score panoptic"] = _proc(
            ["-m", "study.eval.cli", "score", "panoptic", "--gt-json", str(gt_json), "--pred-json", str(pred_json),
             "--no-per-class"])
        pq["PQ whole process, hotcoco alone"] = _proc(["-c", _HOTCOCO_PQ, str(gt_json), str(pred_json),
                                                       str(gt_dir), str(pred_dir)])
        apr = {f"AP in process, {e}": (lambda e=e: score_instance_files(igt, ipred, timeout_s=None, engine=e))
               for e in ("hotcoco", "pycocotools", "faster-coco-eval")}
        apr["AP whole process, study score instance"] = _proc(
            ["-m", "study.eval.cli", "score", "instance", "--gt-json", str(igt), "--pred-json", str(ipred),
             "--no-per-class"])
        apr["AP whole process, hotcoco alone"] = _proc(["-c", _HOTCOCO_AP, str(igt), str(ipred)])
        times = rounds({**pq, **apr}, args.repeats)
    print(f"PQ: {2 * args.copies} images; AP: {n_ap} images; medians of {args.repeats} interleaved rounds, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"| {'what':45s} | median s | min-max |")
    print(f"|{'-' * 47}|---------:|---------|")
    for name, t in times.items():
        print(f"| {name:45s} | {statistics.median(t):8.2f} | {min(t):.2f}-{max(t):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
