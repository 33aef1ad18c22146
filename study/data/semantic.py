"""Semantic segmentation readers: ADE20K, Cityscapes, and image/label list files (CamVid).

Each maps the raw label values of a single-channel PNG to contiguous class ids through a 256-entry
look-up table (``IGNORE`` for void, ``INVALID`` for values the format does not define, which raise a
:class:`DataError` naming the file and value). Each class present in an image becomes one segment
(mask, label); semantic data has no crowd. ``Sample.segment_ids`` holds the dataset's label value of each
class (ADE20K 1..150, Cityscapes label ids, list values), ``image_id`` the image file's stem.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from study.data.source import (IMAGE_EXTENSIONS, DataError, DataNotFoundError, Files, check_same_size,
                               decode_image, decode_png, fill, locate_folder, read_file)
from study.data.types import DatasetInfo, Sample

IGNORE, INVALID = -1, -2  # look-up table codes besides contiguous ids 0..C-1


class SemanticDataset(Dataset):
    """Pairs of (image name, label name) read from two :class:`Files`; labels mapped through ``lut``."""

    def __init__(self, pairs: list[tuple[str, str]], images: Files, labels: Files, lut: np.ndarray,
                 info: DatasetInfo, listed_in: str):
        if not pairs:
            raise DataError(f"no images found in {listed_in}: the data set is empty")
        for img, lab in pairs:  # fail at construction, not hours into training
            if img not in images.names():
                raise DataNotFoundError(f"image {images.where(img)} listed in {listed_in} does not exist")
            if lab not in labels.names():
                raise DataNotFoundError(f"label {labels.where(lab)} for image {img} in {listed_in} does not "
                                        f"exist")
        self.pairs, self.images, self.labels, self.lut, self.info = pairs, images, labels, lut, info

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        img_name, lab_name = self.pairs[index]
        img_where, lab_where = self.images.where(img_name), self.labels.where(lab_name)
        image = decode_image(self.images.read(img_name), img_where)
        raw = decode_png(self.labels.read(lab_name), lab_where, channels=1).astype(np.int64)
        check_same_size(image, raw, img_where, lab_where)
        if raw.min() < 0 or raw.max() >= len(self.lut):
            raise DataError(f"label {lab_where} holds value {raw.max()} outside 0..{len(self.lut) - 1}")
        mapped = self.lut[raw]  # (H, W) contiguous ids, IGNORE, or INVALID
        bad = np.unique(raw[mapped == INVALID])
        if bad.size:
            raise DataError(f"label {lab_where} holds value(s) {bad.tolist()[:5]} out of range for "
                            f"{self.info.name} ({self.info.num_classes} classes)")
        present = np.unique(mapped[mapped >= 0])  # sorted class ids in this image
        masks = torch.from_numpy(mapped[None] == present[:, None, None]) if present.size else \
            torch.zeros(0, *raw.shape, dtype=torch.bool)
        cat_ids = [self.info.category_ids[c] for c in present.tolist()]
        return Sample(image=image, masks=masks, labels=torch.from_numpy(present.astype(np.int64)),
                      is_crowd=torch.zeros(len(present), dtype=torch.bool), image_id=Path(img_name).stem,
                      file_name=img_name, segment_ids=torch.tensor(cat_ids, dtype=torch.int64))


def _image_names(files: Files) -> list[str]:
    return sorted(n for n in files.names() if n.lower().endswith(IMAGE_EXTENSIONS))


# ---------------------------------------------------------------------------------------------- ADE20K

ADE_NUM_CLASSES = 150  # ADEChallengeData2016 (SceneParsing): labels 1..150, 0 = other/ignored
ADE_SPLITS = {"train": "training", "val": "validation"}


def _ade_class_names(base: Path, root: Path, zips) -> Optional[list[str]]:
    """Class names from objectInfo150.csv (scene-parsing repository) or objectInfo150.txt (the zip)."""
    for folder in (root, base):
        for fname, delim in (("objectInfo150.csv", ","), ("objectInfo150.txt", "\t")):
            try:
                data, _ = read_file(folder, fname, [(z, p + "/" + fname) for z, p in zips])
            except DataNotFoundError:
                continue
            rows = [r for r in csv.reader(io.StringIO(data.decode("utf-8")), delimiter=delim) if r]
            # the name is the last column in both files ("wall", "building;edifice", ...): keep the first
            return [r[-1].split(";")[0].strip() for r in rows[1:]]
    return None


def build_ade20k(root: Path, split: str, image_dir: Optional[str] = None, ann_dir: Optional[str] = None,
                 name: str = "ade20k") -> SemanticDataset:
    """ADE20K scene parsing, ``root/ADEChallengeData2016/{images,annotations}/{training,validation}``
    (``root`` may also be the ADEChallengeData2016 folder itself, or hold ``ADEChallengeData2016.zip``)."""
    sub = ADE_SPLITS.get(split, split)
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    zips = [("ADEChallengeData2016.zip", "ADEChallengeData2016")]
    img_rel, ann_rel = fill(image_dir, sub, f"images/{sub}"), fill(ann_dir, sub, f"annotations/{sub}")
    images = locate_folder(base, img_rel, [(z, f"{p}/{img_rel}") for z, p in zips])
    labels = locate_folder(base, ann_rel, [(z, f"{p}/{ann_rel}") for z, p in zips])
    names = _ade_class_names(base, root, zips) or [f"class_{i}" for i in range(1, ADE_NUM_CLASSES + 1)]
    lut = np.full(256, INVALID, dtype=np.int64)
    lut[0] = IGNORE  # 0 = "other objects", ignored in training and evaluation
    lut[1:len(names) + 1] = np.arange(len(names))  # label k -> contiguous k - 1
    info = DatasetInfo(name=name, num_classes=len(names), class_names=names,
                       category_ids=list(range(1, len(names) + 1)), is_thing=[False] * len(names))
    pairs = [(n, str(Path(n).with_suffix(".png"))) for n in _image_names(images)]
    return SemanticDataset(pairs, images, labels, lut, info, images.where())


# ------------------------------------------------------------------------------------------ Cityscapes

# gtFine label id -> train id for the 19 evaluated classes (cityscapesscripts' labels.py); every other id
# in 0..33 is ignored.
CITYSCAPES_CLASSES = [
    (7, "road"), (8, "sidewalk"), (11, "building"), (12, "wall"), (13, "fence"), (17, "pole"),
    (19, "traffic light"), (20, "traffic sign"), (21, "vegetation"), (22, "terrain"), (23, "sky"),
    (24, "person"), (25, "rider"), (26, "car"), (27, "truck"), (28, "bus"), (31, "train"),
    (32, "motorcycle"), (33, "bicycle")]
CITYSCAPES_MAX_LABEL_ID = 33


def build_cityscapes(root: Path, split: str, image_dir: Optional[str] = None, ann_dir: Optional[str] = None,
                     name: str = "cityscapes") -> SemanticDataset:
    """Cityscapes ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with ``gtFine/{split}/{city}/
    *_gtFine_labelIds.png``, or the zips ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``."""
    img_rel, ann_rel = fill(image_dir, split, f"leftImg8bit/{split}"), fill(ann_dir, split, f"gtFine/{split}")
    images = locate_folder(root, img_rel, [("leftImg8bit_trainvaltest.zip", img_rel)])
    labels = locate_folder(root, ann_rel, [("gtFine_trainvaltest.zip", ann_rel)])
    lut = np.full(256, INVALID, dtype=np.int64)
    lut[:CITYSCAPES_MAX_LABEL_ID + 1] = IGNORE
    lut[255] = IGNORE  # license plate (id -1) is written as 255 in 8-bit label images
    for train_id, (label_id, _) in enumerate(CITYSCAPES_CLASSES):
        lut[label_id] = train_id
    info = DatasetInfo(name=name, num_classes=len(CITYSCAPES_CLASSES),
                       class_names=[n for _, n in CITYSCAPES_CLASSES],
                       category_ids=[i for i, _ in CITYSCAPES_CLASSES], is_thing=[False] * len(CITYSCAPES_CLASSES))
    suffix = "_leftImg8bit.png"
    pairs = [(n, n[:-len(suffix)] + "_gtFine_labelIds.png") for n in sorted(images.names()) if n.endswith(suffix)]
    return SemanticDataset(pairs, images, labels, lut, info, images.where())


# ---------------------------------------------------------------------------------------- list files

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]  # label values 0..10; 11 = void


def build_list(root: Path, split: str, list_file: Optional[str] = None, class_names: Optional[list] = None,
               ignore_value: Optional[int] = None, name: str = "list") -> SemanticDataset:
    """Image/label list files (CamVid's ``train.txt``: ``image label`` per line, relative to ``root``).

    Label values 0..C-1 are the classes, ``ignore_value`` (default C, CamVid's void 11) and 255 are void.
    """
    names = list(class_names) if class_names else CAMVID_CLASSES
    ignore = len(names) if ignore_value is None else ignore_value
    rel = fill(list_file, split, f"{split}.txt")
    data, where = read_file(root, rel)
    pairs = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DataError(f"{where} line {lineno}: expected 'image label', got {line.strip()!r}")
        # Absolute paths in some copies of the SegNet lists (/SegNet/CamVid/train/x.png): keep the last two
        # components, which are the folder and file under the root.
        pairs.append(tuple(p if not p.startswith("/") else "/".join(Path(p).parts[-2:]) for p in parts))
    lut = np.full(256, INVALID, dtype=np.int64)
    lut[:len(names)] = np.arange(len(names))
    lut[ignore] = IGNORE
    lut[255] = IGNORE
    info = DatasetInfo(name=name, num_classes=len(names), class_names=names,
                       category_ids=list(range(len(names))), is_thing=[False] * len(names))
    files = locate_folder(root, ".")
    return SemanticDataset(pairs, files, files, lut, info, where)
