"""Benchmark: ``study score panoptic`` against the PNG-decode floor and panopticapi, on the same files.

    python -m study.eval.bench_score --sample DIR [--copies 100] [--repeats 5]

Builds a panoptic data set of ``2 x copies`` images from the COCO panoptic sample (each copy of a ground
truth PNG is its own image; each prediction is a different random perturbation: shifted, dropped,
relabelled segments and random blocks), writes it in the official format, then times

- the decode floor: every ground-truth and prediction PNG decoded to a numpy array
  (``np.asarray(Image.open(path))``, what panopticapi does per PNG) and nothing else, on 1 thread, on
  ``N`` threads and on ``N`` processes (``N`` = the cores this process may use), which also shows whether
  Pillow's decoding scales in threads (it releases the GIL); and, for reference, Pillow's decoding alone
  (``Image.load``, no numpy array) on ``N`` threads;
- panopticapi ``pq_compute`` as shipped (a ``multiprocessing.Pool`` of ``cpu_count()`` processes) and its
  per-process worker ``pq_compute_single_core`` alone (one core, no pool);
- ours (:func:`study.eval.pq_files.score_panoptic_files`, what ``study score panoptic`` runs) with 1
  thread and with ``N`` threads (``--workers 0``).

The variants run interleaved, ``repeats`` rounds with the order rotated each round, so that a change in the
machine's load touches all alike; the table gives wall-clock medians with min-max, each as a multiple of
the decode floor on as many cores (1 thread for the single-core rows, the faster of N threads / N processes
for the others), and the CPU seconds each spent (all threads and pool processes), as a multiple of the
floor's: on a machine shared with other jobs the CPU time shows the work where the wall time is noisy. Every scorer must give the same numbers (largest difference printed). Everyone reads the same
PNGs from the same (warm) page cache.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from study.eval.image_pool import default_workers
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


def _decode(path: Path) -> int:
    with Image.open(path) as im:
        return np.asarray(im).size


def _load(path: Path) -> int:
    with Image.open(path) as im:
        im.load()
        return im.width * im.height


def _decode_all(paths: list[Path]) -> int:
    return sum(_decode(p) for p in paths)


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of its waited-for children (pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _interleaved(runs: dict, repeats: int) -> dict:
    """name -> (list of wall seconds, list of CPU seconds, last result); round r runs the variants rotated
    by r. CPU seconds count the work whatever else shares the cores; wall seconds are what a user waits."""
    names = list(runs)
    out = {name: ([], [], None) for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            c0, t0 = _cpu_seconds(), time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # panopticapi prints per core
                result = runs[name]()
            wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            out[name] = (out[name][0] + [wall], out[name][1] + [cpu], result)
    return out


def _diff(ours: dict, theirs: dict) -> float:
    d = max(abs(ours[g][k] - theirs[g][k]) for g in ("All", "Things", "Stuff") for k in ("pq", "sq", "rq"))
    return max(d, max(abs(ours["per_class"][c][k] - r[k]) for c, r in theirs["per_class"].items()
                      for k in ("pq", "sq", "rq")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE,
                    help="a COCO panoptic sample folder (default: $STUDY_DATA/coco_panoptic_sample)")
    ap.add_argument("--copies", type=int, default=100, help="copies of each of the 2 sample images")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians, min-max)")
    args = ap.parse_args(argv)
    if args.sample is None or not (args.sample / "panoptic_examples.json").is_file():
        ap.error(f"no COCO panoptic sample at {args.sample}: pass --sample DIR or set STUDY_DATA")
    if args.copies < 1 or args.repeats < 1:
        ap.error("--copies and --repeats must be >= 1")
    from panopticapi import evaluation as pan  # the official evaluator (panopticapi-lite)

    cores = multiprocessing.cpu_count()  # what pq_compute uses
    n_ours = default_workers()  # what --workers 0 uses
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        gt_json, gt_dir, pred_json, pred_dir = build(args.sample, Path(tmp), args.copies)
        n = 2 * args.copies
        gt = json.loads(gt_json.read_text())
        preds = {a["image_id"]: a for a in json.loads(pred_json.read_text())["annotations"]}
        pairs = [(g, preds[g["image_id"]]) for g in gt["annotations"]]
        categories = {c["id"]: c for c in gt["categories"]}
        pngs = [d / a["file_name"] for g, p in pairs for d, a in ((gt_dir, g), (pred_dir, p))]

        def single_core():
            stat = pan.pq_compute_single_core(0, pairs, str(gt_dir), str(pred_dir), categories)
            return {name: stat.pq_average(categories, isthing=t)[0]
                    for name, t in (("All", None), ("Things", True), ("Stuff", False))} | {
                "per_class": stat.pq_average(categories, None)[1]}

        def floor_threads():
            with ThreadPoolExecutor(n_ours) as pool:
                return sum(pool.map(_decode, pngs))

        def floor_processes():
            with ProcessPoolExecutor(n_ours) as pool:
                return sum(pool.map(_decode_all, [pngs[i::n_ours] for i in range(n_ours)]))

        def load_threads():
            with ThreadPoolExecutor(n_ours) as pool:
                return sum(pool.map(_load, pngs))

        floor1, floor_t, floor_p = ("decode floor, 1 thread", f"decode floor, {n_ours} threads",
                                    f"decode floor, {n_ours} processes")
        load_t = f"(Image.load only, {n_ours} threads)"
        official, official1 = f"panopticapi pq_compute ({cores} processes)", "panopticapi single core (no pool)"
        ours1, ours_n = "ours, 1 thread", f"ours, {n_ours} threads (--workers 0)"
        runs = {
            floor1: lambda: _decode_all(pngs),
            floor_t: floor_threads,
            floor_p: floor_processes,
            load_t: load_threads,
            official: lambda: pan.pq_compute(str(gt_json), str(pred_json), str(gt_dir), str(pred_dir)),
            official1: single_core,
            ours1: lambda: score_panoptic_files(gt_json, pred_json, gt_dir, pred_dir, workers=1),
            ours_n: lambda: score_panoptic_files(gt_json, pred_json, gt_dir, pred_dir, workers=0),
        }
        timed = _interleaved(runs, args.repeats)
    load_after = os.getloadavg()
    med = {name: statistics.median(t) for name, (t, _, _) in timed.items()}
    cpu = {name: statistics.median(c) for name, (_, c, _) in timed.items()}
    floor_all = min(med[floor_t], med[floor_p])
    single = {floor1, official1, ours1}
    ref = timed[official][2]
    print(f"{n} images ({Path(args.sample).name} x {args.copies}, perturbed predictions; {2 * n} PNGs), "
          f"{cores} CPU cores ({n_ours} usable), load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after; medians of {args.repeats} interleaved rounds")
    print(f"{'scorer':40s} {'wall s':>6s} {'min-max':>11s} {'x floor':>7s} {'CPU s':>6s} {'x floor':>7s} "
          f"{'PQ':>7s} {'max |diff|':>10s}")
    for name, (times, _, res) in timed.items():
        pq, diff = (f"{100 * res['All']['pq']:7.3f}", f"{_diff(res, ref):10.2e}") if isinstance(res, dict) \
            else (f"{'':7s}", f"{'':10s}")
        wall_floor = med[floor1] if name in single else floor_all
        print(f"{name:40s} {med[name]:6.3f} {min(times):5.2f}-{max(times):5.2f} {med[name] / wall_floor:7.2f} "
              f"{cpu[name]:6.3f} {cpu[name] / cpu[floor1]:7.2f} {pq} {diff}")
    print(f"wall x floor: against the decode floor on as many cores (1 thread: {med[floor1]:.3f} s; all cores: "
          f"the faster of threads and processes, {floor_all:.3f} s); CPU x floor: against the decode floor's CPU "
          f"time on 1 thread ({cpu[floor1]:.3f} s)")
    print(f"ours on all cores: {med[ours_n] / floor_all:.2f}x the decode floor (CPU {cpu[ours_n] / cpu[floor1]:.2f}x), "
          f"{med[official] / med[ours_n]:.2f}x faster than pq_compute; ours on 1 thread: "
          f"{med[ours1] / med[floor1]:.2f}x the floor (CPU {cpu[ours1] / cpu[floor1]:.2f}x), "
          f"{med[official1] / med[ours1]:.2f}x faster than panopticapi's single core")
    print(f"{load_t}: Pillow's decoding without the copy into numpy, the strictest reference; ours on all "
          f"cores is {med[ours_n] / med[load_t]:.2f}x that (ours reads Pillow's pixel block through its Arrow "
          f"export, without that copy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
