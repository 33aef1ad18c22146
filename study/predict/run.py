"""One model on one image with the task's own inference and post-processing, and the official output formats.

The inference is the evaluation's (study/eval/inference.py): the padded protocol for panoptic and instance, the
windowed protocol for semantic; the post-processing too (study/eval/postprocess.py), with the thresholds of
the config's eval section (``--set eval.score_threshold=...`` changes them here as in ``study eval``).

Raw predictions, in the formats the official tools read (as ``study eval --export`` writes them):

- panoptic: ``panoptic_pred.json`` (COCO panoptic: ``images``, ``annotations`` with ``segments_info``,
  ``categories``) and id-encoded PNGs (id = R + 256 G + 256^2 B) in ``panoptic_pred/``;
- instance: ``instances_pred.json``, COCO results (``image_id``, ``category_id``, compressed-RLE
  ``segmentation``, ``score``), the top ``eval.top_k`` (query, class) pairs per image;
- semantic: ``semantic_pred/<image>.png``, one label PNG of dataset category ids.

An image's id is its file name's stem, as an integer when it is all digits (COCO's ``000000142238.jpg`` is
image 142238), so the files line up with COCO ground truth. Every file goes through study/io.py's guarded
writes: a file in the output folder that the suite did not write is never replaced.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from study.data.source import IMAGE_EXTENSIONS
from study.errors import UserError
from study.eval.export import InstanceExporter
from study.eval.inference import iter_windowed, padded_forward, windowed_forward
from study.eval.pq import id_to_rgb
from study.eval.postprocess import instance_topk_chunks, panoptic_merge_chunks
from study.io import atomic_write, atomic_write_json, refuse_foreign
from study.predict.models import Predictor


# ------------------------------------------------------------------------------------------------ images


def find_images(inputs: list[str]) -> list[Path]:
    """The image files named by ``inputs`` (files, or folders whose image files are taken, not recursively),
    in the order given (a folder's sorted by name). Missing paths, files whose header is no image format's and
    folders without images are UserErrors naming the path; two images with the same stem would write the same
    outputs and are refused."""
    images: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UserError(f"folder {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise UserError(f"image {path} does not exist")
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems and stems[p.stem] != p:
            raise UserError(f"images {stems[p.stem]} and {p} have the same name stem '{p.stem}', so their outputs "
                            "would overwrite each other; predict them in two runs with two --out folders")
        stems[p.stem] = p
    images = list(dict.fromkeys(images))
    for p in images:  # the headers now, so that a stray file stops the command before any model runs
        try:
            with Image.open(p):
                pass
        except UnidentifiedImageError:
            raise UserError(f"{p} is not an image (no image format recognised)") from None
        except OSError as e:
            raise UserError(f"image {p} cannot be read: {e}") from None
    return images


def load_image(path: Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB, turned upright by its EXIF orientation (photos from phones);
    a file that is not an image is a UserError naming it."""
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image (no image format recognised)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"image {path} cannot be read: {e}") from None


def image_id(path: Path) -> int | str:
    return int(path.stem) if path.stem.isdigit() else path.stem


# ------------------------------------------------------------------------------------------- prediction


@dataclass
class Segment:
    """One segment as the overlay draws it: a bool (H, W) mask, its contiguous class and its score."""

    mask: np.ndarray
    label: int
    score: float


@dataclass
class ImagePrediction:
    """One model's post-processed prediction on one image, raw (``ids`` + ``segments_info`` for panoptic,
    ``results`` for instance, ``labels`` for semantic) and as segments for the overlay."""

    task: str
    segments: list[Segment]
    ids: Optional[np.ndarray] = None  # panoptic: int64 (H, W) segment ids, 0 = void
    segments_info: list[dict] = field(default_factory=list)  # panoptic, dataset category ids
    results: list[dict] = field(default_factory=list)  # instance: COCO results
    labels: Optional[np.ndarray] = None  # semantic: (H, W) dataset category ids


def predict(p: Predictor, image: np.ndarray, ident, masked: Optional[bool] = None) -> ImagePrediction:
    """``p``'s prediction on ``image`` (uint8 (H, W, 3)), through the task's own protocol and post-processing."""
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    st = p.cfg.eval
    cat_ids = [c["id"] for c in p.categories]
    if p.task == "semantic":
        pred = windowed_forward(p.model, [tensor], p.input_size, st.batch_size, masked, p.device, p.precision)
        logits = next(iter_windowed(pred))  # (C, H, W)
        label = logits.argmax(0)
        # score of a class's region: the mean over its pixels of the class's share of the per-pixel logits
        # (each sum_q p_q(c) sigmoid(m_q) is >= 0; the shares of a pixel add up to 1)
        share = logits.gather(0, label[None])[0] / logits.sum(0).clamp_min(torch.finfo(logits.dtype).tiny)
        label, share = label.cpu().numpy(), share.float().cpu().numpy()
        segments = [Segment(label == c, int(c), float(share[label == c].mean())) for c in np.unique(label)]
        return ImagePrediction("semantic", segments, labels=np.asarray(cat_ids)[label])
    pred = padded_forward(p.model, [tensor], p.input_size, masked, p.device, p.precision)
    if p.task == "panoptic":
        r = panoptic_merge_chunks(pred.chunks(0, st.query_chunk), pred.classes(0), pred.out_hw[0], p.is_thing,
                                  st.score_threshold, st.overlap_threshold, st.mask_threshold)
        ids = r.ids.cpu().numpy()
        segments, info = [], []
        for g in r.segments:
            mask = ids == g["id"]
            segments.append(Segment(mask, g["label"], g["score"]))
            info.append({"id": g["id"], "category_id": cat_ids[g["label"]], "iscrowd": 0, "isthing": int(g["isthing"]),
                         "area": int(mask.sum()), "bbox": _bbox(mask), "score": round(float(g["score"]), 6)})
        return ImagePrediction("panoptic", segments, ids=ids, segments_info=info)
    r = instance_topk_chunks(pred.chunks(0, st.query_chunk), pred.classes(0), pred.out_hw[0], st.top_k)
    masks, labels, scores = r.masks.cpu().numpy(), r.labels.tolist(), r.scores.tolist()
    results = InstanceExporter.to_results(ident, masks, [cat_ids[c] for c in labels], scores)
    segments = [Segment(m, c, s) for m, c, s in zip(masks, labels, scores)]
    return ImagePrediction("instance", segments, results=results)


def _bbox(mask: np.ndarray) -> list[int]:
    """COCO [x, y, width, height] of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


# ------------------------------------------------------------------------------------------------ writing


def write_png(path: Path, image: np.ndarray | Image.Image) -> None:
    """A guarded, atomic PNG write (study/io.py) of an array or a PIL image."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    size = img.width * img.height * len(img.getbands())
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG", optimize=img.mode == "P"), lambda: size, guard=True)


class RawWriter:
    """A model's raw predictions in the official format of its task, in ``folder``."""

    def __init__(self, folder: Path, task: str, categories: list[dict]):
        self.folder, self.task, self.categories = Path(folder), task, categories
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.results: list[dict] = []

    @property
    def json_path(self) -> Optional[Path]:
        return {"panoptic": self.folder / "panoptic_pred.json",
                "instance": self.folder / "instances_pred.json"}.get(self.task)

    def png_path(self, stem: str) -> Optional[Path]:
        sub = {"panoptic": "panoptic_pred", "semantic": "semantic_pred"}.get(self.task)
        return self.folder / sub / f"{stem}.png" if sub else None

    def planned(self, stems: list[str]) -> list[Path]:
        """Every file this writer will write for images ``stems``."""
        paths = [self.png_path(s) for s in stems] + [self.json_path]
        return [p for p in paths if p is not None]

    def add(self, path: Path, ident, hw: tuple[int, int], pred: ImagePrediction) -> None:
        self.images.append({"id": ident, "file_name": path.name, "height": hw[0], "width": hw[1]})
        if self.task == "panoptic":
            write_png(self.png_path(path.stem), id_to_rgb(pred.ids))
            self.annotations.append({"image_id": ident, "file_name": f"{path.stem}.png",
                                     "segments_info": pred.segments_info})
        elif self.task == "instance":
            self.results.extend(pred.results)
        else:
            labels = pred.labels
            write_png(self.png_path(path.stem), labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16))

    def finish(self) -> list[Path]:
        """Write the JSON (panoptic, instance); returns the raw outputs' main paths."""
        if self.task == "panoptic":
            atomic_write_json(self.json_path, {"images": self.images, "annotations": self.annotations,
                                               "categories": self.categories}, guard=True)
            return [self.json_path, self.folder / "panoptic_pred"]
        if self.task == "instance":
            atomic_write_json(self.json_path, self.results, guard=True)
            return [self.json_path]
        return [self.folder / "semantic_pred"]


def check_outputs(paths: list[Path]) -> None:
    """Refuse before any work when an output path is taken by a file the suite did not write."""
    for path in paths:
        for parent in reversed(path.parents):
            if parent.exists() and not parent.is_dir():
                raise UserError(f"output {parent} is a file, not a folder; choose another --out")
        refuse_foreign(path)
