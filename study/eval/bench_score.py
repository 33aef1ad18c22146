"""Benchmark: ``study score panoptic`` against panopticapi's ``pq_compute`` on the same prediction files.

    python -m study.eval.bench_score [--sample DIR] [--copies 100] [--repeats 3]

Builds a panoptic data set of ``2 x copies`` images from the COCO panoptic sample (each copy of a ground
truth PNG is its own image; each prediction is a different random perturbation: shifted, dropped,
relabelled segments and random blocks), writes it in the official format, then times

- panopticapi ``pq_compute`` as shipped (a ``multiprocessing.Pool`` of ``cpu_count()`` processes),
- panopticapi's per-process worker ``pq_compute_single_core`` alone (one core, no pool),
- ours with 1 thread and with ``cpu_count()`` threads,

checks that all give the same numbers (largest difference printed) and prints the times side by side.
Everyone reads the same PNGs from the same (warm) page cache; the best of ``repeats`` runs is reported.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from study.eval.pq import id_to_rgb, rgb_to_id
from study.eval.pq_files import score_panoptic_files

# The sample folder: --sample, else $STUDY_DATA/coco_panoptic_sample (a COCO panoptic folder with
# panoptic_examples.json, panoptic_coco_categories.json and the PNGs).
DEFAULT_SAMPLE = Path(os.environ["STUDY_DATA"]) / "coco_panoptic_sample" if os.environ.get("STUDY_DATA") else None


def _perturb(ids: np.ndarray, segs: list[dict], cats: list[int], rng: np.random.Generator):
    """A random prediction derived from a GT id map: shift, drop, relabel, paint blocks."""
    m = np.roll(ids, tuple(rng.integers(-8, 9, size=2)), axis=(0, 1))
    segs = [{"id": s["id"], "category_id": s["category_id"]} for s in segs]
    for s in segs:
        r = rng.random()
        if r < 0.1:
            m[m == s["id"]] = 0
        elif r < 0.2:
            s["category_id"] = int(rng.choice(cats))
    for j in range(6):
        y, x = rng.integers(0, m.shape[0] - 20), rng.integers(0, m.shape[1] - 20)
        h, w = rng.integers(5, 100, size=2)
        m[y:y + h, x:x + w] = 60000 + j
        segs.append({"id": 60000 + j, "category_id": int(rng.choice(cats))})
    present = set(np.unique(m).tolist())
    return m, [s for s in segs if s["id"] in present]


def build(sample: Path, out: Path, copies: int, seed: int = 0) -> tuple[Path, Path, Path, Path]:
    """Write GT (JSON + PNGs) and predictions (JSON + PNGs) for 2 x ``copies`` images under ``out``."""
    gt = json.loads((sample / "panoptic_examples.json").read_text())
    cats = json.loads((sample / "panoptic_coco_categories.json").read_text())
    rng = np.random.default_rng(seed)
    gt_dir, pred_dir = out / "gt", out / "pred"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()
    gt_anns, pred_anns, images = [], [], []
    present_cats = sorted({s["category_id"] for a in gt["annotations"] for s in a["segments_info"]})
    for ann in gt["annotations"]:
        rgb = np.asarray(Image.open(sample / "panoptic_examples" / ann["file_name"]).convert("RGB"))
        ids = rgb_to_id(rgb)
        for k in range(copies):
            image_id = ann["image_id"] * 1000 + k
            name = f"{image_id:012d}.png"
            Image.fromarray(rgb).save(gt_dir / name)
            gt_anns.append({**ann, "image_id": image_id, "file_name": name})
            images.append({"id": image_id, "file_name": name.replace(".png", ".jpg"),
                           "height": rgb.shape[0], "width": rgb.shape[1]})
            m, segs = _perturb(ids, ann["segments_info"], present_cats, rng)
            Image.fromarray(id_to_rgb(m)).save(pred_dir / name)
            pred_anns.append({"image_id": image_id, "file_name": name, "segments_info": segs})
    gt_json, pred_json = out / "gt.json", out / "pred.json"
    gt_json.write_text(json.dumps({"images": images, "annotations": gt_anns, "categories": cats}))
    pred_json.write_text(json.dumps({"annotations": pred_anns}))
    return gt_json, gt_dir, pred_json, pred_dir


def _best(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # panopticapi prints per core
            result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def _diff(ours: dict, theirs: dict) -> float:
    d = max(abs(ours[g][k] - theirs[g][k]) for g in ("All", "Things", "Stuff") for k in ("pq", "sq", "rq"))
    return max(d, max(abs(ours["per_class"][c][k] - r[k]) for c, r in theirs["per_class"].items()
                      for k in ("pq", "sq", "rq")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE,
                    help="a COCO panoptic sample folder (default: $STUDY_DATA/coco_panoptic_sample)")
    ap.add_argument("--copies", type=int, default=100, help="copies of each of the 2 sample images")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.sample is None or not (args.sample / "panoptic_examples.json").is_file():
        ap.error(f"no COCO panoptic sample at {args.sample}: pass --sample DIR or set STUDY_DATA")
    from panopticapi import evaluation as pan  # the official evaluator (panopticapi-lite)

    cores = multiprocessing.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        gt_json, gt_dir, pred_json, pred_dir = build(args.sample, Path(tmp), args.copies)
        n = 2 * args.copies
        gt = json.loads(gt_json.read_text())
        preds = {a["image_id"]: a for a in json.loads(pred_json.read_text())["annotations"]}
        pairs = [(g, preds[g["image_id"]]) for g in gt["annotations"]]
        categories = {c["id"]: c for c in gt["categories"]}

        def single_core():
            stat = pan.pq_compute_single_core(0, pairs, str(gt_dir), str(pred_dir), categories)
            return {name: stat.pq_average(categories, isthing=t)[0]
                    for name, t in (("All", None), ("Things", True), ("Stuff", False))} | {
                "per_class": stat.pq_average(categories, None)[1]}

        runs = {
            f"panopticapi pq_compute ({cores} processes)":
                lambda: pan.pq_compute(str(gt_json), str(pred_json), str(gt_dir), str(pred_dir)),
            "panopticapi single core (no pool)": single_core,
            "ours, 1 thread": lambda: score_panoptic_files(gt_json, pred_json, gt_dir, pred_dir, workers=1),
            f"ours, {cores} threads": lambda: score_panoptic_files(gt_json, pred_json, gt_dir, pred_dir,
                                                                   workers=cores),
        }
        timed = {name: _best(fn, args.repeats) for name, fn in runs.items()}
    ref = timed[f"panopticapi pq_compute ({cores} processes)"][1]
    print(f"{n} images ({Path(args.sample).name} x {args.copies}, perturbed predictions), {cores} CPU cores, "
          f"best of {args.repeats}")
    print(f"{'scorer':40s} {'seconds':>8s} {'ms/image':>9s} {'PQ':>8s} {'max |diff|':>11s}")
    for name, (sec, res) in timed.items():
        print(f"{name:40s} {sec:8.3f} {1000 * sec / n:9.2f} {100 * res['All']['pq']:8.3f} {_diff(res, ref):11.2e}")
    t_off = timed[f"panopticapi pq_compute ({cores} processes)"][0]
    t_one = timed["panopticapi single core (no pool)"][0]
    print(f"speed-up, ours {cores} threads vs pq_compute {cores} processes: "
          f"{t_off / timed[f'ours, {cores} threads'][0]:.2f}x; ours 1 thread vs panopticapi single core: "
          f"{t_one / timed['ours, 1 thread'][0]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
