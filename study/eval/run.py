"""The evaluation loop: a model of the contract over a dataset of :class:`study.data.types.Sample`.

Panoptic and instance images go through the padded protocol, semantic images through the windowed one
(study/eval/inference.py); each prediction is post-processed (study/eval/postprocess.py) and scored
against the sample's own ground truth with the same code as ``study score`` (PQ, pycocotools AP, mIoU),
and optionally exported in the official formats.

Ground truth comes from the samples: panoptic segments with their ids, crowd flags and pixel areas (COCO's
JSON areas are pixel counts), semantic label maps from the per-class masks (pixels of no mask are
ignored). For instance AP the official JSON is used when the dataset names one on disk
(``info.extra['instances_json']``), because COCO's polygon areas decide the small/medium/large ranges;
otherwise the GT is built from the sample masks.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from study.data.types import DatasetInfo, Sample
from study.device import resolve_device, resolve_precision
from study.eval.coco_ap import encode_mask, evaluate_masks
from study.eval.config import EvalConfig
from study.eval.export import InstanceExporter, PanopticExporter, SemanticExporter
from study.eval.inference import run_padded, run_windowed
from study.eval.miou import ConfusionMatrix
from study.eval.postprocess import instance_topk, panoptic_merge
from study.eval.pq import PQAccumulator

TASKS = ("panoptic", "instance", "semantic")


def categories_of(info: DatasetInfo) -> list[dict]:
    """COCO-style category dicts (dataset ids) from a DatasetInfo."""
    return [{"id": int(cid), "name": name, "isthing": int(thing)}
            for cid, name, thing in zip(info.category_ids, info.class_names, info.is_thing)]


def _image_name(s: Sample) -> str:
    return f"{s.file_name or '?'} (id {s.image_id})"


def panoptic_ground_truth(s: Sample, info: DatasetInfo) -> tuple[np.ndarray, list[dict]]:
    """(H, W) segment ids and COCO ``segments_info`` (dataset category ids) of a panoptic sample."""
    n = len(s.labels)
    seg_ids = s.segment_ids.tolist() if s.segment_ids is not None else list(range(1, n + 1))
    if 0 in seg_ids or len(set(seg_ids)) != n:  # 0 would read as void: renumber
        seg_ids = list(range(1, n + 1))
    masks = s.masks.numpy()
    ids = np.zeros(masks.shape[1:], np.int64)
    segs = []
    for m, sid, lab, crowd in zip(masks, seg_ids, s.labels.tolist(), s.is_crowd.tolist()):
        ids[m] = sid
        segs.append({"id": int(sid), "category_id": int(info.category_ids[lab]), "iscrowd": int(crowd),
                     "area": int(m.sum())})
    return ids, segs


def semantic_ground_truth(s: Sample, ignore_index: int) -> np.ndarray:
    """(H, W) contiguous class map; pixels of no segment get ``ignore_index``."""
    h, w = s.image.shape[-2:]
    out = np.full((h, w), ignore_index, np.int64)
    for m, lab in zip(s.masks.numpy(), s.labels.tolist()):
        out[m] = lab
    return out


class _InstanceGT:
    """COCO instance GT dict built from samples (used when no official JSON is on disk)."""

    def __init__(self, info: DatasetInfo):
        self.gt = {"images": [], "annotations": [], "categories": categories_of(info)}
        self.info = info

    def add(self, s: Sample) -> None:
        h, w = s.image.shape[-2:]
        self.gt["images"].append({"id": s.image_id, "file_name": s.file_name, "height": h, "width": w})
        for m, lab, crowd in zip(s.masks.numpy(), s.labels.tolist(), s.is_crowd.tolist()):
            self.gt["annotations"].append({
                "id": len(self.gt["annotations"]) + 1, "image_id": s.image_id,
                "category_id": int(self.info.category_ids[lab]), "segmentation": encode_mask(m),
                "area": float(m.sum()), "iscrowd": int(crowd)})


def _official_instance_json(info: DatasetInfo) -> Optional[Path]:
    """The dataset's official instance JSON if it is a file on disk (not inside a zip)."""
    path = info.extra.get("instances_json")
    return Path(path) if path and Path(path).is_file() else None


def _official_instance_gt(path: Path, image_ids: list) -> dict:
    """The official GT restricted to the scored images."""
    gt = json.loads(path.read_text())
    keep = set(image_ids)
    gt["images"] = [im for im in gt["images"] if im["id"] in keep]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    return gt


def evaluate(model, dataset, task: str, settings: EvalConfig, input_size: int, progress: bool = True,
             masked: Optional[bool] = None) -> dict:
    """Run ``model`` over ``dataset`` (items :class:`Sample`, attribute ``info``) and score it.

    Returns the metrics (PQ summary, pycocotools stats, or mIoU summary) with ``task``, ``num_images``
    and, when ``settings.export_dir`` is set, the paths of the exported predictions.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    info: DatasetInfo = dataset.info
    if getattr(model, "num_classes", info.num_classes) != info.num_classes:
        raise ValueError(f"the model predicts {model.num_classes} classes but dataset '{info.name}' has "
                         f"{info.num_classes}; set model.num_classes to match")
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    model.to(device).eval()
    n = len(dataset) if settings.max_images is None else min(len(dataset), settings.max_images)
    cats = categories_of(info)
    export = settings.export_dir
    pq = PQAccumulator(cats) if task == "panoptic" else None
    cm = ConfusionMatrix(info.num_classes, info.ignore_index) if task == "semantic" else None
    official_json = _official_instance_json(info) if task == "instance" else None
    inst_gt, results, image_ids = _InstanceGT(info), [], []
    exporter = None
    if export and task == "panoptic":
        exporter = PanopticExporter(export)
    elif export and task == "instance":
        exporter = InstanceExporter(export)
    elif export:
        exporter = SemanticExporter(export)

    bar = tqdm(total=n, desc=f"eval {task}", unit="img", disable=not progress)
    for start in range(0, n, settings.batch_size):
        samples = [dataset[i] for i in range(start, min(n, start + settings.batch_size))]
        images = [s.image for s in samples]
        if task == "semantic":
            for s, logits in zip(samples, run_windowed(model, images, input_size, settings.batch_size,
                                                       masked, device, precision)):
                pred = logits.argmax(0).cpu().numpy()  # (H, W) contiguous classes
                cm.add(semantic_ground_truth(s, info.ignore_index), pred, image=_image_name(s))
                if exporter:
                    exporter.add(s.image_id, s.file_name, np.asarray(info.category_ids)[pred])
        else:
            for s, (masks, classes) in zip(samples, run_padded(model, images, input_size, masked, device,
                                                                    precision)):
                if task == "panoptic":
                    r = panoptic_merge(masks, classes, info.is_thing, settings.score_threshold,
                                       settings.overlap_threshold, settings.mask_threshold)
                    segs = [{"id": g["id"], "category_id": int(info.category_ids[g["label"]]),
                             "iscrowd": 0, "isthing": int(g["isthing"])} for g in r.segments]
                    ids = r.ids.cpu().numpy()
                    gt_ids, gt_segs = panoptic_ground_truth(s, info)
                    pq.add(gt_ids, gt_segs, ids, segs, image=_image_name(s))
                    if exporter:
                        exporter.add(s.image_id, s.file_name, ids, segs)
                else:
                    r = instance_topk(masks, classes, settings.top_k)
                    res = InstanceExporter.to_results(
                        s.image_id, r.masks.cpu().numpy(),
                        [info.category_ids[c] for c in r.labels.tolist()], r.scores.tolist())
                    results.extend(res)
                    if official_json is None:
                        inst_gt.add(s)
                    image_ids.append(s.image_id)
                    if exporter:
                        exporter.add(res)
        bar.update(len(samples))
    bar.close()

    out: dict = {"task": task, "dataset": info.name, "num_images": n, "input_size": input_size,
                 "device": str(device), "precision": precision}
    if task == "panoptic":
        out.update(pq.summary())
    elif task == "semantic":
        out.update(cm.summary())
    else:
        if official_json is not None:
            out["ground_truth"] = str(official_json)
            out.update(evaluate_masks(_official_instance_gt(official_json, image_ids), results))
        else:
            out["ground_truth"] = "sample masks"
            out.update(evaluate_masks(inst_gt.gt, results))
    if exporter is not None:
        path = exporter.finish(cats) if task == "panoptic" else exporter.finish() if task == "instance" else None
        out["exported"] = str(path) if path is not None else str(exporter.png_dir)
    return out
