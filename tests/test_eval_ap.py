"""Mask AP equals pycocotools' COCOeval run directly, on the real COCO samples (GT and perturbed results)."""
from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import data_dir
from study.eval.coco_ap import encode_mask, evaluate_masks, results_from_ground_truth
from study.eval.errors import SizeMismatchError, UnknownCategoryError, UnknownImageError

# pycocotools' mask.decode warns about numpy 2's copy keyword on every call; harmless.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _direct(gt: dict, results: list[dict]) -> np.ndarray:
    """The oracle: pycocotools exactly as its README runs it."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        dt = coco.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco, dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _perturbed(gt: dict, seed: int) -> list[dict]:
    """Shifted, eroded, dropped, relabelled masks with random scores, plus false positives."""
    rng = np.random.default_rng(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
    cat_ids = [c["id"] for c in gt["categories"]]
    out = []
    for a in gt["annotations"]:
        if a.get("iscrowd", 0) or rng.random() < 0.15:  # crowd never predicted; some objects missed
            continue
        m = coco.annToMask(a).astype(bool)
        r = rng.random()
        if r < 0.3:
            m = np.roll(m, tuple(rng.integers(-6, 7, size=2)), axis=(0, 1))
        elif r < 0.5:
            m = m & np.roll(m, 3, 0) & np.roll(m, -3, 1)
        cat = a["category_id"] if rng.random() > 0.1 else int(rng.choice(cat_ids))
        out.append({"image_id": a["image_id"], "category_id": cat, "segmentation": encode_mask(m),
                    "score": float(rng.random())})
        if rng.random() < 0.2:  # a spurious detection of a random box
            fp = np.zeros_like(m)
            y, x = rng.integers(0, m.shape[0] - 30), rng.integers(0, m.shape[1] - 30)
            fp[y:y + rng.integers(5, 30), x:x + rng.integers(5, 30)] = True
            out.append({"image_id": a["image_id"], "category_id": int(rng.choice(cat_ids)),
                        "segmentation": encode_mask(fp), "score": float(rng.random())})
    return out


@pytest.fixture(scope="module")
def coco_mini():
    return json.loads((data_dir("coco_mini") / "annotations" / "instances_val2017.json").read_text())


@pytest.fixture(scope="module")
def detection_format():
    path = data_dir("coco_panoptic_sample") / "panoptic_coco_detection_format.json"
    return json.loads(path.read_text())


def test_ap_equals_cocoeval_gt_and_perturbed(coco_mini):
    perfect = results_from_ground_truth(coco_mini)
    ours = evaluate_masks(coco_mini, perfect)
    assert np.array_equal(ours["stats"], _direct(coco_mini, perfect))
    assert ours["AP"] == pytest.approx(1.0) and len(ours["stats"]) == 12
    for seed in (0, 1):
        res = _perturbed(coco_mini, seed)
        ours = evaluate_masks(coco_mini, res)
        direct = _direct(coco_mini, res)
        assert np.array_equal(ours["stats"], direct), (seed, ours["stats"], direct)
        assert 0.2 < ours["AP"] < 0.95


def test_id_zero_pitfall_handled(detection_format):
    gt = detection_format
    assert min(a["id"] for a in gt["annotations"]) == 0
    perfect = results_from_ground_truth(gt)
    naive = _direct(gt, perfect)
    # pycocotools' id-0 pitfall: the detection matched to GT id 0 counts as unmatched (README: 0.981; with
    # pycocotools 2.0.11 all 50 GT masks as results give 0.9904).
    assert naive[0] < 0.995
    ours = evaluate_masks(gt, perfect)
    assert ours["AP"] == pytest.approx(1.0)
    # The oracle on correctly numbered ids (shifted by one here, our code renumbers 1..N) agrees exactly.
    fixed = copy.deepcopy(gt)
    for a in fixed["annotations"]:
        a["id"] += 1
    assert np.array_equal(ours["stats"], _direct(fixed, perfect))
    res = _perturbed(gt, 2)
    assert np.array_equal(evaluate_masks(gt, res)["stats"], _direct(fixed, res))


def test_per_class_ap_matches_precision_array(coco_mini):
    res = _perturbed(coco_mini, 5)
    ours = evaluate_masks(coco_mini, res)
    vals = [v for v in ours["per_class"].values() if not np.isnan(v)]
    assert np.mean(vals) == pytest.approx(ours["AP"], abs=1e-12)  # AP is the mean of per-class APs


def test_empty_results_score_zero(coco_mini):
    out = evaluate_masks(coco_mini, [])
    assert out["AP"] == 0 and len(out["stats"]) == 12


def test_bad_results(coco_mini):
    good = results_from_ground_truth(coco_mini)[:3]
    im = coco_mini["images"][0]
    bad = copy.deepcopy(good)
    bad[0]["image_id"] = 123456789
    with pytest.raises(UnknownImageError, match="123456789"):
        evaluate_masks(coco_mini, bad)
    bad = copy.deepcopy(good)
    bad[0]["category_id"] = 999
    with pytest.raises(UnknownCategoryError, match=r"999"):
        evaluate_masks(coco_mini, bad)
    wrong = {"image_id": im["id"], "category_id": coco_mini["categories"][0]["id"], "score": 0.5,
             "segmentation": encode_mask(np.ones((im["height"] + 1, im["width"]), bool))}
    with pytest.raises(SizeMismatchError, match=str(im["id"])):
        evaluate_masks(coco_mini, [wrong])


def test_encode_mask_round_trip():
    m = np.random.default_rng(0).random((37, 53)) > 0.5
    assert (mask_utils.decode(encode_mask(m)).astype(bool) == m).all()
