"""Metric protocols: ``standard`` (panopticapi's PQ, pycocotools' segm AP, mIoU over classes present) and
``official`` (the protocol of the code that produced the paper's numbers: torchmetrics' PanopticQuality,
MeanAveragePrecision and MulticlassJaccardIndex as the official EoMT Lightning module calls them).

A protocol is a definition; an engine (:mod:`study.eval.engines`) an implementation. The official protocol is
written here from its definition (torchmetrics is a test oracle only). What it changes (docs/scoring.md gives
each difference's size on the samples):

PQ (the official module's update, then ``compute()[:-1]`` and a plain mean):
- the mean runs over every class of the data set, a class without TP, FP or FN counting 0 (panopticapi
  leaves such classes out); Things and Stuff likewise over all thing / stuff classes;
- a ground-truth area is its pixel count (panopticapi takes the JSON ``area``);
- a stuff segment's crowd flag is the flag of the image's FIRST segment (the module indexes the crowd flags
  by instance id, and torchmetrics sets a stuff segment's instance id to 0);
- segments of one stuff class in one image are one segment (torchmetrics' colour is (class, 0) for stuff);
- unassigned prediction pixels are an extra stuff class (appended, then dropped), not void: they match
  nothing, and count as no class's false positive;
- the IoU is computed in float32 by torchmetrics (pixel counts are integer tensors; their quotient is
  float32), here in float64: per-class numbers agree to float32's rounding (about 1e-7).

AP (MeanAveragePrecision, iou_type segm, pycocotools backend):
- its IoU and recall thresholds are ``torch.linspace(...).tolist()``: float32 values (0.55 is 0.550000011...,
  and 20 of the 101 recall points differ from pycocotools' float64 ones), which moves AP itself;
- a ground-truth area is its mask's pixel count (COCO's JSON area is the polygon's), which moves the small /
  medium / large numbers; crowd flags as given.

mIoU (MulticlassJaccardIndex, average=None, then the mean): over all classes, an absent class counting 0:
:mod:`study.eval.miou`'s ``miou_all_classes``.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from study.eval.errors import SizeMismatchError

PROTOCOLS = ("standard", "official")
MATCH_IOU = 0.5  # torchmetrics PanopticQuality: a match needs IoU > 0.5
VOID_FRACTION = 0.5  # torchmetrics: an unmatched prediction mostly on void + same-class crowd is no FP


class OfficialPQ:
    """Per-class IoU sums and TP / FP / FN under the official protocol, over images.

    Args:
        categories: the data set's categories (``id``, ``isthing``), every one of them averaged over.
    """

    def __init__(self, categories: Iterable[dict]):
        self.categories = list(categories)
        self.index = {c["id"]: k for k, c in enumerate(self.categories)}
        self.is_thing = np.array([c.get("isthing", 1) == 1 for c in self.categories], bool)
        k = len(self.categories)
        self.iou, self.tp = np.zeros(k), np.zeros(k, np.int64)
        self.fp, self.fn = np.zeros(k, np.int64), np.zeros(k, np.int64)
        self.num_images = 0

    def _colours(self, segs: list[dict], gt: bool):
        """Segment ids (S,), colour index per segment (S,), per colour: class index and (GT) crowd flag.
        Stuff segments of one class share a colour; a GT stuff colour's crowd flag is segment 0's."""
        ids = np.array([s["id"] for s in segs], np.int64).reshape(-1)
        cls = np.array([self.index[s["category_id"]] for s in segs], np.int64).reshape(-1)
        key = {}
        colour = np.empty(len(segs), np.int64)
        for j, c in enumerate(cls.tolist()):
            k = (c, j) if self.is_thing[c] else (c, -1)
            colour[j] = key.setdefault(k, len(key))
        col_cls = np.empty(len(key), np.int64)
        col_cls[colour] = cls
        if not gt:
            return ids, colour, col_cls, None
        flags = [s.get("iscrowd", 0) == 1 for s in segs]
        col_crowd = np.zeros(len(key), bool)
        for j, c in enumerate(cls.tolist()):
            col_crowd[colour[j]] = flags[j] if self.is_thing[c] else flags[0]
        return ids, colour, col_cls, col_crowd

    def add(self, gt_ids: np.ndarray, gt_segments: list[dict], pred_ids: np.ndarray,
            pred_segments: list[dict], image: str = "?") -> None:
        """One image: (H, W) id maps (0 = void / unassigned) and their segments (JSON order)."""
        if gt_ids.shape != pred_ids.shape:
            raise SizeMismatchError(f"image {image}: prediction is {pred_ids.shape[::-1]} (WxH), ground truth "
                                    f"{gt_ids.shape[::-1]}")
        g_ids, g_col, g_cls, g_crowd = self._colours(gt_segments, True)
        p_ids, p_col, p_cls, _ = self._colours(pred_segments, False)
        ng, npr = g_cls.size, p_cls.size
        # Rows: GT colours, then void (pixels of no listed segment); columns: prediction colours, then
        # unassigned (the appended class).
        g_row = _lookup(gt_ids.reshape(-1), g_ids, g_col, ng)
        p_col_px = _lookup(pred_ids.reshape(-1), p_ids, p_col, npr)
        inter = np.bincount(g_row * (npr + 1) + p_col_px, minlength=(ng + 1) * (npr + 1)).reshape(ng + 1, npr + 1)
        t_area, p_area = inter[:ng].sum(1), inter[:, :npr].sum(0)
        cross, on_void = inter[:ng, :npr], inter[ng, :npr]
        present_t, present_p = t_area > 0, p_area > 0
        union = p_area[None, :] - on_void[None, :] + t_area[:, None] - cross
        ok = (g_cls[:, None] == p_cls[None, :]) & ~g_crowd[:, None] & (cross > 0)
        iou = np.divide(cross, union, out=np.zeros(cross.shape), where=ok)
        match = ok & (iou > MATCH_IOU)
        rows, cols = np.nonzero(match)
        np.add.at(self.tp, g_cls[rows], 1)
        np.add.at(self.iou, g_cls[rows], iou[rows, cols])
        unmatched_t = present_t & ~match.any(1)
        np.add.at(self.fn, g_cls[unmatched_t & ~g_crowd], 1)
        crowd_of = np.full(len(self.categories), -1, np.int64)  # the crowd colour per class (the last one)
        for t in np.nonzero(unmatched_t & g_crowd)[0]:
            crowd_of[g_cls[t]] = t
        r = crowd_of[p_cls]
        on_crowd = np.where(r >= 0, cross[np.maximum(r, 0), np.arange(npr)] if ng else 0, 0)
        ignored = (on_void + on_crowd) > VOID_FRACTION * p_area
        np.add.at(self.fp, p_cls[present_p & ~match.any(0) & ~ignored], 1)
        self.num_images += 1

    def merge(self, other: "OfficialPQ") -> None:
        for k in ("iou", "tp", "fp", "fn"):
            getattr(self, k).__iadd__(getattr(other, k))
        self.num_images += other.num_images

    def summary(self) -> dict:
        """All / Things / Stuff means over every class of the group (n = the group's size), per class."""
        tp, fp, fn = self.tp, self.fp, self.fn
        sq = np.divide(self.iou, tp, out=np.zeros_like(self.iou), where=tp > 0)
        denom = tp + 0.5 * fp + 0.5 * fn
        rq = np.divide(tp, denom, out=np.zeros_like(self.iou), where=denom > 0)
        pq = sq * rq
        out = {"protocol": "official"}
        for name, sel in (("All", np.ones_like(self.is_thing)), ("Things", self.is_thing),
                          ("Stuff", ~self.is_thing)):
            n = int(sel.sum())
            out[name] = {k: float(v[sel].mean()) if n else 0.0 for k, v in (("pq", pq), ("sq", sq), ("rq", rq))}
            out[name]["n"] = n
        out["per_class"] = {int(c["id"]): {"pq": float(pq[i]), "sq": float(sq[i]), "rq": float(rq[i]),
                                           "tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i]), "counted": True}
                            for i, c in enumerate(self.categories)}
        out["num_images"] = self.num_images
        return out


def _lookup(flat: np.ndarray, ids: np.ndarray, colour: np.ndarray, void: int) -> np.ndarray:
    """Pixel ids -> colour index; ids not listed (0 and unlisted) -> ``void``."""
    if ids.size == 0:
        return np.full(flat.shape, void, np.int64)
    order = np.argsort(ids)
    pos = np.minimum(np.searchsorted(ids[order], flat), ids.size - 1)
    hit = ids[order][pos] == flat
    return np.where(hit, colour[order][pos], void)


def official_pq_files(pairs: list, categories: list[dict], gt_dir, pred_dir, workers: int = 0) -> dict:
    """The official protocol's PQ of checked (GT, prediction) annotation pairs read from the PNG folders."""
    from pathlib import Path

    from study.eval.image_pool import accumulate
    from study.eval.pq_files import _image_name, read_id_png

    def one(pair, acc: OfficialPQ) -> None:
        g, p = pair
        name = _image_name(g)
        acc.add(read_id_png(Path(gt_dir) / g["file_name"], name, "ground-truth"), g["segments_info"],
                read_id_png(Path(pred_dir) / p["file_name"], name, "prediction"), p["segments_info"], name)

    return accumulate(pairs, one, lambda: OfficialPQ(categories), OfficialPQ.merge, workers).summary()


def official_ap_ground_truth(gt: dict) -> dict:
    """A prepared COCO ground truth with every area replaced by its mask's pixel count, as torchmetrics'
    MeanAveragePrecision builds its ground truth from masks."""
    from study.eval.coco_ap import segmentation_area

    images = {im["id"]: im for im in gt["images"]}
    anns = [{**a, "area": segmentation_area(a["segmentation"], images[a["image_id"]]["height"],
                                            images[a["image_id"]]["width"])} for a in gt["annotations"]]
    return {**gt, "annotations": anns}


def official_ap_thresholds() -> tuple[list[float], list[float]]:
    """torchmetrics MeanAveragePrecision's default IoU and recall thresholds: float32 ``torch.linspace``,
    made the same way (its float32 rounding is what differs from pycocotools' float64 ``np.linspace``)."""
    import torch

    return (torch.linspace(0.5, 0.95, round((0.95 - 0.5) / 0.05) + 1).tolist(),
            torch.linspace(0.0, 1.00, round(1.00 / 0.01) + 1).tolist())


def official_ap(gt: dict, results: list[dict], engine: str = "hotcoco", where: str = "the results") -> dict:
    """segm AP under the official protocol: a prepared GT with mask areas, torchmetrics' thresholds."""
    from study.eval.coco_ap import evaluate_masks

    out = evaluate_masks(official_ap_ground_truth(gt), results, prepared=True, where=where, engine=engine,
                         thresholds=official_ap_thresholds())
    out["protocol"] = "official"
    return out
