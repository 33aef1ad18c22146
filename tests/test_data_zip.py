"""Reading straight from the official zip files: each sample folder zipped in a tmp dir in the official zip
layout must give exactly the samples the extracted folder gives. Also Cityscapes (no sample shipped):
a tiny folder in the official layout, extracted and zipped."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import data_dir
from study.data import DataError, build_dataset
from study.data.config import DataConfig


def _same(a, b):
    assert a.image_id == b.image_id and a.file_name == b.file_name
    assert torch.equal(a.image, b.image) and torch.equal(a.masks, b.masks)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.is_crowd, b.is_crowd)


def _zip(path: Path, members: dict, compression=zipfile.ZIP_DEFLATED):
    """members: name in zip -> file path or bytes."""
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, src in members.items():
            if isinstance(src, bytes):
                z.writestr(name, src)
            else:
                z.write(src, name)


@pytest.mark.parametrize("inner", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_coco_panoptic_from_official_zips(tmp_path, inner):
    src = data_dir("coco_panoptic_sample")
    folder = build_dataset(DataConfig(dataset="coco_panoptic", root=str(src), image_dir="input_images",
                                      ann_file="panoptic_examples.json", ann_dir="panoptic_examples"),
                           "val", "panoptic")
    # val2017.zip: val2017/*.jpg. panoptic_annotations_trainval2017.zip: annotations/panoptic_val2017.json
    # and annotations/panoptic_val2017.zip, itself holding panoptic_val2017/*.png.
    _zip(tmp_path / "val2017.zip", {f"val2017/{p.name}": p for p in (src / "input_images").iterdir()})
    _zip(tmp_path / "inner.zip", {f"panoptic_val2017/{p.name}": p for p in (src / "panoptic_examples").iterdir()},
         inner)
    _zip(tmp_path / "panoptic_annotations_trainval2017.zip",
         {"annotations/panoptic_val2017.json": src / "panoptic_examples.json",
          "annotations/panoptic_val2017.zip": tmp_path / "inner.zip"}, zipfile.ZIP_STORED)
    (tmp_path / "inner.zip").unlink()
    zipped = build_dataset(DataConfig(dataset="coco_panoptic", root=str(tmp_path)), "val", "panoptic")
    assert len(zipped) == len(folder) == 2
    for i in range(2):
        _same(zipped[i], folder[i])
    assert "panoptic_annotations_trainval2017.zip" in zipped.info.extra["panoptic_json"]
    # handed to a DataLoader worker: the zip handle is reopened in the child process
    loader = torch.utils.data.DataLoader(zipped, batch_size=None, num_workers=1)
    assert torch.equal(next(iter(loader)).masks, folder[0].masks)


def test_coco_instance_from_official_zips(tmp_path):
    src = data_dir("coco_mini")
    folder = build_dataset(DataConfig(dataset="coco_instance", root=str(src)), "val", "instance")
    _zip(tmp_path / "val2017.zip", {f"val2017/{p.name}": p for p in (src / "val2017").iterdir()},
         zipfile.ZIP_STORED)
    _zip(tmp_path / "annotations_trainval2017.zip",
         {"annotations/instances_val2017.json": src / "annotations" / "instances_val2017.json"})
    zipped = build_dataset(DataConfig(dataset="coco_instance", root=str(tmp_path)), "val", "instance")
    assert len(zipped) == len(folder) == 79
    for i in (0, 40, 78):
        _same(zipped[i], folder[i])


def test_ade20k_from_official_zip(tmp_path):
    src = data_dir("ade20k_sample")
    folder = build_dataset(DataConfig(dataset="ade20k", root=str(src), image_dir="images", ann_dir="annotations"),
                           "val", "semantic")
    members = {f"ADEChallengeData2016/images/validation/{p.name}": p for p in (src / "images").iterdir()}
    members.update({f"ADEChallengeData2016/annotations/validation/{p.name}": p
                    for p in (src / "annotations").iterdir()})
    members["ADEChallengeData2016/objectInfo150.csv"] = src / "objectInfo150.csv"
    _zip(tmp_path / "ADEChallengeData2016.zip", members)
    zipped = build_dataset(DataConfig(dataset="ade20k", root=str(tmp_path)), "val", "semantic")
    assert zipped.info.class_names == folder.info.class_names
    for a, b in zip(zipped, folder):
        _same(a, b)


# -------------------------------------------------------------------------------------- Cityscapes

def _cityscapes(root: Path, split="val") -> np.ndarray:
    """Two tiny images of one city in the official layout; returns the label ids of the first."""
    rng = np.random.default_rng(0)
    ids = None
    for k in range(2):
        stem = f"aachen_000000_00001{k}"
        img_dir, gt_dir = root / "leftImg8bit" / split / "aachen", root / "gtFine" / split / "aachen"
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 32, 3), dtype=np.uint8)).save(img_dir / f"{stem}_leftImg8bit.png")
        lab = np.zeros((16, 32), np.uint8)
        lab[:, 4:8], lab[:, 8:12], lab[:, 12:16], lab[:, 16:20], lab[:, 20:24] = 7, 26, 33, 4, 255
        lab[:2] = 23
        Image.fromarray(lab).save(gt_dir / f"{stem}_gtFine_labelIds.png")
        (gt_dir / f"{stem}_gtFine_color.png").write_bytes(b"")  # other gtFine files are ignored
        ids = lab if ids is None else ids
    return ids


def test_cityscapes_label_ids_to_19_train_ids_folder_and_zip(tmp_path):
    raw = _cityscapes(tmp_path / "extracted")
    ds = build_dataset(DataConfig(dataset="cityscapes", root=str(tmp_path / "extracted")), "val", "semantic")
    assert len(ds) == 2 and ds.info.num_classes == 19 and ds.info.class_names[13] == "car"
    s = ds[0]
    # road 7 -> 0, sky 23 -> 10, car 26 -> 13, bicycle 33 -> 18; 0 (unlabeled), 4 (static), 255 ignored
    assert s.labels.tolist() == [0, 10, 13, 18]
    assert torch.equal(s.masks[2], torch.from_numpy(raw == 26))
    assert not s.masks.any(0)[2:, :4].any() and not s.masks.any(0)[2:, 16:].any()
    assert ds.info.category_ids[13] == 26  # contiguous -> label id, for writing predictions back

    z = tmp_path / "zipped"
    z.mkdir()
    ex = tmp_path / "extracted"
    _zip(z / "leftImg8bit_trainvaltest.zip", {str(p.relative_to(ex)): p for p in (ex / "leftImg8bit").rglob("*.png")})
    _zip(z / "gtFine_trainvaltest.zip", {str(p.relative_to(ex)): p for p in (ex / "gtFine").rglob("*.png")})
    zipped = build_dataset(DataConfig(dataset="cityscapes", root=str(z)), "val", "semantic")
    for a, b in zip(zipped, ds):
        _same(a, b)


def test_cityscapes_label_id_out_of_range(tmp_path):
    _cityscapes(tmp_path)
    bad = tmp_path / "gtFine" / "val" / "aachen" / "aachen_000000_000010_gtFine_labelIds.png"
    lab = np.full((16, 32), 7, np.uint8)
    lab[0, 0] = 40  # Cityscapes label ids end at 33
    Image.fromarray(lab).save(bad)
    ds = build_dataset(DataConfig(dataset="cityscapes", root=str(tmp_path)), "val", "semantic")
    with pytest.raises(DataError, match=r"aachen_000000_000010_gtFine_labelIds.png.*\[40\]"):
        ds[0]


def test_zip_without_the_split_names_what_was_tried(tmp_path):
    _zip(tmp_path / "ADEChallengeData2016.zip", {"ADEChallengeData2016/images/training/a.jpg": b"x"})
    with pytest.raises(FileNotFoundError, match="images/validation.*ADEChallengeData2016.zip"):
        build_dataset(DataConfig(dataset="ade20k", root=str(tmp_path)), "val", "semantic")
