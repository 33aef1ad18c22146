"""Predictions in the official formats, so that any official tool can re-score them.

- Panoptic: COCO panoptic JSON (``annotations`` with ``image_id``, ``file_name``, ``segments_info``) and
  id-encoded PNGs (id = R + 256 G + 256^2 B) in a folder beside it: what panopticapi's ``pq_compute``
  and ``study score panoptic`` read.
- Instance: COCO results JSON (a list of ``image_id``, ``category_id``, ``segmentation`` (compressed RLE),
  ``score``): what pycocotools' ``loadRes`` and ``study score instance`` read.
- Semantic: one single-channel label PNG per image holding dataset category ids (ADE20K: 1..150, the
  official submission format; CamVid: 0..10), named after the image.

Contiguous class ids of the model are mapped to dataset category ids through ``DatasetInfo.category_ids``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from study.eval.coco_ap import encode_mask
from study.eval.pq import id_to_rgb
from study.io import atomic_write_json, record_written, refuse_foreign


def claim_folder(folder: Path, *files: Path) -> None:
    """Refuse (UserError) when ``folder`` or one of ``files`` exists and the suite did not write it (issue 28:
    ``study eval --export DIR`` never replaces a user's file); then create ``folder`` and record it as ours,
    so that the PNGs written into it are the suite's."""
    for p in (folder, *files):
        refuse_foreign(p)
    folder.mkdir(parents=True, exist_ok=True)
    record_written(folder)


def image_stem(file_name: str, image_id) -> str:
    """The stem of the image's file name (sub-folders kept), or its id when the sample has no name."""
    return str(Path(file_name).with_suffix("")) if file_name else str(image_id)


class PanopticExporter:
    """Collects panoptic predictions; PNGs are written as they come, the JSON by :meth:`finish`."""

    def __init__(self, folder: str | Path, name: str = "panoptic_pred"):
        self.json_path = Path(folder) / f"{name}.json"
        self.png_dir = Path(folder) / name
        claim_folder(self.png_dir, self.json_path)
        self.annotations: list[dict] = []

    def add(self, image_id, file_name: str, ids: np.ndarray, segments: list[dict]) -> None:
        """ids (H, W) segment ids (0 = void); segments with ``id`` and ``category_id`` (dataset ids)."""
        png = image_stem(file_name, image_id) + ".png"
        (self.png_dir / png).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(id_to_rgb(ids)).save(self.png_dir / png)
        self.annotations.append({"image_id": image_id, "file_name": png, "segments_info": segments})

    def finish(self, categories: list[dict]) -> Path:
        atomic_write_json(self.json_path, {"annotations": self.annotations, "categories": categories}, guard=True)
        return self.json_path


class InstanceExporter:
    """Collects COCO results (RLE masks) and writes them as one JSON list."""

    def __init__(self, folder: str | Path, name: str = "instances_pred"):
        self.json_path = Path(folder) / f"{name}.json"
        refuse_foreign(self.json_path)  # before the evaluation, not after it
        self.results: list[dict] = []

    @staticmethod
    def to_results(image_id, masks: np.ndarray, category_ids: list[int], scores: list[float]) -> list[dict]:
        """masks bool (K, H, W) -> K COCO result dicts."""
        return [{"image_id": image_id, "category_id": int(c), "segmentation": encode_mask(m), "score": float(s)}
                for m, c, s in zip(masks, category_ids, scores)]

    def add(self, results: list[dict]) -> None:
        self.results.extend(results)

    def finish(self) -> Path:
        atomic_write_json(self.json_path, self.results, guard=True)
        return self.json_path


class SemanticExporter:
    """Writes one label PNG (dataset category ids) per image into a folder."""

    def __init__(self, folder: str | Path, name: str = "semantic_pred"):
        self.png_dir = Path(folder) / name
        claim_folder(self.png_dir)

    def add(self, image_id, file_name: str, labels: np.ndarray) -> Path:
        """labels (H, W) dataset category ids (< 65536; 8-bit PNG when < 256)."""
        path = self.png_dir / (Path(image_stem(file_name, image_id)).name + ".png")
        dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
        Image.fromarray(labels.astype(dtype)).save(path)
        return path
