"""Scoring engines: one interface, several implementations of the same standard protocol.

An engine is an implementation; a protocol is a definition (:mod:`study.eval.protocol`). Every engine here
computes the standard protocol (panopticapi's PQ, pycocotools' segm AP) and gives the same numbers (tests
hold them equal to 1e-9); they differ in speed and in what they can read.

- PQ (``PQ_ENGINES``): ``hotcoco`` (default; Rust, reads the JSON and the PNG folders itself),
  ``panopticapi`` (the official code, a process pool), ``ours`` (:class:`study.eval.pq.PQAccumulator`,
  numpy in threads).
- segm AP (``AP_ENGINES``): ``hotcoco`` (default), ``pycocotools`` (the official code, in a child process
  with a time limit), ``faster-coco-eval`` (C++; a benchmark row and a choice).

Our strict input checks run before any engine (:mod:`study.eval.pq_files`, :mod:`study.eval.strict`); the
checks that need pixels (a segment in the PNG but not in the JSON or the reverse, sizes, the PNG type) are
the engine's own where it names the file and the id (hotcoco does; its message is re-raised as our error,
with the file), or ours (``ours`` decodes the PNGs itself; panopticapi is given the same hotcoco-free
pixel checks through ``ours`` only when asked). Each result records ``engine`` and ``protocol``.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Optional

import numpy as np

from study.eval.errors import (EvalInputError, MissingPredictionError, SizeMismatchError, UnknownCategoryError,
                               UnknownSegmentError)

PQ_ENGINES = ("hotcoco", "panopticapi", "ours")
AP_ENGINES = ("hotcoco", "pycocotools", "faster-coco-eval")
DEFAULT_ENGINE = "hotcoco"  # issue 26: the fastest engine with the official numbers


def check_engine(engine: str, choices: tuple) -> str:
    if engine not in choices:
        from study.errors import UserError

        raise UserError(f"unknown scoring engine '{engine}' (--engine / eval.engine); choose one of "
                        f"{', '.join(choices)}")
    return engine


# ---------------------------------------------------------------------------------------------------- PQ


def _pq_result(groups: dict, per_class: dict, categories: list[dict], num_images: int) -> dict:
    """Our result format from an engine's groups ({name: {pq, sq, rq, n}}) and per-class counts
    ({cat_id: {tp, fp, fn, iou}}): per-class PQ / SQ / RQ recomputed from the counts in one formula
    (panopticapi's), so that every engine reports per class the same way."""
    out = {name: {k: float(groups[name][k]) for k in ("pq", "sq", "rq")} | {"n": int(groups[name]["n"])}
           for name in ("All", "Things", "Stuff")}
    pc = {}
    for c in categories:
        r = per_class.get(c["id"], {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0})
        tp, fp, fn, iou = int(r["tp"]), int(r["fp"]), int(r["fn"]), float(r["iou"])
        counted = tp + fp + fn > 0
        denom = tp + 0.5 * fp + 0.5 * fn
        pc[int(c["id"])] = {"pq": iou / denom if counted else 0.0, "sq": iou / tp if tp else 0.0,
                            "rq": tp / denom if counted else 0.0, "tp": tp, "fp": fp, "fn": fn,
                            "counted": counted}
    out["per_class"] = pc
    out["num_images"] = num_images
    return out


_HOTCOCO_IMAGE = re.compile(r"^image (\S+): ")


def _hotcoco_error(e: Exception, pred_where: str, gt_where: str, names: dict) -> EvalInputError:
    """hotcoco's ValueError / OSError as our error class, the image's file named beside its id."""
    text = str(e)
    m = _HOTCOCO_IMAGE.match(text)
    if m:
        key = m.group(1)
        name = names.get(key)
        text = f"image {name} (id {key}): {text[m.end():]}" if name else text
    where = f" (prediction {pred_where}, ground truth {gt_where})"
    if "is in the PNG but not in segments_info" in text or "is in segments_info but not in the mask" in text:
        return UnknownSegmentError(text + where)
    if " but the prediction is " in text:
        return SizeMismatchError(text + where)
    if "unknown category_id" in text:
        return UnknownCategoryError(text + where)
    if "no prediction for the image" in text:
        return MissingPredictionError(text + where)
    if "is Grayscale" in text or "encodes segment ids as RGB" in text:
        path = text.split("panoptic PNG ", 1)[-1].split(" is ", 1)[0]
        from study.eval.png_header import describe_png

        return EvalInputError(f"panoptic PNG {path} is {describe_png(Path(path))}; the COCO panoptic format "
                              f"needs 8-bit RGB, the segment id = R + 256 G + 256^2 B")
    return EvalInputError(f"scoring failed: {text}{where}")


def pq_hotcoco(gt: dict, pred: dict, gt_dir: Path, pred_dir: Path, categories: list[dict],
               gt_where: str = "the ground truth", pred_where: str = "the prediction") -> dict:
    """hotcoco's PanopticEval on checked dicts (no JSON parsed twice) and the PNG folders."""
    from hotcoco import panoptic

    gt = gt if gt.get("categories") is categories else {**gt, "categories": categories}
    names = {str(a["image_id"]): a["file_name"] for a in gt["annotations"]}
    try:
        ev = panoptic.PanopticEval(gt, pred, gt_folder=str(gt_dir), pred_folder=str(pred_dir))
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
        res = ev.results()
    except (ValueError, OSError) as e:
        raise _hotcoco_error(e, pred_where, gt_where, names) from None
    return _pq_result(res, res["per_class"], categories, len(gt["annotations"]))


def pq_panopticapi(gt_json: Path, pred_json: Path, gt_dir: Path, pred_dir: Path, categories: list[dict],
                   pairs: list) -> dict:
    """panopticapi's per-image worker over the pairs (its ``pq_compute`` minus the pool and the file
    reading, which needs the categories in the GT JSON)."""
    from panopticapi import evaluation as pan

    cats = {c["id"]: c for c in categories}
    where = f"(prediction {pred_json}, ground truth {gt_json})"
    try:  # panopticapi raises bare exceptions for pixel faults; each becomes our error naming the files
        with contextlib.redirect_stdout(io.StringIO()):
            stat = pan.pq_compute_single_core(0, pairs, str(gt_dir), str(pred_dir), cats)
    except KeyError as e:
        raise UnknownSegmentError(f"panopticapi: {e.args[0] if e.args else e} {where}") from None
    except OSError as e:
        raise EvalInputError(f"panopticapi could not read a panoptic PNG {where}: {e}") from None
    except ValueError as e:
        raise SizeMismatchError(f"panopticapi: a prediction PNG does not have its image's size {where}: {e}") from None
    with contextlib.redirect_stdout(io.StringIO()):
        groups = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            try:
                res, _ = stat.pq_average(cats, isthing=isthing)
            except ZeroDivisionError:  # a group with no counted class: panopticapi divides by 0 there
                res = {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
            groups[name] = res
    per_class = {c: {"tp": s.tp, "fp": s.fp, "fn": s.fn, "iou": s.iou} for c, s in stat.pq_per_cat.items()}
    return _pq_result(groups, per_class, categories, len(pairs))


# ---------------------------------------------------------------------------------------------------- AP

# pycocotools' 12 summary numbers, in the order of COCOeval.stats.
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def per_class_ap(precision: np.ndarray, cat_ids) -> dict:
    """AP per category (IoU 0.50:0.95, all areas, 100 detections) from COCOeval's precision array
    (T, R, K, A, M); NaN for a category without ground truth (-1 everywhere)."""
    precision = np.asarray(precision)
    out = {}
    for k, cat_id in enumerate(cat_ids):
        p = precision[:, :, k, 0, -1]
        out[int(cat_id)] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    return out


def _set_thresholds(params, thresholds, snake: bool) -> None:
    """(IoU thresholds, recall thresholds) into an engine's params (the official protocol's float32 ones)."""
    if thresholds is None:
        return
    iou, rec = thresholds
    if snake:
        params.iou_thrs, params.rec_thrs = list(iou), list(rec)
    else:
        params.iouThrs, params.recThrs = np.array(iou, np.float64), np.array(rec, np.float64)


def ap_hotcoco(gt: dict, results: list[dict], thresholds=None) -> dict:
    import hotcoco

    coco_gt = hotcoco.COCO(gt)
    coco_dt = coco_gt.load_res(results) if results else hotcoco.COCO({**gt, "annotations": []})
    ev = hotcoco.COCOeval(coco_gt, coco_dt, "segm")
    _set_thresholds(ev.params, thresholds, snake=True)
    return run_cocoeval(ev, "cat_ids")


def ap_faster_coco_eval(gt: dict, results: list[dict], thresholds=None) -> dict:
    import copy

    from faster_coco_eval import COCO, COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(copy.deepcopy(gt))
        coco_dt = coco_gt.loadRes(copy.deepcopy(results)) if results else COCO({**gt, "annotations": []})
    ev = COCOeval_faster(coco_gt, coco_dt, "segm")
    _set_thresholds(ev.params, thresholds, snake=False)
    return run_cocoeval(ev, "catIds")


def run_cocoeval(ev, cat_ids: str) -> dict:
    """Evaluate, accumulate and summarise a COCOeval of any engine (their summaries printed, kept as text):
    the 12 numbers, AP per class (``ev.params.<cat_ids>``: the engines spell it differently) and the text."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"stats": [float(s) for s in ev.stats[:12]],
            "per_class": per_class_ap(ev.eval["precision"], getattr(ev.params, cat_ids)), "summary": text.getvalue()}


def ap_engine(engine: str):
    """The function ``(prepared GT dict, checked results) -> {stats, per_class, summary}`` of an in-process
    engine; None for pycocotools, whose COCOeval lives in :mod:`study.eval.coco_ap` with its child process."""
    check_engine(engine, AP_ENGINES)
    return {"hotcoco": ap_hotcoco, "faster-coco-eval": ap_faster_coco_eval}.get(engine)


def describe(engine: str, protocol: str = "standard") -> dict:
    """What a metrics entry records about how it was scored."""
    from importlib.metadata import PackageNotFoundError, version

    dist = {"ours": "eomt-study"}.get(engine, engine)
    try:
        v = version(dist)
    except PackageNotFoundError:
        v = None
    return {"engine": engine, "engine_version": v, "protocol": protocol}
