"""COCO panoptic and COCO instance readers: official JSON files, from folders or the official zips.

Official layout under the root (extracted)::

    train2017/, val2017/                                       images
    annotations/panoptic_{train,val}2017.json                  panoptic segments_info + categories
    annotations/panoptic_{train,val}2017/*.png                 id-encoded PNGs, id = R + 256 G + 256^2 B
    annotations/instances_{train,val}2017.json                 polygons / RLE

or the downloaded zips beside each other: ``train2017.zip``, ``val2017.zip``,
``panoptic_annotations_trainval2017.zip`` (the PNGs as a zip inside it), ``annotations_trainval2017.zip``.
Contiguous class ids follow the order of the JSON ``categories`` list sorted by id (133 panoptic classes,
80 instance classes), as in Mask2Former and EoMT.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from study.coco_format import crowd_flag
from study.data.rle import RLEError, check_segmentation, is_int
from study.data.source import (DataError, DataNotFoundError, Files, check_same_size, decode_image,
                               decode_png, fill, locate_folder, read_file)
from study.data.types import DatasetInfo, Sample


def coco_split(split: str) -> str:
    """'train' -> 'train2017'; a split that already names its year ('val2017') is kept."""
    return split if split[-4:].isdigit() else f"{split}2017"


def _load_json(root: Path, name: str, zips, top: type = dict) -> tuple[dict, str]:
    data, where = read_file(root, name, zips)
    try:
        js = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"annotation file {where} is not valid JSON: {e}") from None
    if not isinstance(js, top):
        want = "an object with 'images', 'annotations' and 'categories'" if top is dict else "a list"
        raise DataError(f"annotation file {where} holds a JSON {type(js).__name__}; expected {want}")
    return js, where


def _fields(obj, keys: dict, what: str, where: str) -> None:
    """``obj`` is a dict holding each of ``keys`` (name -> required type: int, str, list, dict or None = any)."""
    if not isinstance(obj, dict):
        raise DataError(f"{what} in {where} is a JSON {type(obj).__name__}, not an object")
    for key, kind in keys.items():
        if key not in obj:
            raise DataError(f"{what} in {where} lacks '{key}'")
        v = obj[key]
        ok = kind is None or (is_int(v) if kind is int else isinstance(v, kind))
        if not ok:
            raise DataError(f"{what} in {where}: '{key}' must be {'an integer' if kind is int else 'a ' + kind.__name__}"
                            f", got {v!r:.60}")


def _list(js: dict, key: str, where: str) -> list:
    v = js.get(key, [])
    if not isinstance(v, list):
        raise DataError(f"annotation file {where}: '{key}' must be a list, not a {type(v).__name__}")
    return v


def _categories(cats, where: str) -> tuple[dict[int, int], list[dict]]:
    """dataset category id -> contiguous id, and the categories sorted by id. Ids must be unique integers:
    a repeated id would give the model a class that no pixel can carry."""
    if not isinstance(cats, list) or not cats:
        raise DataError(f"annotation file {where} lists no categories")
    seen: dict[int, dict] = {}
    for i, c in enumerate(cats):
        _fields(c, {"id": int, "name": str}, f"category {i}", where)
        if c["id"] in seen:
            raise DataError(f"annotation file {where} lists category id {c['id']} twice ('{seen[c['id']]['name']}' "
                            f"and '{c['name']}'); each category needs its own id")
        seen[c["id"]] = c
    cats = sorted(cats, key=lambda c: c["id"])
    return {c["id"]: i for i, c in enumerate(cats)}, cats


def _images(js: dict, where: str) -> dict[int, dict]:
    images = {}
    for i, im in enumerate(_list(js, "images", where)):
        _fields(im, {"id": int, "file_name": str}, f"image entry {i}", where)
        if im["id"] in images:
            raise DataError(f"annotation file {where} lists image id {im['id']} twice ({images[im['id']]['file_name']}"
                            f" and {im['file_name']})")
        images[im["id"]] = im
    if not images:
        raise DataError(f"annotation file {where} lists no images: the data set is empty")
    return images


def _check_file(files: Files, name: str, what: str, ann_where: str) -> None:
    if name not in files.names():
        raise DataNotFoundError(f"{what} {files.where(name)} named in {ann_where} does not exist")


class CocoPanoptic(Dataset):
    """COCO panoptic: one segment per ``segments_info`` entry (things and stuff), crowd flags kept."""

    def __init__(self, root: str | Path, split: str, image_dir: Optional[str] = None,
                 ann_file: Optional[str] = None, ann_dir: Optional[str] = None, drop_empty: bool = False,
                 name: str = "coco_panoptic"):
        root = Path(root)
        s = coco_split(split)
        json_name = fill(ann_file, s, f"annotations/panoptic_{s}.json")
        png_dir = fill(ann_dir, s, f"annotations/panoptic_{s}")
        if ann_dir is None and not (root / png_dir).is_dir() and (root / f"panoptic_{s}").is_dir():
            png_dir = f"panoptic_{s}"  # detectron2 / Mask2Former keep the PNG folder beside annotations/
        ann_zip = "panoptic_annotations_trainval2017.zip"
        js, self.json_where = _load_json(root, json_name, [(ann_zip, f"annotations/panoptic_{s}.json")])
        self.images = locate_folder(root, fill(image_dir, s, s), [(f"{s}.zip", s)])
        self.pngs = locate_folder(root, png_dir, [(ann_zip, f"annotations/panoptic_{s}.zip", f"panoptic_{s}")])
        cats, cat_where = js.get("categories"), self.json_where
        sidecar = (root / json_name).parent / "panoptic_coco_categories.json"
        if "categories" not in js and sidecar.is_file():  # some sample JSONs keep the categories beside them
            cats, cat_where = _load_json(sidecar.parent, sidecar.name, [], top=list)
        self.cat_to_contig, cats = _categories(cats, cat_where)
        images = _images(js, self.json_where)

        self.entries = []
        seen_images: set = set()
        for k, ann in enumerate(_list(js, "annotations", self.json_where)):
            _fields(ann, {"image_id": int, "file_name": str, "segments_info": list}, f"annotation {k}",
                    self.json_where)
            im = images.get(ann["image_id"])
            if im is None:
                raise DataError(f"annotation for image id {ann['image_id']} in {self.json_where} names an image "
                                f"absent from its 'images' list")
            if ann["image_id"] in seen_images:
                raise DataError(f"{self.json_where} has two annotations for image id {ann['image_id']} "
                                f"({im['file_name']}); each image needs exactly one")
            seen_images.add(ann["image_id"])
            seg_ids: set = set()
            for j, seg in enumerate(ann["segments_info"]):
                _fields(seg, {"id": int, "category_id": int}, f"segment {j} of image id {ann['image_id']}",
                        self.json_where)
                if seg["id"] in seg_ids:
                    raise DataError(f"image id {ann['image_id']} ({im['file_name']}) in {self.json_where} lists "
                                    f"segment id {seg['id']} twice")
                seg_ids.add(seg["id"])
                if seg["category_id"] not in self.cat_to_contig:
                    raise DataError(f"segment {seg['id']} of image {im['file_name']} in {self.json_where} has "
                                    f"category id {seg['category_id']}, absent from the categories")
            _check_file(self.images, im["file_name"], "image", self.json_where)
            _check_file(self.pngs, ann["file_name"], "panoptic PNG", self.json_where)
            crowds = [crowd_flag(s, f"segment {s.get('id')} of image {im['file_name']} in {self.json_where}",
                                 DataError) for s in ann["segments_info"]]
            if drop_empty and all(crowds):
                continue
            self.entries.append((im, ann))
        if not self.entries:
            raise DataError(f"no annotated images in {self.json_where}: the data set is empty")

        self.info = DatasetInfo(
            name=name, num_classes=len(cats), class_names=[c["name"] for c in cats],
            category_ids=[c["id"] for c in cats], is_thing=[bool(c.get("isthing", 1)) for c in cats],
            extra={"panoptic_json": self.json_where, "panoptic_dir": self.pngs.where(),
                   "categories": cats})

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample:
        im, ann = self.entries[index]
        image = decode_image(self.images.read(im["file_name"]), self.images.where(im["file_name"]))
        png_where = self.pngs.where(ann["file_name"])
        rgb = decode_png(self.pngs.read(ann["file_name"]), png_where, channels=3).astype(np.int64)
        check_same_size(image, rgb, self.images.where(im["file_name"]), png_where)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]  # (H, W) segment id, 0 = void

        segs = ann["segments_info"]
        known = {s["id"] for s in segs}
        unknown = set(np.unique(ids).tolist()) - known - {0}
        if unknown:
            raise DataError(f"panoptic PNG {png_where} holds segment ids {sorted(unknown)[:5]} that "
                            f"{self.json_where} does not list for image {im['file_name']}")
        masks, labels, crowd, seg_ids = [], [], [], []
        for s in segs:
            m = ids == s["id"]
            if not m.any():  # listed but not drawn: nothing to learn from, nothing to score
                continue
            masks.append(m)
            labels.append(self.cat_to_contig[s["category_id"]])
            crowd.append(crowd_flag(s, "segment", DataError))  # checked when the set was opened
            seg_ids.append(s["id"])
        return _sample(image, masks, labels, crowd, seg_ids, im)


class CocoInstance(Dataset):
    """COCO instance: polygons (merged per object) and RLE (crowd) decoded to binary masks."""

    def __init__(self, root: str | Path, split: str, image_dir: Optional[str] = None,
                 ann_file: Optional[str] = None, drop_empty: bool = False, name: str = "coco_instance"):
        root = Path(root)
        s = coco_split(split)
        json_name = fill(ann_file, s, f"annotations/instances_{s}.json")
        js, self.json_where = _load_json(root, json_name,
                                         [("annotations_trainval2017.zip", f"annotations/instances_{s}.json")])
        self.images = locate_folder(root, fill(image_dir, s, s), [(f"{s}.zip", s)])
        self.cat_to_contig, cats = _categories(js.get("categories"), self.json_where)
        images = _images(js, self.json_where)

        per_image = defaultdict(list)
        for k, a in enumerate(_list(js, "annotations", self.json_where)):
            _fields(a, {"id": None, "image_id": int, "category_id": int, "segmentation": None},
                    f"annotation {k}", self.json_where)
            if a["image_id"] not in images:
                raise DataError(f"annotation {a['id']} in {self.json_where} names image id {a['image_id']}, "
                                f"absent from its 'images' list")
            if a["category_id"] not in self.cat_to_contig:
                raise DataError(f"annotation {a['id']} (image id {a['image_id']}) in {self.json_where} has "
                                f"category id {a['category_id']}, absent from the categories")
            im = images[a["image_id"]]
            try:
                check_segmentation(a["segmentation"], im.get("height"), im.get("width"), values=False) \
                    if "height" in im and "width" in im else check_segmentation(a["segmentation"], values=False)
            except RLEError as e:
                raise DataError(f"annotation {a['id']} (image id {a['image_id']}, {im['file_name']}) in "
                                f"{self.json_where}: 'segmentation' is malformed: {e}") from None
            per_image[a["image_id"]].append(a)
        self.entries = []
        for image_id, im in sorted(images.items()):
            _check_file(self.images, im["file_name"], "image", self.json_where)
            anns = per_image.get(image_id, [])
            crowds = [crowd_flag(a, f"annotation {a.get('id')} of image {im['file_name']} in {self.json_where}",
                                 DataError) for a in anns]
            if drop_empty and all(crowds):
                continue
            self.entries.append((im, anns))
        if not self.entries:
            raise DataError(f"no images with annotations in {self.json_where}: the data set is empty")

        self.info = DatasetInfo(
            name=name, num_classes=len(cats), class_names=[c["name"] for c in cats],
            category_ids=[c["id"] for c in cats], is_thing=[True] * len(cats),
            extra={"instances_json": self.json_where, "categories": cats})

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample:
        im, anns = self.entries[index]
        image = decode_image(self.images.read(im["file_name"]), self.images.where(im["file_name"]))
        h, w = image.shape[1:]
        if (im.get("height", h), im.get("width", w)) != (h, w):
            raise DataError(f"image {self.images.where(im['file_name'])} is {w}x{h} but {self.json_where} "
                            f"says {im.get('width')}x{im.get('height')}")
        masks, labels, crowd, seg_ids = [], [], [], []
        for a in anns:
            m = decode_segmentation(a["segmentation"], h, w, f"annotation {a['id']} in {self.json_where}")
            if not m.any():  # degenerate polygon: no pixel to learn from
                continue
            masks.append(m)
            labels.append(self.cat_to_contig[a["category_id"]])
            crowd.append(crowd_flag(a, "annotation", DataError))  # checked when the set was opened
            seg_ids.append(a["id"])
        return _sample(image, masks, labels, crowd, seg_ids, im)


def decode_segmentation(seg, h: int, w: int, what: str) -> np.ndarray:
    """COCO segmentation (polygon list, uncompressed or compressed RLE) -> bool (H, W)."""
    try:
        if isinstance(seg, list):  # polygons of one object: rasterise each, then take the union
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE (crowd)
            rle = mask_utils.frPyObjects(seg, h, w)
        elif isinstance(seg, dict):
            rle = dict(seg)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode()
        else:
            raise TypeError(f"unsupported segmentation type {type(seg).__name__}")
        m = mask_utils.decode(rle)
    except Exception as e:  # pycocotools raises plain Exception on bad input
        raise DataError(f"cannot decode the segmentation of {what}: {e}") from None
    if m.shape[:2] != (h, w):
        raise DataError(f"segmentation of {what} is {m.shape[1]}x{m.shape[0]}, the image is {w}x{h}")
    return m.astype(bool)


def _sample(image, masks, labels, crowd, seg_ids, im) -> Sample:
    h, w = image.shape[1:]
    return Sample(
        image=image,
        masks=torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.bool),
        labels=torch.tensor(labels, dtype=torch.int64),
        is_crowd=torch.tensor(crowd, dtype=torch.bool),
        image_id=im["id"], file_name=im["file_name"],
        segment_ids=torch.tensor(seg_ids, dtype=torch.int64))


# ------------------------------------------------------------------------------------- ADE20K panoptic

# ADE20K panoptic in the COCO panoptic format, as Mask2Former's conversion (datasets/prepare_ade20k_pan_seg.py)
# writes it under ADEChallengeData2016/: ade20k_panoptic_{train,val}.json, the PNGs in ade20k_panoptic_{train,val}/
# and the images in images/{training,validation}/. 150 categories: 100 things and 50 stuff; the stuff classes
# by contiguous id (sorted category ids) are the official EoMT ADE20K panoptic configs' ``stuff_classes``.
ADE_PANOPTIC_NUM_CLASSES = 150
ADE_PANOPTIC_STUFF = (0, 1, 2, 3, 4, 5, 6, 9, 11, 13, 16, 17, 21, 25, 26, 28, 29, 34, 40, 46, 48, 51, 52, 54, 59, 60,
                      61, 63, 68, 77, 79, 84, 91, 94, 96, 99, 100, 101, 105, 106, 109, 113, 114, 117, 122, 128, 131,
                      140, 141, 145)
ADE_PANOPTIC_SPLITS = {"train": ("train", "training"), "val": ("val", "validation")}


def build_ade20k_panoptic(root: str | Path, split: str, image_dir: Optional[str] = None,
                          ann_file: Optional[str] = None, ann_dir: Optional[str] = None,
                          drop_empty: bool = False) -> CocoPanoptic:
    """ADE20K panoptic through the COCO panoptic reader (``root`` is ADEChallengeData2016 or holds it); the
    categories must be the conversion's 150, with the official 50 stuff classes (else a DataError naming the
    JSON file)."""
    root = Path(root)
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    s, sub = ADE_PANOPTIC_SPLITS.get(split, (split, split))
    ds = CocoPanoptic(base, split, fill(image_dir, sub, f"images/{sub}"), fill(ann_file, s, f"ade20k_panoptic_{s}.json"),
                      fill(ann_dir, s, f"ade20k_panoptic_{s}"), drop_empty=drop_empty, name="ade20k_panoptic")
    stuff = tuple(i for i, thing in enumerate(ds.info.is_thing) if not thing)
    if ds.info.num_classes != ADE_PANOPTIC_NUM_CLASSES or stuff != ADE_PANOPTIC_STUFF:
        raise DataError(f"{ds.json_where} lists {ds.info.num_classes} categories ({len(stuff)} stuff); ADE20K "
                        f"panoptic in the standard Mask2Former conversion has {ADE_PANOPTIC_NUM_CLASSES}: 100 things "
                        f"and 50 stuff (contiguous stuff ids {list(ADE_PANOPTIC_STUFF[:4])}...); convert the data "
                        f"set with Mask2Former's datasets/prepare_ade20k_pan_seg.py")
    return ds
