"""Data against the official data modules (issue 27 item 5).

The official COCO panoptic, COCO instance, ADE20K semantic and Cityscapes semantic data modules read zips; the
tests build those zips in tmp_path, in the official layout, from the shared samples (Cityscapes, which has no
sample here: a synthetic image and label-id PNG in its official layout), and read them with the official
``Dataset`` and with our readers (from the same zips). Compared per image: every mask, label and crowd flag,
exactly (both decode the same PNGs / polygons; the ignore value 0 of ADE20K and the non-evaluated Cityscapes
ids become no segment on both sides).

Then the training transforms: the official ``Transforms`` (colour jitter, flip, ScaleJitter, pad, RandomCrop
from torchvision, drawing from torch's global generator) against our ``TrainTransform`` (drawing from its own
generator) seeded alike: both draw the same uniforms in the same order, so the crops, flips and scales are the
same. Images equal to 1 grey level (both resize with torchvision's antialiased bilinear; the jitter factors
are computed in float64 here and float32 there, a rounding that moves a pixel by at most one level), masks
and labels exactly.

ADE20K panoptic (Table 4) is not synthesised here. Its official module reads the raw semantic PNGs plus the
``annotations_instance`` PNGs. Ours reads Mask2Former's conversion of them to the COCO panoptic format
(compared through the COCO panoptic reader above). See docs/official.md.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import data_dir
from official_oracle import official
from study.data import build_dataset
from study.data.config import DataConfig
from study.data.types import Sample
from study.data.transforms import TrainTransform


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _targets_by_name(ds) -> dict:
    out = {}
    for i, p in enumerate(ds.imgs):
        img, t = ds[i]
        out[Path(p).name] = (img, t)
    return out


def _assert_same(ours: Sample, img, t, order=None):
    assert torch.equal(ours.image, img.as_subclass(torch.Tensor))
    masks, labels, crowd = ours.masks, ours.labels, ours.is_crowd
    if order is not None:
        masks, labels, crowd = masks[order], labels[order], crowd[order]
    assert torch.equal(labels, t["labels"])
    assert torch.equal(crowd, t["is_crowd"])
    assert torch.equal(masks, t["masks"].as_subclass(torch.Tensor).bool())


def test_coco_panoptic_targets_equal_the_official(tmp_path):
    src = data_dir("coco_panoptic_sample")
    js = json.loads((src / "panoptic_examples.json").read_text())
    js["categories"] = json.loads((src / "panoptic_coco_categories.json").read_text())
    annotations = {}
    for split in ("train2017", "val2017"):  # the official setup() opens both splits: the same two images
        _zip(tmp_path / f"{split}.zip", {f"{split}/{im['file_name']}": (src / "input_images" / im["file_name"])
                                         .read_bytes() for im in js["images"]})
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as z:
            for a in js["annotations"]:
                z.writestr(f"panoptic_{split}/{a['file_name']}",
                           (src / "panoptic_examples" / a["file_name"]).read_bytes())
        annotations.update({f"annotations/panoptic_{split}.json": json.dumps(js),
                            f"annotations/panoptic_{split}.zip": inner.getvalue()})
    _zip(tmp_path / "panoptic_annotations_trainval2017.zip", annotations)
    module = official("datasets.coco_panoptic").COCOPanoptic(tmp_path, stuff_classes=list(range(80, 133)),
                                                             num_workers=0).setup()
    theirs = _targets_by_name(module.val_dataset)
    ours = build_dataset(DataConfig(dataset="coco_panoptic", root=str(tmp_path)), "val", "panoptic")
    assert len(ours) == len(theirs) == 2
    crowd = 0
    for s in (ours[i] for i in range(len(ours))):
        # the official parser walks the PNG's segment ids in ascending order
        _assert_same(s, *theirs[s.file_name], order=torch.argsort(s.segment_ids))
        crowd += int(s.is_crowd.sum())
    assert crowd >= 2  # the crowd flags are compared, not only present


def test_coco_instance_targets_equal_the_official(tmp_path):
    src = data_dir("coco_mini")
    js = json.loads((src / "annotations" / "instances_val2017.json").read_text())
    crowd_images = {a["image_id"] for a in js["annotations"] if a["iscrowd"]}
    keep = {im["id"] for im in js["images"][:6]} | set(sorted(crowd_images)[:2])  # a few, crowd RLE included
    js["images"] = [im for im in js["images"] if im["id"] in keep]
    js["annotations"] = [a for a in js["annotations"] if a["image_id"] in keep]
    for split in ("train2017", "val2017"):  # the official setup() opens both splits: the same images
        _zip(tmp_path / f"{split}.zip", {f"{split}/{im['file_name']}": (src / "val2017" / im["file_name"]).read_bytes()
                                         for im in js["images"]})
    _zip(tmp_path / "annotations_trainval2017.zip", {f"annotations/instances_{s}2017.json": json.dumps(js)
                                                     for s in ("train", "val")})
    module = official("datasets.coco_instance").COCOInstance(tmp_path, num_workers=0).setup()
    theirs = _targets_by_name(module.val_dataset)
    ours = build_dataset(DataConfig(dataset="coco_instance", root=str(tmp_path)), "val", "instance")
    assert len(ours) == len(theirs) == len(keep)
    crowd = 0
    for s in (ours[i] for i in range(len(ours))):
        _assert_same(s, *theirs[s.file_name])  # both in the JSON's annotation order
        crowd += int(s.is_crowd.sum())
    assert crowd >= 2


def test_ade20k_semantic_targets_equal_the_official(tmp_path):
    src = data_dir("ade20k_sample")
    members = {}
    for p in sorted((src / "images").glob("*.jpg")):
        members[f"ADEChallengeData2016/images/validation/{p.name}"] = p.read_bytes()
        members[f"ADEChallengeData2016/annotations/validation/{p.stem}.png"] = \
            (src / "annotations" / f"{p.stem}.png").read_bytes()
    _zip(tmp_path / "ADEChallengeData2016.zip", members)
    module = official("datasets.ade20k_semantic").ADE20KSemantic(tmp_path, num_workers=0).setup()
    theirs = _targets_by_name(module.val_dataset)
    ours = build_dataset(DataConfig(dataset="ade20k", root=str(tmp_path)), "val", "semantic")
    assert len(ours) == len(theirs) == 3
    for s in (ours[i] for i in range(len(ours))):
        _assert_same(s, *theirs[Path(s.file_name).name])  # classes ascending on both sides; 0 ignored


def test_cityscapes_semantic_targets_equal_the_official(tmp_path):
    """No Cityscapes sample is shared: two synthetic 64 x 128 images with label-id PNGs holding every id
    0..33 and 255, in the official zips' layout."""
    g = np.random.default_rng(0)
    images, labels = {}, {}
    for k, city in enumerate(["aachen", "bonn"]):
        stem = f"{city}_000000_00001{k}"
        rgb = g.integers(0, 256, (64, 128, 3), dtype=np.uint8)
        ids = np.repeat(np.repeat(g.choice(np.r_[0:34, 255], (8, 16)).astype(np.uint8), 8, 0), 8, 1)
        for store, name, arr in ((images, f"leftImg8bit/val/{city}/{stem}_leftImg8bit.png", rgb),
                                 (labels, f"gtFine/val/{city}/{stem}_gtFine_labelIds.png", ids)):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            store[name] = buf.getvalue()
    _zip(tmp_path / "leftImg8bit_trainvaltest.zip", images)
    _zip(tmp_path / "gtFine_trainvaltest.zip", labels)
    module = official("datasets.cityscapes_semantic").CityscapesSemantic(tmp_path, num_workers=0).setup()
    theirs = _targets_by_name(module.cityscapes_val_dataset)
    ours = build_dataset(DataConfig(dataset="cityscapes", root=str(tmp_path)), "val", "semantic")
    assert len(ours) == len(theirs) == 2
    for s in (ours[i] for i in range(len(ours))):
        _assert_same(s, *theirs[Path(s.file_name).name])
        assert len(s.labels) == 19  # every evaluated class present, the other ids ignored


# ---- the training transforms with the same draws

def _official_transform(crop: int, jitter: bool, scale_range):
    return official("datasets.transforms").Transforms(img_size=(crop, crop), color_jitter_enabled=jitter,
                                                      scale_range=scale_range)


@pytest.mark.parametrize("jitter, scale_range", [(False, (0.1, 2.0)), (True, (0.5, 2.0))])
def test_training_transforms_equal_the_official_with_the_same_draws(jitter, scale_range, one_thread):
    from torchvision import tv_tensors

    ds = build_dataset(DataConfig(dataset="coco_panoptic", root=str(data_dir("coco_panoptic_sample")),
                                  image_dir="input_images", ann_file="panoptic_examples.json",
                                  ann_dir="panoptic_examples"), "val", "panoptic")
    crop = 128
    theirs_t, ours_t = _official_transform(crop, jitter, scale_range), TrainTransform(crop, scale_range, jitter)
    moved = 0
    for seed in range(6):
        s = ds[seed % len(ds)]
        torch.manual_seed(seed)
        img, t = theirs_t(tv_tensors.Image(s.image.clone()),
                          {"masks": tv_tensors.Mask(s.masks.clone()), "labels": s.labels.clone(),
                           "is_crowd": s.is_crowd.clone()})
        ours = ours_t(s, torch.Generator().manual_seed(seed))
        diff = (ours.image.int() - img.as_subclass(torch.Tensor).int()).abs()
        assert int(diff.max()) <= 1, f"seed {seed}: images differ by {int(diff.max())} levels"
        assert torch.equal(ours.labels, t["labels"])
        assert torch.equal(ours.masks, t["masks"].as_subclass(torch.Tensor))
        moved += int(not torch.equal(ours.image, ours_t(s, torch.Generator().manual_seed(seed + 100)).image))
    assert moved == 6  # other seeds give other crops: the comparison sees the draws
