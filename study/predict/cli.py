"""``study predict MODEL IMAGE_OR_DIR... --out DIR [--compare MODEL2 ...]``: overlays and raw predictions.

MODEL is a run folder, a YAML config, or CONFIG@WEIGHTS (weights of ours, of the official EoMT release or of
Hugging Face; study/predict/models.py). Written under ``--out``:

- one model: ``overlay/<image>.png`` (the image's size) and the raw prediction in the task's official format
  (study/predict/run.py: ``panoptic_pred.json`` + ``panoptic_pred/``, ``instances_pred.json``, or
  ``semantic_pred/``);
- with ``--compare``: the same per model in ``<model>/``, and ``compare/<image>.png`` with the models' overlays
  side by side.

The device is ``eval.device`` (study/device.py: CUDA when present, else the CPU), the thresholds are the eval
section's; both change with ``--set``. Nothing in ``--out`` that the suite did not write is replaced.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from typing import TYPE_CHECKING

from study.flags import add_set_flag

if TYPE_CHECKING:
    from study.predict.models import Predictor


def predict_images(predictors: list[Predictor], images: list[Path], out: Path, masked=None,
                   min_score: float = 0.5, progress: bool = True, palette: bool = False) -> dict:
    """Every model on every image; returns {"overlays": {label: [paths]}, "compare": [paths], "raw": {label:
    [paths]}}. Outputs are checked before any work (a foreign file ends the command before it starts).
    ``palette``: overlays as 256-colour PNGs (:func:`study.predict.overlay.to_palette`)."""
    # here, not at the top: every `study` command imports this module to list its flags (torch takes seconds)
    from tqdm import tqdm

    from study.predict.models import unique_labels
    from study.predict.overlay import draw_overlay, side_by_side, to_palette
    from study.predict.run import RawWriter, check_outputs, image_id, load_image, predict, write_png

    compare = len(predictors) > 1
    unique_labels(predictors)
    folders = {p.label: out / p.label if compare else out for p in predictors}
    writers = {p.label: RawWriter(folders[p.label], p.task, p.categories) for p in predictors}
    stems = [im.stem for im in images]
    planned = [folders[p.label] / "overlay" / f"{s}.png" for p in predictors for s in stems]
    planned += [f for w in writers.values() for f in w.planned(stems)]
    planned += [out / "compare" / f"{s}.png" for s in stems] if compare else []
    check_outputs(planned)
    done: dict = {"overlays": {p.label: [] for p in predictors}, "compare": [], "raw": {}}
    bar = tqdm(total=len(images) * len(predictors), desc="predict", unit="img", disable=not progress)
    for path in images:
        image = load_image(path)
        ident = image_id(path)
        panels, labels = [], []  # labels: the classes drawn so far on this image (exact colours of --palette)
        for p in predictors:
            pred = predict(p, image, ident, masked)
            writers[p.label].add(path, ident, image.shape[:2], pred)
            names = [c["name"] for c in p.categories]
            panel = draw_overlay(image, pred.segments, names, min_score if p.task == "instance" else None)
            target = folders[p.label] / "overlay" / f"{path.stem}.png"
            labels += [s.label for s in pred.segments]
            write_png(target, to_palette(panel, labels) if palette else panel)
            done["overlays"][p.label].append(target)
            panels.append(panel)
            bar.update(1)
        if compare:
            target = out / "compare" / f"{path.stem}.png"
            both = side_by_side(panels, [p.label for p in predictors])
            write_png(target, to_palette(both, labels) if palette else both)
            done["compare"].append(target)
    bar.close()
    done["raw"] = {label: w.finish() for label, w in writers.items()}
    return done


def run(args: argparse.Namespace) -> int:
    from study.predict.models import load_predictor
    from study.predict.run import find_images

    images = find_images(args.images)
    specs = [args.model] + list(args.compare or [])
    predictors = [load_predictor(args.model, args.overrides, args.checkpoint, args.categories)]
    predictors += [load_predictor(s, args.overrides, None, args.categories) for s in specs[1:]]
    masked = {"on": True, "off": False, None: None}[args.masked]
    done = predict_images(predictors, images, Path(args.out), masked, args.min_score, not args.no_progress,
                          args.palette)
    for p in predictors:
        print(f"{p.label}: {p.task}, {p.weights} on {p.device} ({p.precision}); {len(images)} image(s)")
        print(f"  overlays in {done['overlays'][p.label][0].parent}")
        print(f"  raw predictions: {', '.join(str(x) for x in done['raw'][p.label])}")
    if done["compare"]:
        print(f"side by side: {done['compare'][0].parent}")
    return 0


def register(subparsers) -> None:
    """Add ``predict`` to the ``study`` command."""
    p = subparsers.add_parser(
        "predict", help="predict your own images: overlays and official-format files",
        description="Run a trained model on your own images with the task's own inference and post-processing; "
                    "write an overlay PNG per image (coloured segments, class names and scores, a legend) and "
                    "the raw prediction in the official format of the task. MODEL: a run folder, a YAML config "
                    "(its run folder's weights, else model.checkpoint), or CONFIG@WEIGHTS (ours, official "
                    "EoMT or Hugging Face layout).")
    p.add_argument("model", metavar="MODEL", help="run folder, YAML config, or CONFIG@WEIGHTS")
    p.add_argument("images", metavar="IMAGE_OR_DIR", nargs="+", help="image files, or folders of images")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--compare", nargs="+", metavar="MODEL",
                   help="further models (same forms as MODEL), drawn side by side with the first")
    p.add_argument("--checkpoint", help="weights for MODEL when it is a config (same as CONFIG@WEIGHTS)")
    p.add_argument("--categories", metavar="JSON",
                   help="COCO categories JSON with the class names (e.g. panoptic_coco_categories.json); "
                        "default: the config's data set")
    p.add_argument("--min-score", type=float, default=0.5,
                   help="instance task: draw instances from this score up (the raw file keeps all top-k; "
                        "default 0.5)")
    p.add_argument("--masked", choices=("on", "off"), default=None,
                   help="masked attention at inference (default: the model variant's setting)")
    p.add_argument("--palette", action="store_true",
                   help="overlays as 256-colour PNGs (about 3x smaller; class colours exact, the photo approximated)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_set_flag(p, "eval.score_threshold=0.5")
    p.set_defaults(func=run)
