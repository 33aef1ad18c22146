"""Semantic segmentation: a confusion matrix over images, IoU per class, mIoU in two named conventions.

- ``miou`` (docs/paper.md section 7; mmseg, Mask2Former and EoMT): IoU averaged over the classes present, i.e.
  with a non-empty union (in the ground truth or the prediction); pixels labelled ``ignore_index`` are left
  out.
- ``miou_all_classes`` (the official ADE20K scene-parsing script): the sum of IoUs divided by the number of
  classes, so a class absent from both counts as 0 (3 ADE20K images scored against themselves give 0.100).

Label files may encode classes with an offset: ADE20K's PNGs hold 0 = ignore and 1..150 for classes
0..149 (``label_offset=1``: a value v means class v - 1 and values below the offset are ignored).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from study.eval.errors import EvalInputError, MissingPredictionError, SizeMismatchError, UnknownImageError
from study.eval.image_pool import accumulate, check_workers
from study.eval.pixel_runs import runs, weighted_counts

LABEL_MAX = 65535  # the largest value of a 16-bit label PNG


class ConfusionMatrix:
    """Accumulates (GT class, predicted class) pixel counts.

    Args:
        num_classes: C; GT values must be 0..C-1 or ``ignore_index``.
        ignore_index: GT value left out of scoring (255). A prediction holding it means "no class" and
            counts as a miss of the GT class.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise EvalInputError(f"num_classes (--num-classes) must be an integer >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # (C, C + 1): rows GT class, columns predicted class; column C = no prediction.
        self.matrix = np.zeros((num_classes, num_classes + 1), np.int64)
        self.num_images = 0

    def add(self, gt: np.ndarray, pred: np.ndarray, image: str = "?") -> None:
        """gt, pred: (H, W) integer class maps (contiguous ids, ``ignore_index`` for void)."""
        self.add_labels(gt, pred, image)

    def add_labels(self, gt: np.ndarray, pred: np.ndarray, image: str = "?", gt_offset: Optional[int] = None,
                   pred_offset: Optional[int] = None) -> None:
        """:meth:`add` of (H, W) maps, where a map with an offset holds raw label values decoded as
        :func:`decode_labels` does (None: already contiguous classes). The pixels are taken a run of equal
        (GT, prediction) values at a time (:func:`study.eval.pixel_runs.runs`): decoding, checks and the
        bincount see one value pair per run, weighted by its length."""
        if gt.shape != pred.shape:
            raise SizeMismatchError(f"image {image}: prediction is {pred.shape[-1]}x{pred.shape[-2]} (WxH), "
                                    f"ground truth is {gt.shape[-1]}x{gt.shape[-2]}")
        gt, pred = gt.reshape(-1), pred.reshape(-1)
        starts, lengths = runs(gt, pred)
        gt, pred = gt[starts].astype(np.int64), pred[starts].astype(np.int64)
        gt_raw, pred_raw = gt, pred  # the files' own values, named in errors (issue 28: 200, not 199)
        if gt_offset is not None:
            gt = decode_labels(gt, gt_offset, self.ignore_index)
        if pred_offset is not None:
            pred = decode_labels(pred, pred_offset, self.ignore_index)
        c = self.num_classes
        valid = gt != self.ignore_index
        bad = valid & ((gt < 0) | (gt >= c))
        if bad.any():
            raise EvalInputError(f"image {image}: ground truth holds value(s) {_values(gt_raw[bad], gt_offset)}, "
                                 f"{_range_text(c, gt_offset, self.ignore_index)}")
        none = pred == self.ignore_index
        bad = valid & ~none & ((pred < 0) | (pred >= c))
        if bad.any():
            raise EvalInputError(f"image {image}: prediction holds value(s) {_values(pred_raw[bad], pred_offset)}, "
                                 f"{_range_text(c, pred_offset, self.ignore_index)}")
        pred = np.where(none, c, pred)
        self.matrix += weighted_counts(gt[valid] * (c + 1) + pred[valid], lengths[valid],
                                       c * (c + 1)).reshape(c, c + 1)
        self.num_images += 1

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix
        self.num_images += other.num_images

    def summary(self) -> dict:
        """``miou`` (classes present), ``miou_all_classes`` (ADE20K official), pixel accuracy, per class."""
        m = self.matrix
        tp = np.diag(m[:, : self.num_classes]).astype(np.float64)  # (C,)
        gt_count = m.sum(1).astype(np.float64)
        pred_count = m[:, : self.num_classes].sum(0).astype(np.float64)
        union = gt_count + pred_count - tp
        present = union > 0
        iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
        acc = np.divide(tp, gt_count, out=np.zeros_like(tp), where=gt_count > 0)
        n = int(present.sum())
        return {
            "miou": float(iou[present].mean()) if n else 0.0,
            "miou_all_classes": float(iou.sum() / self.num_classes),
            "num_classes_present": n,
            "pixel_accuracy": float(tp.sum() / gt_count.sum()) if gt_count.sum() else 0.0,
            "mean_accuracy": float(acc[gt_count > 0].mean()) if (gt_count > 0).any() else 0.0,
            "per_class": {c: {"iou": float(iou[c]), "accuracy": float(acc[c]), "present": bool(present[c])}
                          for c in range(self.num_classes)},
            "num_images": self.num_images,
        }


def format_table(result: dict, class_names: Optional[list[str]] = None, per_class: bool = True) -> str:
    lines = []
    if per_class:
        lines.append(f"{'class':24s} {'IoU':>6s} {'Acc':>6s}")
        for c, r in result["per_class"].items():
            if r["present"]:
                name = class_names[c] if class_names and c < len(class_names) else str(c)
                lines.append(f"{name[:24]:24s} {100 * r['iou']:6.2f} {100 * r['accuracy']:6.2f}")
        lines.append("")
    lines.append(f"mIoU (classes present, {result['num_classes_present']}): {100 * result['miou']:.2f}")
    lines.append(f"mIoU (all classes, ADE20K official):  {100 * result['miou_all_classes']:.2f}")
    lines.append(f"pixel accuracy: {100 * result['pixel_accuracy']:.2f}")
    return "\n".join(lines)


def _values(raw: np.ndarray, offset: Optional[int]) -> str:
    """The file's values, and with an offset the classes they would be: '[200] (class 199)'."""
    v = np.unique(raw)[:5].tolist()
    return f"{v} (class {', '.join(str(x - offset) for x in v)})" if offset else str(v)


def _range_text(c: int, offset: Optional[int], ignore_index: int) -> str:
    """What a file's values may be: classes 0..C-1 stored as offset..offset+C-1, or the ignore index."""
    if not offset:
        return f"neither a class 0..{c - 1} nor the ignore index {ignore_index}"
    return (f"outside {offset}..{offset + c - 1} (classes 0..{c - 1} with --label-offset {offset}), values below "
            f"{offset} and the ignore index {ignore_index}")


def decode_labels(raw: np.ndarray, offset: int, ignore_index: int) -> np.ndarray:
    """Raw label values -> contiguous classes: v -> v - offset; the ignore value and values below the
    offset -> ``ignore_index``."""
    raw = raw.astype(np.int64)
    out = raw - offset
    return np.where((raw == ignore_index) | (out < 0), ignore_index, out)


def read_label_png(path: Path, image: str, what: str) -> np.ndarray:
    if not path.is_file():
        raise MissingPredictionError(f"image {image}: {what} {path} does not exist")
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise EvalInputError(f"image {image}: {what} {path} has mode {im.mode}; expected a "
                                     f"single-channel label PNG")
            return np.asarray(im)
    except OSError as e:
        raise EvalInputError(f"image {image}: cannot read {what} {path}: {e}") from None


def score_semantic_dirs(gt_dir: str | os.PathLike, pred_dir: str | os.PathLike, num_classes: int,
                        ignore_index: int = 255, label_offset: int = 0, pred_label_offset: Optional[int] = None,
                        suffix: str = ".png", workers: int = 0) -> dict:
    """mIoU of label PNGs in ``pred_dir`` against those in ``gt_dir``, paired by relative path.

    Every GT file needs a prediction of the same relative path; a prediction without GT is an error too
    (it usually means the wrong folder). ``label_offset`` applies to both unless ``pred_label_offset`` is
    given (ADE20K official files: 1 for both). ``workers``: threads reading and scoring images, 0 = all
    cores (:func:`study.eval.image_pool.accumulate`).
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    p_off = label_offset if pred_label_offset is None else pred_label_offset
    ConfusionMatrix(num_classes, ignore_index)  # checks num_classes
    check_workers(workers)
    if not 0 <= ignore_index <= LABEL_MAX:
        raise EvalInputError(f"ignore_index (--ignore-index) {ignore_index} is not a label value 0..{LABEL_MAX}")
    for off, flag in ((label_offset, "--label-offset"), (p_off, "--pred-label-offset")):
        top = LABEL_MAX - num_classes + 1
        if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off <= top:
            raise EvalInputError(f"{flag} {off!r} is out of range: with {num_classes} classes it must be 0..{top} "
                                 f"(label value v means class v - offset; ADE20K official files: 1)")
        if off <= ignore_index < off + num_classes:
            raise EvalInputError(f"{flag} {off}: the ignore index {ignore_index} falls on class "
                                 f"{ignore_index - off} of 0..{num_classes - 1}; change --ignore-index, "
                                 f"--label-offset or --num-classes")
    for d, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not d.is_dir():
            raise EvalInputError(f"{what} folder {d} does not exist")
    gts = sorted(p.relative_to(gt_dir) for p in gt_dir.rglob(f"*{suffix}"))
    if not gts:
        raise EvalInputError(f"no {suffix} label files in {gt_dir}")
    preds = {p.relative_to(pred_dir) for p in pred_dir.rglob(f"*{suffix}")}
    extra = sorted(preds - set(gts))
    if extra:
        raise UnknownImageError(f"prediction {pred_dir / extra[0]} has no ground truth in {gt_dir} "
                                f"({len(extra)} such file(s))")

    def one(rel: Path, cm: ConfusionMatrix) -> None:
        name = str(rel)
        cm.add_labels(read_label_png(gt_dir / rel, name, "ground truth"),
                      read_label_png(pred_dir / rel, name, "prediction"), name, label_offset, p_off)

    cm = accumulate(gts, one, lambda: ConfusionMatrix(num_classes, ignore_index), ConfusionMatrix.merge, workers)
    if cm.matrix.sum() == 0:
        raise EvalInputError(f"no ground-truth pixel in {gt_dir} is a class 0..{num_classes - 1} after "
                             f"--label-offset {label_offset} (all are the ignore index {ignore_index} or below the "
                             f"offset): the score would be meaningless; check --label-offset, --ignore-index and "
                             f"--num-classes")
    return cm.summary()
