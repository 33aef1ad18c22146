"""Readers on the real sample data (../shared/data): COCO panoptic, COCO instance, ADE20K, CamVid."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from conftest import data_dir
from study.data import build_dataset
from study.data.config import DataConfig


def _panoptic_cfg(**kw) -> DataConfig:
    # The panopticapi sample keeps the official files under other names than COCO's layout.
    return DataConfig(dataset="coco_panoptic", root=str(data_dir("coco_panoptic_sample")),
                      image_dir="input_images", ann_file="panoptic_examples.json", ann_dir="panoptic_examples", **kw)


def _check_sample(s, num_classes: int, disjoint: bool):
    n = len(s.labels)
    assert s.image.dtype == torch.uint8 and s.image.shape[0] == 3
    assert s.masks.dtype == torch.bool and s.masks.shape == (n, *s.image.shape[1:])
    assert s.labels.dtype == torch.int64 and s.is_crowd.dtype == torch.bool and s.is_crowd.shape == (n,)
    assert bool((s.labels >= 0).all() and (s.labels < num_classes).all())
    assert bool(s.masks.flatten(1).any(1).all()), "every segment has pixels"
    if disjoint:
        assert int(s.masks.sum(0).max()) <= 1, "segments overlap"


def test_coco_panoptic_sample_matches_json_areas_and_categories():
    ds = build_dataset(_panoptic_cfg(), "val", "panoptic")
    js = json.loads((data_dir("coco_panoptic_sample") / "panoptic_examples.json").read_text())
    assert len(ds) == 2 and ds.info.num_classes == 133 and sum(ds.info.is_thing) == 80
    assert ds.info.category_ids[:3] == [1, 2, 3] and ds.info.category_ids[-1] == 200
    by_image = {a["image_id"]: a for a in js["annotations"]}
    present = set()
    for s in ds:
        _check_sample(s, 133, disjoint=True)
        segs = {seg["id"]: seg for seg in by_image[s.image_id]["segments_info"]}
        assert sorted(s.segment_ids.tolist()) == sorted(segs)
        assert 1 <= int(s.is_crowd.sum()) <= 2
        for m, lab, crowd, sid in zip(s.masks, s.labels, s.is_crowd, s.segment_ids.tolist()):
            seg = segs[sid]
            assert int(m.sum()) == seg["area"]  # the PNG decoding (R + 256 G + 256^2 B) is right
            assert ds.info.category_ids[int(lab)] == seg["category_id"]
            assert bool(crowd) == bool(seg["iscrowd"])
            present.add(int(lab))
    assert len(present) == 8 and sum(ds.info.is_thing[c] for c in present) == 4
    assert {s.image.shape[1:] for s in ds} == {(427, 640), (360, 640)}
    assert ds.info.extra["panoptic_json"].endswith("panoptic_examples.json")
    assert ds.info.extra["panoptic_dir"].endswith("panoptic_examples")


def test_coco_detection_format_rle_agrees_with_panoptic_png():
    """The same ground truth as RLE (instance reader) and as id-encoded PNG (panoptic reader)."""
    pan = build_dataset(_panoptic_cfg(), "val", "panoptic")
    det = build_dataset(DataConfig(dataset="coco_instance", root=pan.info.extra["panoptic_dir"] + "/..",
                                   image_dir="input_images", ann_file="panoptic_coco_detection_format.json"),
                        "val", "instance")
    assert det.info.num_classes == 133
    for p in pan:
        d = next(x for x in det if x.image_id == p.image_id)
        assert len(d.labels) == len(p.labels)
        key = lambda s: sorted((int(l), int(m.sum()), bool(c)) for l, m, c in zip(s.labels, s.masks, s.is_crowd))
        assert key(d) == key(p)
        # masks equal one to one (matched by label and area)
        for m, lab in zip(p.masks, p.labels):
            assert any(torch.equal(m, m2) for m2, l2 in zip(d.masks, d.labels) if l2 == lab)


def test_coco_instance_mini_polygons_and_crowd_rle():
    root = data_dir("coco_mini")
    ds = build_dataset(DataConfig(dataset="coco_instance", root=str(root)), "val", "instance")
    js = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    anns = {a["id"]: a for a in js["annotations"]}
    assert len(ds) == 79 and ds.info.num_classes == 80 and all(ds.info.is_thing)
    assert ds.info.category_ids[79] == 90 and ds.info.class_names[0] == "person"
    assert ds.info.extra["instances_json"].endswith("instances_val2017.json")
    total, crowd = 0, 0
    for i in range(0, len(ds), 3):  # every third image keeps the test fast; crowd images checked below
        s = ds[i]
        _check_sample(s, 80, disjoint=False)
        for m, sid in zip(s.masks, s.segment_ids.tolist()):
            a = anns[sid]
            # polygon area vs pixel count: equal up to the boundary pixels (for one polygon: COCO's area of
            # several polygons sums them, overlaps counted twice)
            if len(a["segmentation"]) == 1:
                assert abs(int(m.sum()) - a["area"]) <= 0.05 * a["area"] + 10
            ys, xs = torch.nonzero(m, as_tuple=True)
            x, y, w, h = a["bbox"]  # the mask sits where the annotation's box says (no transposition)
            ix = min(xs.max() + 1, x + w) - max(xs.min(), x)
            iy = min(ys.max() + 1, y + h) - max(ys.min(), y)
            box_area = (xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min())
            assert ix > 0 and iy > 0 and ix * iy / (w * h + box_area - ix * iy) > 0.8
        total += len(s.labels)
    coco = COCO(str(root / "annotations" / "instances_val2017.json"))
    crowd_images = sorted({a["image_id"] for a in js["annotations"] if a["iscrowd"]})
    index = {e[0]["id"]: i for i, e in enumerate(ds.entries)}
    for image_id in crowd_images:
        s = ds[index[image_id]]
        crowd += int(s.is_crowd.sum())
        for m, c, sid in zip(s.masks, s.is_crowd, s.segment_ids.tolist()):
            if c:  # the official API decodes the same mask (COCO's crowd 'area' fields do not match RLE counts)
                assert torch.equal(m, torch.from_numpy(coco.annToMask(anns[sid]).astype(bool)))
    assert crowd == 5 and total > 100


def test_coco_instance_train_split_names_2017_folders():
    ds = build_dataset(DataConfig(dataset="coco_instance", root=str(data_dir("coco_mini"))), "train", "instance")
    assert len(ds) == 80
    labels = torch.cat([torch.tensor([ds.info.category_ids.index(a["category_id"]) for a in e[1]])
                        for e in ds.entries])
    assert len(set(labels.tolist())) == 80  # all 80 classes, mapped to contiguous ids


def test_ade20k_sample_150_classes_zero_ignored():
    root = data_dir("ade20k_sample")
    ds = build_dataset(DataConfig(dataset="ade20k", root=str(root), image_dir="images", ann_dir="annotations"),
                       "val", "semantic")
    assert len(ds) == 3 and ds.info.num_classes == 150
    assert ds.info.class_names[:3] == ["wall", "building", "sky"] and not any(ds.info.is_thing)
    present = set()
    for s in ds:
        _check_sample(s, 150, disjoint=True)
        assert not s.is_crowd.any()
        raw = np.asarray(Image.open(root / "annotations" / (s.image_id + ".png")))
        assert torch.equal(s.masks.any(0), torch.from_numpy(raw != 0))  # 0 is ignored, the rest covered
        for m, lab in zip(s.masks, s.labels):
            assert (raw[m.numpy()] == int(lab) + 1).all()  # label k -> contiguous k - 1
        present |= set(s.labels.tolist())
    assert len(present) == 15


def test_camvid_list_files():
    root = data_dir("camvid")
    ds = build_dataset(DataConfig(dataset="list", root=str(root)), "val", "semantic")
    assert len(ds) == 101 and ds.info.num_classes == 11 and ds.info.class_names[0] == "Sky"
    assert len(build_dataset(DataConfig(dataset="list", root=str(root)), "train", "semantic")) == 367
    s = ds[0]
    _check_sample(s, 11, disjoint=True)
    assert s.image.shape == (3, 360, 480)
    raw = np.asarray(Image.open(root / "valannot" / (s.image_id + ".png")))
    assert torch.equal(s.masks.any(0), torch.from_numpy(raw != 11))  # 11 = void
    for m, lab in zip(s.masks, s.labels):
        assert (raw[m.numpy()] == int(lab)).all()


def test_task_mismatch_is_a_readable_error():
    with pytest.raises(ValueError, match="serves the task"):
        build_dataset(_panoptic_cfg(), "val", "semantic")
