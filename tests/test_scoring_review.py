"""Faults found by reading the scoring change: each ends in one error naming its cause, never a traceback,
whatever the engine."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from conftest import data_dir
from test_faults_scoring import sample  # noqa: F401 (the panoptic sample fixture)
from study.eval.coco_ap import evaluate_masks, results_from_ground_truth
from study.eval.errors import EvalInputError, UnknownCategoryError, UnknownImageError, UnknownSegmentError


@pytest.fixture(scope="module")
def coco_mini():
    return json.loads((data_dir("coco_mini") / "annotations" / "instances_val2017.json").read_text())


@pytest.mark.parametrize("field,value,error", [("image_id", 2 ** 63, UnknownImageError),
                                               ("category_id", 2 ** 64, UnknownCategoryError),
                                               ("score", 10 ** 400, EvalInputError)])
def test_integers_beyond_int64_and_float64_are_refused_not_a_traceback(coco_mini, field, value, error):
    results = results_from_ground_truth(copy.deepcopy(coco_mini))[:5]
    results[2][field] = value
    with pytest.raises(error):
        evaluate_masks(copy.deepcopy(coco_mini), results)


@pytest.mark.parametrize("flag", [2, -1, "1"])
def test_instance_ground_truth_follows_the_one_crowd_rule(coco_mini, flag):
    gt = copy.deepcopy(coco_mini)
    results = results_from_ground_truth(copy.deepcopy(coco_mini))[:5]
    gt["annotations"][0]["iscrowd"] = flag
    with pytest.raises(EvalInputError, match="iscrowd .*expected 0 or 1"):
        evaluate_masks(gt, results)


def test_panopticapi_engine_names_a_pixel_fault_instead_of_a_traceback(sample):
    """A segment drawn in the prediction PNG but absent from its JSON: panopticapi raises a bare KeyError."""
    from study.eval.pq_files import score_panoptic_files

    tmp_path, gt = sample  # the COCO panoptic sample, its PNGs copied to tmp_path / "gt"
    pred = copy.deepcopy(gt)
    pred["annotations"][0]["segments_info"] = pred["annotations"][0]["segments_info"][1:]  # one id unlisted
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    for engine in ("hotcoco", "panopticapi"):
        with pytest.raises(UnknownSegmentError):
            score_panoptic_files(tmp_path / "gt.json", tmp_path / "pred.json", tmp_path / "gt", tmp_path / "gt",
                                 engine=engine)


def test_ground_truth_in_uncompressed_rle_without_a_bbox_is_scored(coco_mini):
    """An annotation in uncompressed RLE (counts a list) and no bbox: its box is computed (it was a TypeError)."""
    from pycocotools import mask as mask_utils

    gt = copy.deepcopy(coco_mini)
    a = next(x for x in gt["annotations"] if isinstance(x["segmentation"], list))
    im = next(i for i in gt["images"] if i["id"] == a["image_id"])
    m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], im["height"], im["width"])))
    flat = m.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    a["segmentation"] = {"size": [im["height"], im["width"]], "counts": counts}
    del a["bbox"]
    results = results_from_ground_truth(copy.deepcopy(coco_mini))
    assert evaluate_masks(gt, results)["stats"][0] > 0.9  # the converted annotation still matches its result
