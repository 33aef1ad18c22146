"""ADE20K panoptic in the COCO panoptic format (Mask2Former's conversion: 150 categories, 100 things and 50
stuff) through the COCO panoptic reader, written by the test in that layout."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from study.data import build_dataset
from study.data.coco import ADE_PANOPTIC_STUFF
from study.data.config import DataConfig
from study.data.source import DataError


def write_ade20k_panoptic(root, num_categories=150, stuff=ADE_PANOPTIC_STUFF):
    """root/ADEChallengeData2016/{ade20k_panoptic_val.json, ade20k_panoptic_val/, images/validation/}: two
    32x32 images, each with a stuff segment (wall, id 0) and a thing segment (bed, id 7)."""
    base = root / "ADEChallengeData2016"
    (base / "images" / "validation").mkdir(parents=True)
    (base / "ade20k_panoptic_val").mkdir()
    cats = [{"id": i, "name": f"c{i}", "isthing": int(i not in stuff)} for i in range(num_categories)]
    images, anns = [], []
    rng = np.random.default_rng(0)
    for n in range(2):
        name = f"ADE_val_{n:08d}"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(base / "images" / "validation" / f"{name}.jpg")
        ids = np.zeros((32, 32), np.int64)
        ids[:16] = 5 + n  # stuff
        ids[20:30, 4 + n:20] = 300 + 256 * 2  # a thing, id with a G component
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(base / "ade20k_panoptic_val" / f"{name}.png")
        images.append({"id": n, "file_name": f"{name}.jpg", "height": 32, "width": 32})
        anns.append({"image_id": n, "file_name": f"{name}.png", "segments_info": [
            {"id": 5 + n, "category_id": 0, "iscrowd": 0, "area": int((ids == 5 + n).sum())},
            {"id": 300 + 512, "category_id": 7, "iscrowd": 0, "area": int((ids == 812).sum())}]})
    (base / "ade20k_panoptic_val.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                               "categories": cats}))
    return root


def test_reader_gives_150_classes_100_things(tmp_path):
    root = write_ade20k_panoptic(tmp_path)
    ds = build_dataset(DataConfig(dataset="ade20k_panoptic", root=str(root)), "val", "panoptic")
    assert ds.info.num_classes == 150 and sum(ds.info.is_thing) == 100
    assert [i for i, t in enumerate(ds.info.is_thing) if not t] == list(ADE_PANOPTIC_STUFF)
    assert ds.info.name == "ade20k_panoptic"
    assert ds.info.extra["panoptic_json"].endswith("ade20k_panoptic_val.json")
    s = ds[1]
    assert s.labels.tolist() == [0, 7] and s.masks.shape == (2, 32, 32)
    assert s.masks[0, :16].all() and s.masks[1].sum() == 10 * 15
    # the folder itself (ADEChallengeData2016) works as the root too
    assert len(build_dataset(DataConfig(dataset="ade20k_panoptic", root=str(root / "ADEChallengeData2016")),
                             "val", "panoptic")) == 2


@pytest.mark.parametrize("num,stuff", [(133, ADE_PANOPTIC_STUFF), (150, ADE_PANOPTIC_STUFF[1:])])
def test_other_categories_are_refused_naming_the_file(tmp_path, num, stuff):
    root = write_ade20k_panoptic(tmp_path, num, stuff)
    with pytest.raises(DataError, match="ade20k_panoptic_val.json lists .* 100 things and 50 stuff"):
        build_dataset(DataConfig(dataset="ade20k_panoptic", root=str(root)), "val", "panoptic")


def test_base_config_loads():
    from study.config import load_config
    from conftest import REPO

    cfg = load_config(REPO / "experiments" / "ade20k_panoptic.yaml")
    assert (cfg.data.dataset, cfg.model.num_classes, cfg.task) == ("ade20k_panoptic", 150, "panoptic")
    assert not cfg.model.reinit_class_head and cfg.train.epochs == 31
