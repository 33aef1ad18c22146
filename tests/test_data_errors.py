"""Bad input ends in one readable error (ValueError or FileNotFoundError subclass) naming the file or id."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from study.config import ConfigError, load_config
from study.data import DataError, DataNotFoundError, build_dataset
from study.data.config import DataConfig
from study.data.synthetic import generate


@pytest.fixture
def coco(tmp_path) -> Path:
    """A tiny data set in the official COCO layout (the synthetic generator writes it)."""
    return generate(tmp_path / "coco", 48, 3, 2, seed=0)


def _pan(root: Path) -> DataConfig:
    return DataConfig(dataset="coco_panoptic", root=str(root))


def _ins(root: Path) -> DataConfig:
    return DataConfig(dataset="coco_instance", root=str(root))


def _edit_json(path: Path, edit) -> None:
    js = json.loads(path.read_text())
    edit(js)
    path.write_text(json.dumps(js))


def test_corrupt_image_names_the_file(coco):
    victim = coco / "val2017" / "000001000001.png"
    victim.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    ds = build_dataset(_pan(coco), "val", "panoptic")
    with pytest.raises(DataError, match="cannot decode image .*000001000001.png"):
        ds[0]
    with pytest.raises(ValueError):
        build_dataset(_ins(coco), "val", "instance")[0]
    # truncated: the first half of a real PNG
    good = (coco / "val2017" / "000001000002.png").read_bytes()
    (coco / "val2017" / "000001000002.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="000001000002.png"):
        ds[1]


def test_corrupt_panoptic_png_and_json(coco):
    (coco / "annotations" / "panoptic_val2017" / "000001000001.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="label PNG .*panoptic_val2017/000001000001.png"):
        build_dataset(_pan(coco), "val", "panoptic")[0]
    (coco / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(DataError, match="instances_val2017.json is not valid JSON"):
        build_dataset(_ins(coco), "val", "instance")


def test_annotation_naming_a_missing_file(coco, tmp_path):
    (coco / "val2017" / "000001000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="image .*000001000002.png named in .*panoptic_val2017.json"):
        build_dataset(_pan(coco), "val", "panoptic")
    with pytest.raises(DataNotFoundError, match="000001000002.png named in .*instances_val2017.json"):
        build_dataset(_ins(coco), "val", "instance")
    (coco / "annotations" / "panoptic_train2017" / "000000000003.png").unlink()
    with pytest.raises(FileNotFoundError, match="panoptic PNG .*panoptic_train2017/000000000003.png"):
        build_dataset(_pan(coco), "train", "panoptic")
    # semantic: a list file naming a label that is not there
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "val.txt").write_text("imgs/a.png labels/a.png\n")
    with pytest.raises(FileNotFoundError, match="label .*labels/a.png for image imgs/a.png"):
        build_dataset(DataConfig(dataset="list", root=str(tmp_path)), "val", "semantic")


def test_category_id_absent_from_categories(coco):
    def bad_segment(js):
        js["annotations"][1]["segments_info"][0]["category_id"] = 999

    _edit_json(coco / "annotations" / "panoptic_val2017.json", bad_segment)
    with pytest.raises(DataError, match="category id 999, absent from the categories"):
        build_dataset(_pan(coco), "val", "panoptic")

    def bad_annotation(js):
        js["annotations"][0]["category_id"] = 92  # a stuff id: not an instance category
        js["annotations"][0]["id"] = 4242

    _edit_json(coco / "annotations" / "instances_val2017.json", bad_annotation)
    with pytest.raises(ValueError, match="annotation 4242 .*category id 92"):
        build_dataset(_ins(coco), "val", "instance")


def test_panoptic_png_segment_missing_from_json(coco):
    def drop(js):
        js["annotations"][0]["segments_info"].pop(0)

    _edit_json(coco / "annotations" / "panoptic_val2017.json", drop)
    with pytest.raises(DataError, match="panoptic_val2017/000001000001.png holds segment ids"):
        build_dataset(_pan(coco), "val", "panoptic")[0]


def test_label_value_out_of_range(coco, tmp_path):
    # ADE20K layout (the synthetic set writes it with 6 classes): value 7 is out of range
    lab = coco / "ADEChallengeData2016" / "annotations" / "validation" / "000001000001.png"
    arr = np.asarray(Image.open(lab)).copy()
    arr[0, 0] = 7
    Image.fromarray(arr).save(lab)
    ds = build_dataset(DataConfig(dataset="ade20k", root=str(coco)), "val", "semantic")
    assert ds.info.num_classes == 6
    with pytest.raises(DataError, match=r"000001000001.png holds value\(s\) \[7\] out of range"):
        ds[0]
    # CamVid-style list: 0..10 classes, 11 void; 12 is out of range
    (tmp_path / "l").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "l" / "a.png")
    Image.fromarray(np.array([[0, 11, 255, 12]] * 4, np.uint8)).save(tmp_path / "l" / "a_lab.png")
    (tmp_path / "l" / "train.txt").write_text("a.png a_lab.png\n")
    ds = build_dataset(DataConfig(dataset="list", root=str(tmp_path / "l")), "train", "semantic")
    with pytest.raises(ValueError, match=r"a_lab.png holds value\(s\) \[12\]"):
        ds[0]


def test_empty_data_sets(coco, tmp_path):
    _edit_json(coco / "annotations" / "panoptic_val2017.json", lambda js: js.update(images=[], annotations=[]))
    with pytest.raises(DataError, match="panoptic_val2017.json lists no images: the data set is empty"):
        build_dataset(_pan(coco), "val", "panoptic")
    (tmp_path / "camvid").mkdir()
    (tmp_path / "camvid" / "val.txt").write_text("\n")
    with pytest.raises(DataError, match="val.txt: the data set is empty"):
        build_dataset(DataConfig(dataset="list", root=str(tmp_path / "camvid")), "val", "semantic")
    for sub in ("images/validation", "annotations/validation"):
        (tmp_path / "ade" / sub).mkdir(parents=True)
    with pytest.raises(DataError, match="no images found in .*images/validation"):
        build_dataset(DataConfig(dataset="ade20k", root=str(tmp_path / "ade")), "val", "semantic")


def test_dataset_folder_that_does_not_exist(tmp_path):
    missing = tmp_path / "no" / "such" / "coco"
    for name, task in (("coco_panoptic", "panoptic"), ("coco_instance", "instance"), ("ade20k", "semantic"),
                       ("cityscapes", "semantic"), ("list", "semantic")):
        with pytest.raises(FileNotFoundError, match=f"dataset folder for '{name}' does not exist: {missing}"):
            build_dataset(DataConfig(dataset=name, root=str(missing)), "val", task)
    with pytest.raises(FileNotFoundError, match="data.root is not set"):
        build_dataset(DataConfig(dataset="ade20k"), "val", "semantic")
    # an existing folder without the split's files names the file it looked for
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match="annotations/panoptic_val2017.json"):
        build_dataset(DataConfig(dataset="coco_panoptic", root=str(tmp_path / "empty")), "val", "panoptic")


def test_config_mistakes_are_config_errors():
    with pytest.raises(ConfigError, match="unknown dataset 'coco'"):
        load_config(overrides=["data.dataset=coco"])
    with pytest.raises(ConfigError, match="scale_range"):
        load_config(overrides=["data.scale_range=[2.0, 0.5]"])
