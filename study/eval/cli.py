"""``study score {panoptic,instance,semantic}`` (score official-format files) and ``study eval CONFIG``.

Each scorer prints the per-class table and the summary; ``--json PATH`` also writes the numbers. User
mistakes (missing files, inconsistent predictions, no trained weights) raise ``UserError``, which ``study``
prints as one line.
"""
from __future__ import annotations

import time
from pathlib import Path

from study.errors import UserError
from study.flags import add_set_flag, config_flag
from study.io import atomic_write_json


def _jsonable(result: dict) -> dict:
    out = dict(result)
    out.pop("categories", None)
    out.pop("summary", None)
    return out


def _write(args, result: dict) -> None:
    if args.json:
        atomic_write_json(args.json, _jsonable(result))
        print(f"wrote {args.json}")


# ------------------------------------------------------------------------------------------------ score


def score_panoptic(args) -> int:
    from study.eval.pq import format_table
    from study.eval.pq_files import score_panoptic_files

    t0 = time.perf_counter()
    result = score_panoptic_files(args.gt_json, args.pred_json, args.gt_dir, args.pred_dir, args.workers,
                                  args.categories, engine=args.engine)
    from study.eval.engines import describe

    result.update(describe(args.engine, "standard"))  # engine, its version, protocol
    result["seconds"] = time.perf_counter() - t0
    print(format_table(result, result["categories"], per_class=not args.no_per_class))
    print(f"{result['num_images']} images in {result['seconds']:.2f} s (engine {args.engine}, standard protocol: "
          f"panopticapi's)")
    if args.protocol == "official":
        result["official"] = _official_panoptic(args, result["categories"])
        print("\nthe paper's protocol (official EoMT code: torchmetrics PanopticQuality, mean over every class):")
        print(format_table(result["official"], result["categories"], per_class=False))
    _write(args, result)
    return 0


def _official_panoptic(args, categories: list[dict]) -> dict:
    from pathlib import Path

    from study.eval.pq_files import pair_annotations, read_json
    from study.eval.protocol import official_pq_files

    gt, pred = read_json(args.gt_json, "ground-truth JSON", dict), read_json(args.pred_json, "prediction JSON", dict)
    gt_dir = Path(args.gt_dir) if args.gt_dir else Path(str(args.gt_json)[:-len(".json")])
    pred_dir = Path(args.pred_dir) if args.pred_dir else Path(str(args.pred_json)[:-len(".json")])
    return official_pq_files(pair_annotations(gt, pred, str(args.gt_json), str(args.pred_json)), categories, gt_dir,
                             pred_dir, args.workers)


def score_instance(args) -> int:
    from study.eval.coco_ap import format_table, score_instance_files

    t0 = time.perf_counter()
    result = score_instance_files(args.gt_json, args.pred_json, engine=args.engine)
    from study.eval.engines import describe

    result.update(describe(args.engine, "standard"))  # engine, its version, protocol
    result["seconds"] = time.perf_counter() - t0
    print(format_table(result, result["categories"], per_class=not args.no_per_class))
    print(f"scored in {result['seconds']:.2f} s (engine {args.engine}, standard protocol: pycocotools')")
    if args.protocol == "official":
        from study.eval.coco_ap import prepare_ground_truth
        from study.eval.pq_files import read_json
        from study.eval.protocol import official_ap

        pred = read_json(args.pred_json, "prediction JSON", (dict, list))
        pred = pred["annotations"] if isinstance(pred, dict) else pred
        official = official_ap(prepare_ground_truth(read_json(args.gt_json, "ground-truth JSON", dict)), pred,
                               engine=args.engine, where=f"prediction JSON {args.pred_json}")
        official.pop("summary", None)
        result["official"] = official
        print("\nthe paper's protocol (official EoMT code: torchmetrics MeanAveragePrecision, segm):")
        print(format_table(official, [], per_class=False))
    _write(args, result)
    return 0


def score_semantic(args) -> int:
    from study.eval.miou import format_table, score_semantic_dirs

    result = score_semantic_dirs(args.gt_dir, args.pred_dir, args.num_classes, args.ignore_index,
                                 args.label_offset, args.pred_label_offset)
    names = Path(args.class_names).read_text().split("\n") if args.class_names else None
    result["reported"] = "miou_all_classes" if args.average == "all" else "miou"
    from study.eval.engines import describe

    result.update(describe("ours", "standard"))
    if args.protocol == "official":  # torchmetrics MulticlassJaccardIndex's mean over all classes, beside ours
        result["official"] = {"protocol": "official", "miou": result["miou_all_classes"]}
    print(format_table(result, [n.strip() for n in names] if names else None, per_class=not args.no_per_class))
    print(f"reported mIoU ({'all classes' if result['reported'] == 'miou_all_classes' else 'classes present'}): "
          f"{100 * result[result['reported']]:.2f}")
    if "official" in result:
        print(f"the paper's protocol (official EoMT code: MulticlassJaccardIndex, mean over all classes): "
              f"{100 * result['official']['miou']:.2f}")
    _write(args, result)
    return 0


# ------------------------------------------------------------------------------------------------- eval


def run_eval(args) -> int:
    """Evaluate trained weights (``--checkpoint``, else the configuration's run folder, else
    ``model.checkpoint``; never random weights) with study.eval.run.evaluate_run. Weights that lie in a run
    folder of the same configuration record their result there (``eval_<task>_<split>.json`` and
    ``metrics.json``), where ``study status`` and ``study collect`` read it; ``--json`` also writes it there.
    Recording into a run folder takes the run's writer lock (study/runs.py): refused while it trains."""
    from contextlib import nullcontext

    from study.config import load_config
    from study.eval.run import evaluate_run, run_weights
    from study.runs import RunDir

    cfg = load_config(args.config, args.overrides)
    weights = run_weights(cfg, args.checkpoint)
    run = RunDir.holding(weights)
    if run is not None and not run.belongs_to(cfg):
        if not args.json:
            raise UserError(f"checkpoint {weights} belongs to run folder {run.path}, of another configuration "
                            f"than {args.config}; evaluate it with {run.config}, or write the result elsewhere "
                            f"with --json")
        run = None
    masked = {"on": True, "off": False, None: None}[args.masked]
    with run.writing("eval") if run is not None else nullcontext():
        result = evaluate_run(cfg, weights, run, progress=not args.no_progress, masked=masked)
    _print_eval(result)
    if run is not None:
        subset = f" (a subset of the run's {result['subset_of']} images, kept apart from its full evaluation)" \
            if "subset_of" in result else ""
        print(f"recorded in {' and '.join(result['recorded_in'])}{subset}")
    if args.json or run is None:
        out = Path(args.json) if args.json else weights.parent / f"eval_{result['task']}_{result['split']}.json"
        atomic_write_json(out, result)
        print(f"wrote {out}")
    return 0


def _print_eval(result: dict) -> None:
    from study.eval import coco_ap, miou, pq

    cats = result["categories"]

    if result["task"] == "panoptic":
        print(pq.format_table(result, cats))
    elif result["task"] == "instance":
        print(coco_ap.format_table(result, cats))
    else:
        print(miou.format_table(result, [c["name"] for c in cats]))


# ------------------------------------------------------------------------------------------- argparse


def register(subparsers) -> None:
    """Add ``score`` (with panoptic / instance / semantic) and ``eval`` to the ``study`` command."""
    score = subparsers.add_parser("score", help="score predictions in the official formats",
                                  description="Score predictions stored in the official file formats.")
    kinds = score.add_subparsers(dest="kind", required=True, metavar="KIND")

    def common(p, engines=None):
        from study.eval.engines import DEFAULT_ENGINE

        if engines:
            p.add_argument("--engine", choices=engines, default=DEFAULT_ENGINE,
                           help=f"implementation that scores (default {DEFAULT_ENGINE}; all give the same numbers)")
        p.add_argument("--protocol", choices=("standard", "official"), default="standard",
                       help="official: also report the paper's protocol (the official EoMT code's torchmetrics "
                            "metrics; docs/scoring.md)")
        p.add_argument("--json", help="also write the numbers to this JSON file")
        p.add_argument("--no-per-class", action="store_true", help="print only the summary")

    p = kinds.add_parser("panoptic", help="PQ / SQ / RQ (panopticapi's rules) of COCO panoptic JSON + PNGs")
    p.add_argument("--gt-json", required=True)
    p.add_argument("--gt-dir", help="GT PNG folder (default: the GT JSON path without .json)")
    p.add_argument("--pred-json", required=True)
    p.add_argument("--pred-dir", help="prediction PNG folder (default: the prediction JSON path without .json)")
    p.add_argument("--categories", help="JSON with the categories, when the GT JSON does not hold them "
                                        "(e.g. panoptic_coco_categories.json)")
    p.add_argument("--workers", type=int, default=0, help="threads of the 'ours' engine and of the official "
                                                          "protocol (0: all cores)")
    common(p, ("hotcoco", "panopticapi", "ours"))
    p.set_defaults(func=score_panoptic)

    p = kinds.add_parser("instance", help="mask AP, pycocotools' protocol (12 summary numbers as 'stats')")
    p.add_argument("--gt-json", required=True, help="COCO instance ground truth")
    p.add_argument("--pred-json", required=True, help="COCO results: list of image_id, category_id, "
                                                      "segmentation (RLE), score")
    common(p, ("hotcoco", "pycocotools", "faster-coco-eval"))
    p.set_defaults(func=score_instance)

    p = kinds.add_parser("semantic", help="mIoU of label PNGs (classes present; ADE20K all-classes too)",
                         description="mIoU of label PNGs paired by relative path. ADE20K official files "
                                     "(0 = ignore, 1..150): --num-classes 150 --label-offset 1. CamVid "
                                     "(11 = void): --num-classes 11 --ignore-index 11.")
    p.add_argument("--gt-dir", required=True)
    p.add_argument("--pred-dir", required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--ignore-index", type=int, default=255, help="label value left out of scoring (255)")
    p.add_argument("--label-offset", type=int, default=0,
                   help="value v means class v - offset; values below it are ignored (ADE20K: 1)")
    p.add_argument("--pred-label-offset", type=int, default=None,
                   help="offset of the predictions if it differs from --label-offset")
    p.add_argument("--average", choices=("present", "all"), default="present",
                   help="the reported mean: over classes present (paper, mmseg) or all classes (ADE20K "
                        "official script); both are always written")
    p.add_argument("--class-names", help="text file with one class name per line")
    common(p)
    p.set_defaults(func=score_semantic)

    p = subparsers.add_parser("eval", help="run a model over a data set and score it",
                              description="Run the model a config describes over a data split (padded "
                                          "or windowed protocol), post-process, score, optionally export.")
    p.add_argument("config", help="YAML config")
    p.add_argument("--checkpoint", help="model checkpoint (ours, official EoMT or Hugging Face); default: the "
                                        "config's run folder's trained weights, else model.checkpoint")
    add_set_flag(p, "eval.max_images=50")
    config_flag(p, "--export", "eval.export_dir", type=str, metavar="DIR",
                help="write predictions in the official formats here")
    p.add_argument("--json", help="also write the result here (default: recorded in the run folder of the "
                                  "checkpoint, else beside it as eval_<task>_<split>.json)")
    config_flag(p, "--max-images", "eval.max_images", type=int, metavar="N", help="score only the first N images")
    config_flag(p, "--protocol", "eval.protocol", type=str, metavar="NAME",
                help="official: also report the paper's protocol (docs/scoring.md); eval.protocol")
    config_flag(p, "--engine", "eval.engine", type=str, metavar="NAME",
                help="segm AP engine: hotcoco (default), pycocotools, faster-coco-eval; eval.engine")
    p.add_argument("--masked", choices=("on", "off"), default=None,
                   help="masked attention at inference (default: the model variant's setting)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval)


def main(argv=None) -> int:
    """``python -m study.eval.cli score ...``: the scoring commands without the rest of ``study``'s imports."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m study.eval.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
