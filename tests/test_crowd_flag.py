"""One crowd rule for every reader (study/coco_format.py ``crowd_flag``): the training readers refuse an
``iscrowd`` other than 0 / 1 as the scorers do (tests/test_faults_scoring.py), naming the segment; before, the
readers took ``bool(value)``, so "0" was a crowd in training and not in scoring."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import data_dir
from study.data import build_dataset
from study.data.config import DataConfig
from study.errors import UserError


def _panoptic_copy(tmp_path, value, every_segment=False):
    src = data_dir("coco_panoptic_sample")
    root = tmp_path / "pan"
    shutil.copytree(src, root)
    js = json.loads((root / "panoptic_examples.json").read_text())
    segments = js["annotations"][0]["segments_info"]
    seg = segments[1]
    for s in segments if every_segment else [seg]:
        s["iscrowd"] = value
    (root / "panoptic_examples.json").write_text(json.dumps(js))
    cfg = DataConfig(dataset="coco_panoptic", root=str(root), image_dir="input_images",
                     ann_file="panoptic_examples.json", ann_dir="panoptic_examples")
    return cfg, seg["id"]


@pytest.mark.parametrize("value", ["0", "1", 2, 0.5, None])
def test_panoptic_reader_refuses_a_crowd_flag_other_than_0_or_1(tmp_path, value):
    cfg, seg_id = _panoptic_copy(tmp_path, value)
    with pytest.raises(UserError, match=rf"segment {seg_id} of image .* has iscrowd .*expected 0 or 1"):
        build_dataset(cfg, "val", "panoptic")


@pytest.mark.parametrize("value,crowd", [(0, False), (1, True), (True, True)])
def test_panoptic_reader_reads_0_and_1(tmp_path, value, crowd):
    cfg, _ = _panoptic_copy(tmp_path, value, every_segment=True)
    sample = build_dataset(cfg, "val", "panoptic")
    first = sample[0]
    assert len(first.is_crowd) > 0 and bool(first.is_crowd.all()) == crowd and bool(first.is_crowd.any()) == crowd


def test_instance_reader_refuses_a_string_crowd_flag(tmp_path):
    root = tmp_path / "mini"
    shutil.copytree(data_dir("coco_mini"), root)
    path = root / "annotations" / "instances_val2017.json"
    js = json.loads(path.read_text())
    js["annotations"][0]["iscrowd"] = "0"
    path.write_text(json.dumps(js))
    with pytest.raises(UserError, match=rf"annotation {js['annotations'][0]['id']} of image .* has iscrowd '0'"):
        build_dataset(DataConfig(dataset="coco_instance", root=str(root)), "val", "instance")
