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

One evaluator object per task (``EVALUATORS``: process a batch, summarise) holds that task's protocol,
post-processing, scoring and export. :func:`evaluate` runs one over a dataset; :func:`evaluate_run` is the
one way to evaluate a configuration's trained weights (``study eval``, the launcher's eval step, the training
benchmark), and records the result in the run folder (study/runs.py) in one format.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from study.config import Config, to_dict
from study.data.types import DatasetInfo, Sample
from study.device import resolve_device, resolve_precision
from study.errors import UserError
from study.eval.coco_ap import encode_mask, evaluate_masks, prepare_ground_truth
from study.eval.config import EvalConfig
from study.eval.export import InstanceExporter, PanopticExporter, SemanticExporter
from study.eval.inference import iter_windowed, padded_forward, windowed_forward
from study.eval.miou import ConfusionMatrix
from study.eval.postprocess import instance_topk_chunks, panoptic_merge_chunks
from study.eval.engines import describe
from study.eval.pq import PQAccumulator
from study.eval.pq_files import annotations_by_image, listed_but_not_drawn
from study.eval.protocol import OfficialPQ, official_ap
from study.io import atomic_write_json
from study.runs import RunDir, step_settings


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


class TaskEvaluator:
    """Scores one task: :meth:`forward` runs the model of the task's protocol on a batch of samples,
    :meth:`consume` post-processes that prediction and accumulates the scores (the evaluation loop runs it in
    another thread, beside the next batch's forward), :meth:`summarise` returns the metrics. One subclass per
    task (``EVALUATORS``)."""

    task: str

    def __init__(self, info: DatasetInfo, settings: EvalConfig):
        self.info, self.settings = info, settings
        self.categories = categories_of(info)

    def forward(self, model, samples: list[Sample], input_size: int, masked: Optional[bool], device,
                precision: str):
        return padded_forward(model, [s.image for s in samples], input_size, masked, device, precision)

    def consume(self, samples: list[Sample], pred) -> None:
        raise NotImplementedError

    def process(self, model, samples: list[Sample], input_size: int, masked: Optional[bool],
                device, precision: str) -> None:
        """:meth:`forward` then :meth:`consume`."""
        self.consume(samples, self.forward(model, samples, input_size, masked, device, precision))

    def summarise(self) -> dict:
        raise NotImplementedError


class PanopticEvaluator(TaskEvaluator):
    """Padded protocol, Mask2Former's merge, PQ (panopticapi's rules); exports COCO panoptic PNGs + JSON."""

    task = "panoptic"

    def __init__(self, info: DatasetInfo, settings: EvalConfig):
        super().__init__(info, settings)
        self.pq = PQAccumulator(self.categories)
        self.official = OfficialPQ(self.categories) if settings.protocol == "official" else None
        # The GT JSON read as `study score` reads it (crowd flags checked, listed segments the PNG lacks kept)
        # when it is a plain file; inside a zip the samples' own segments are scored.
        path = Path(str(info.extra.get("panoptic_json", "")))
        self.listed = annotations_by_image(path) if path.suffix == ".json" and path.is_file() else None
        self.exporter = PanopticExporter(settings.export_dir) if settings.export_dir else None

    def consume(self, samples, pred) -> None:
        st, info = self.settings, self.info
        for i, s in enumerate(samples):
            r = panoptic_merge_chunks(pred.chunks(i, st.query_chunk), pred.classes(i), pred.out_hw[i],
                                      info.is_thing, st.score_threshold, st.overlap_threshold, st.mask_threshold)
            segs = [{"id": g["id"], "category_id": int(info.category_ids[g["label"]]), "iscrowd": 0,
                     "isthing": int(g["isthing"])} for g in r.segments]
            ids = r.ids.cpu().numpy()
            gt_ids, gt_segs = panoptic_ground_truth(s, info)
            ann = self.listed.get(s.image_id) if self.listed is not None else None
            if ann is not None and s.segment_ids is not None and {g["id"] for g in gt_segs} <= \
                    {g["id"] for g in ann["segments_info"]}:
                js = {g["id"]: g for g in ann["segments_info"]}  # JSON areas, as panopticapi and score take them
                gt_segs = [{**g, "area": js[g["id"]].get("area", g["area"])} for g in gt_segs] + \
                    listed_but_not_drawn(ann, [g["id"] for g in gt_segs])
            self.pq.add(gt_ids, gt_segs, ids, segs, image=_image_name(s))
            if self.official is not None:
                self.official.add(gt_ids, gt_segs, ids, segs, image=_image_name(s))
            if self.exporter:
                self.exporter.add(s.image_id, s.file_name, ids, segs)

    def summarise(self) -> dict:
        # PQ streams through our accumulator (equal to panopticapi and hotcoco: tests/test_engines_parity.py);
        # hotcoco's PQ reads only JSON and PNG folders.
        out = {**self.pq.summary(), **describe("ours", "standard")}
        if self.official is not None:
            out["official"] = {k: v for k, v in self.official.summary().items() if k != "per_class"}
        if self.exporter:
            out["exported"] = str(self.exporter.finish(self.categories))
        return out


class InstanceEvaluator(TaskEvaluator):
    """Padded protocol, top-k (query, class) pairs, pycocotools mask AP; exports COCO results JSON."""

    task = "instance"

    def __init__(self, info: DatasetInfo, settings: EvalConfig):
        super().__init__(info, settings)
        self.official_json = _official_instance_json(info)
        self.gt = _InstanceGT(info)
        self.results: list[dict] = []
        self.image_ids: list = []
        self.exporter = InstanceExporter(settings.export_dir) if settings.export_dir else None

    def consume(self, samples, pred) -> None:
        st = self.settings
        for i, s in enumerate(samples):
            r = instance_topk_chunks(pred.chunks(i, st.query_chunk), pred.classes(i), pred.out_hw[i], st.top_k)
            res = InstanceExporter.to_results(s.image_id, r.masks.cpu().numpy(),
                                              [self.info.category_ids[c] for c in r.labels.tolist()],
                                              r.scores.tolist())
            self.results.extend(res)
            if self.official_json is None:
                self.gt.add(s)
            self.image_ids.append(s.image_id)
            if self.exporter:
                self.exporter.add(res)

    def summarise(self) -> dict:
        engine = self.settings.engine
        gt = _official_instance_gt(self.official_json, self.image_ids) if self.official_json is not None else self.gt.gt
        gt = prepare_ground_truth(gt)
        out = {"ground_truth": str(self.official_json) if self.official_json is not None else "sample masks",
               **evaluate_masks(gt, self.results, prepared=True, engine=engine), **describe(engine, "standard")}
        if self.settings.protocol == "official":
            official = official_ap(gt, self.results, engine=engine)
            out["official"] = {k: v for k, v in official.items() if k not in ("summary", "per_class")}
        if self.exporter:
            out["exported"] = str(self.exporter.finish())
        return out


class SemanticEvaluator(TaskEvaluator):
    """Windowed protocol, per-pixel argmax, mIoU; exports label PNGs (dataset ids)."""

    task = "semantic"

    def __init__(self, info: DatasetInfo, settings: EvalConfig):
        super().__init__(info, settings)
        self.cm = ConfusionMatrix(info.num_classes, info.ignore_index)
        self.exporter = SemanticExporter(settings.export_dir) if settings.export_dir else None

    def forward(self, model, samples, input_size, masked, device, precision):
        return windowed_forward(model, [s.image for s in samples], input_size, self.settings.batch_size, masked,
                                device, precision)

    def consume(self, samples, pred) -> None:
        for s, logits in zip(samples, iter_windowed(pred)):
            pred = logits.argmax(0).cpu().numpy()  # (H, W) contiguous classes
            self.cm.add(semantic_ground_truth(s, self.info.ignore_index), pred, image=_image_name(s))
            if self.exporter:
                self.exporter.add(s.image_id, s.file_name, np.asarray(self.info.category_ids)[pred])

    def summarise(self) -> dict:
        out = {**self.cm.summary(), **describe("ours", "standard")}
        if self.settings.protocol == "official":  # torchmetrics MulticlassJaccardIndex, mean over all classes
            out["official"] = {"protocol": "official", "miou": out["miou_all_classes"]}
        if self.exporter:  # one PNG per image, written as it goes
            out["exported"] = str(self.exporter.png_dir)
        return out


EVALUATORS: dict[str, type[TaskEvaluator]] = {e.task: e for e in (PanopticEvaluator, InstanceEvaluator,
                                                                   SemanticEvaluator)}
TASKS = tuple(EVALUATORS)


def evaluate(model, dataset, task: str, settings: EvalConfig, input_size: int, progress: bool = True,
             masked: Optional[bool] = None) -> dict:
    """Run ``model`` over ``dataset`` (items :class:`Sample`, attribute ``info``) and score it.

    Returns the metrics (PQ summary, pycocotools stats, or mIoU summary) with ``task``, ``dataset``,
    ``num_images``, ``input_size``, ``device``, ``precision``, ``categories`` and, when ``settings.export_dir`` is set, the path
    of the exported predictions (``exported``).
    """
    if task not in EVALUATORS:
        raise UserError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    info: DatasetInfo = dataset.info
    if getattr(model, "num_classes", info.num_classes) != info.num_classes:
        raise UserError(f"the model predicts {model.num_classes} classes but dataset '{info.name}' has "
                        f"{info.num_classes}; set model.num_classes to match")
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    model.to(device).eval()
    n = len(dataset) if settings.max_images is None else min(len(dataset), settings.max_images)
    evaluator = EVALUATORS[task](info, settings)
    bar = tqdm(total=n, desc=f"eval {task}", unit="img", disable=not progress)
    batches = _batches(dataset, n, settings)
    if settings.overlap:
        _overlapped(evaluator, batches, bar, model, input_size, masked, device, precision)
    else:
        for samples in batches:
            evaluator.process(model, samples, input_size, masked, device, precision)
            bar.update(len(samples))
    bar.close()
    out: dict = {"task": task, "dataset": info.name, "num_images": n, "input_size": input_size,
                 "device": str(device), "precision": precision}
    out.update(evaluator.summarise())
    out["categories"] = evaluator.categories  # dataset ids, names, thing flags: what per_class is keyed by
    return out


def _as_list(samples: list[Sample]) -> list[Sample]:
    return samples


def _batches(dataset, n: int, settings: EvalConfig):
    """The first ``n`` samples in order, ``eval.batch_size`` at a time; with ``eval.num_workers`` > 0 a
    DataLoader's worker processes read and decode them."""
    if settings.num_workers == 0:
        for start in range(0, n, settings.batch_size):
            yield [dataset[i] for i in range(start, min(n, start + settings.batch_size))]
        return
    subset = dataset if n == len(dataset) else torch.utils.data.Subset(dataset, range(n))
    yield from torch.utils.data.DataLoader(subset, batch_size=settings.batch_size, shuffle=False,
                                           num_workers=settings.num_workers, collate_fn=_as_list,
                                           prefetch_factor=2)


_DONE = object()


def _overlapped(evaluator: TaskEvaluator, batches, bar, model, input_size, masked, device, precision) -> None:
    """Batch i's post-processing and scoring (:meth:`TaskEvaluator.consume`, in a thread of its own, in order)
    run while the model runs batch i + 1: torch releases the GIL inside its operations. The queue holds at
    most ``eval.queue_size`` predictions; an error in either thread stops both and is raised here with its
    own traceback."""
    todo: queue.Queue = queue.Queue(maxsize=evaluator.settings.queue_size)
    failed: list[BaseException] = []
    stop = threading.Event()

    def consumer() -> None:
        while True:
            item = todo.get()
            if item is _DONE:
                return
            if failed:
                continue  # drain, so that the producer never blocks
            try:
                with torch.no_grad():
                    evaluator.consume(*item)
                bar.update(len(item[0]))
            except BaseException as e:  # re-raised in the calling thread below
                failed.append(e)
                stop.set()

    thread = threading.Thread(target=consumer, name="eval-consume", daemon=True)
    thread.start()
    try:
        for samples in batches:
            if stop.is_set():
                break
            todo.put((samples, evaluator.forward(model, samples, input_size, masked, device, precision)))
    finally:
        todo.put(_DONE)
        thread.join()
    if failed:
        raise failed[0]


def run_weights(cfg: Config, weights: str | Path | None = None) -> Path:
    """The trained weights to evaluate for ``cfg``: ``weights``, else the final weights of the configuration's
    run folder, else ``model.checkpoint``. Random weights are never scored: with none of these, a UserError."""
    if weights is None:
        run = RunDir.for_config(cfg)
        if run.final_weights.is_file():
            weights = run.final_weights
        elif cfg.model.checkpoint:
            weights = cfg.model.checkpoint
        else:
            raise UserError(f"no trained weights to evaluate: give --checkpoint, set model.checkpoint, or train "
                            f"the configuration first (its run folder {run.path} has no {run.final_weights.name})")
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"checkpoint {weights} does not exist")
    return weights


def trained_model(cfg: Config, weights: str | Path):
    """The model of ``cfg`` with ``weights`` loaded. The weights are the whole model, so nothing else is
    loaded first (``model.init_from``, the start of the training, would be read and overwritten, and fails
    where that file is gone), except the pretrained backbone of a ``model.delta_weights`` checkpoint, which
    holds only the difference to it (study/models/dinov3.py)."""
    from study.models.build import build_model
    from study.models.checkpoint import load_checkpoint

    delta = bool(cfg.model.delta_weights and cfg.model.checkpoint
                 and Path(weights).resolve() == Path(cfg.model.checkpoint).resolve())
    model = build_model(replace(cfg.model, checkpoint=None, pretrained=cfg.model.pretrained if delta else None,
                                init_from=None, reinit_class_head=False, delta_weights=False))
    load_checkpoint(model, weights, delta_weights=delta)
    return model


def evaluate_run(cfg: Config, weights: str | Path | None = None, run: RunDir | None = None,
                 progress: bool = True, masked: Optional[bool] = None) -> dict:
    """Evaluate the trained weights (:func:`run_weights`) of configuration ``cfg`` on ``eval.split`` (default
    ``data.val_split``) and, when ``run`` is given, record the result in that run folder
    (:meth:`RunDir.write_evaluation`: ``eval_<task>_<split>.json`` and ``metrics.json``'s ``eval``).

    The result is :func:`evaluate`'s, plus ``split``, ``weights``, ``seconds`` and ``settings`` (the eval
    section it ran with, and ``masked`` when the masking at inference was forced): one format wherever an
    evaluation is written.
    """
    from study.data import build_dataset

    weights = run_weights(cfg, weights)
    split = cfg.eval.split or cfg.data.val_split
    dataset = build_dataset(cfg.data, split, cfg.task)
    model = trained_model(cfg, weights)
    t0 = time.perf_counter()
    result = evaluate(model, dataset, cfg.task, cfg.eval, cfg.eval.input_size or cfg.model.img_size,
                      progress=progress, masked=masked)
    settings = step_settings("eval", to_dict(cfg))
    if masked is not None:
        settings["masked"] = masked
    result.update(split=split, weights=str(weights), seconds=round(time.perf_counter() - t0, 3),
                  settings=settings)
    if run is not None:
        full = _full_count(run, len(dataset))
        if result["num_images"] < full:  # a subset: recorded apart, the run's full evaluation stays
            path = run.path / f"eval_{result['task']}_{split}_first{result['num_images']}.json"
            result["subset_of"] = full
            atomic_write_json(path, result, guard=True)
            result["recorded_in"] = [str(path)]
        else:
            run.write_evaluation(result)
            result["recorded_in"] = [str(run.eval_file(result["task"], split)), str(run.metrics_file)]
    return result


def _full_count(run: RunDir, size: int) -> int:
    """The images of the run's own evaluation: its saved eval.max_images (all when unset) of ``size``."""
    limit = (run.saved_config().get("eval") or {}).get("max_images")
    return size if not isinstance(limit, int) or isinstance(limit, bool) else min(size, limit)
