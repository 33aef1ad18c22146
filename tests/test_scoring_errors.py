"""Scoring refuses what the official tools would reject or silently mis-score (issue 12 item 3).

Each bad input ends in one UserError naming the file, the image id and the field; the RLE check is held
against pycocotools' own encoder and decoder.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import data_dir, oracle
from study.data.rle import RLEError, check_segmentation, decode_counts
from study.errors import UserError
from study.eval.coco_ap import (encode_mask, evaluate_masks, results_from_ground_truth, run_with_time_limit,
                                score_instance_files)
from study.eval.errors import EvalTimeoutError
from study.eval.miou import score_semantic_dirs
from study.eval.pq_files import score_panoptic_files

mask_utils = oracle("pycocotools.mask")


# ------------------------------------------------------------------------------------------- panoptic


@pytest.fixture
def panoptic(tmp_path):
    """The COCO panoptic sample as GT and as its own prediction (JSON + PNG folders), in tmp_path."""
    root = data_dir("coco_panoptic_sample")
    gt = json.loads((root / "panoptic_examples.json").read_text())
    gt["categories"] = json.loads((root / "panoptic_coco_categories.json").read_text())
    shutil.copytree(root / "panoptic_examples", tmp_path / "gt")
    shutil.copytree(root / "panoptic_examples", tmp_path / "pred")
    pred = {"annotations": copy.deepcopy(gt["annotations"])}
    return tmp_path, gt, pred


def _score(tmp: Path, gt: dict, pred: dict):
    (tmp / "gt.json").write_text(json.dumps(gt))
    (tmp / "pred.json").write_text(json.dumps(pred))
    return score_panoptic_files(tmp / "gt.json", tmp / "pred.json", tmp / "gt", tmp / "pred")


def test_panoptic_sound_input_scores_100(panoptic):
    tmp, gt, pred = panoptic
    assert _score(tmp, gt, pred)["All"]["pq"] == pytest.approx(1.0)


def test_duplicate_image_id_in_prediction(panoptic):
    tmp, gt, pred = panoptic
    # a second entry for the first image that predicts nothing: last-wins would score PQ < 1 silently
    dup = dict(pred["annotations"][0], segments_info=[])
    pred["annotations"].append(dup)
    image = dup["image_id"]
    with pytest.raises(UserError, match=rf"pred.json: image id {image} has two annotations.*'image_id'"):
        _score(tmp, gt, pred)


def test_duplicate_image_id_in_ground_truth(panoptic):
    tmp, gt, pred = panoptic
    gt["annotations"].append(copy.deepcopy(gt["annotations"][0]))  # today: the image counts twice
    image = gt["annotations"][0]["image_id"]
    with pytest.raises(UserError, match=rf"gt.json: image id {image} has two annotations"):
        _score(tmp, gt, pred)


@pytest.mark.parametrize("value", [3.7, "3", None])
def test_panoptic_category_id_not_an_integer(panoptic, value):
    tmp, gt, pred = panoptic
    seg = pred["annotations"][1]["segments_info"][0]
    seg["category_id"] = value if value != 3.7 else seg["category_id"] + 0.7  # int() would truncate it back
    image = pred["annotations"][1]["image_id"]
    with pytest.raises(UserError, match=rf"pred.json: image id {image}: segments_info\[0\] field 'category_id' "
                                        r"must be an integer"):
        _score(tmp, gt, pred)


def test_duplicate_category_id_in_panoptic_ground_truth(panoptic):
    tmp, gt, pred = panoptic
    gt["categories"].append(dict(gt["categories"][0], name="phantom"))
    with pytest.raises(UserError, match=rf"gt.json: category id {gt['categories'][0]['id']} is listed twice"):
        _score(tmp, gt, pred)


def test_panoptic_json_that_is_a_list(panoptic):
    tmp, gt, pred = panoptic
    with pytest.raises(UserError, match=r"pred.json holds a JSON list; expected an object"):
        _score(tmp, gt, pred["annotations"])


# ------------------------------------------------------------------------------------------- instance


@pytest.fixture
def coco_mini(tmp_path):
    gt = json.loads((data_dir("coco_mini") / "annotations" / "instances_val2017.json").read_text())
    return tmp_path, gt


def _score_files(tmp: Path, gt: dict, results) -> dict:
    (tmp / "gt.json").write_text(json.dumps(gt))
    (tmp / "res.json").write_text(json.dumps(results))
    return score_instance_files(tmp / "gt.json", tmp / "res.json")


@pytest.mark.parametrize("bad", ["nan_all", "inf", "string", "none"])
def test_non_finite_or_non_numeric_scores(coco_mini, bad):
    tmp, gt = coco_mini
    res = results_from_ground_truth(gt)
    if bad == "nan_all":  # today: AP 100 from all-NaN scores
        for r in res:
            r["score"] = float("nan")
    else:
        res[2]["score"] = {"inf": float("inf"), "string": "0.9", "none": None}[bad]
    k = 0 if bad == "nan_all" else 2
    with pytest.raises(UserError, match=rf"res.json: image .*\(id {res[k]['image_id']}\): result {k} field "
                                        r"'score' .* expected a finite number"):
        _score_files(tmp, gt, res)


@pytest.mark.parametrize("value", [1.5, "1", True])
def test_instance_category_id_not_an_integer(coco_mini, value):
    tmp, gt = coco_mini
    res = results_from_ground_truth(gt)
    res[1]["category_id"] = res[1]["category_id"] + 0.5 if value == 1.5 else value
    with pytest.raises(UserError, match=rf"res.json: image .*id {res[1]['image_id']}.*result 1 field "
                                        r"'category_id' must be an integer"):
        _score_files(tmp, gt, res)


def test_instance_ground_truth_duplicate_category_and_image_ids(coco_mini):
    tmp, gt = coco_mini
    bad = copy.deepcopy(gt)
    bad["categories"].append(dict(bad["categories"][0], name="phantom"))
    with pytest.raises(UserError, match=rf"gt.json: the ground truth lists category id "
                                        rf"{gt['categories'][0]['id']} twice"):
        _score_files(tmp, bad, results_from_ground_truth(gt))
    bad = copy.deepcopy(gt)
    bad["images"].append(dict(bad["images"][0]))
    with pytest.raises(UserError, match=rf"image id {gt['images'][0]['id']} twice"):
        _score_files(tmp, bad, results_from_ground_truth(gt))


def _bad_counts(rle: dict, how: str) -> str:
    c = rle["counts"]
    if how == "cut":  # the last value's continuation bit set, nothing after it
        return c + "o"
    if how == "char":
        return c[:3] + "~" + c[4:]
    if how == "short":  # runs cover fewer pixels than the image: rleIou then loops forever
        runs = decode_counts(c)[:-1].tolist()  # pycocotools' own encoder writes the shortened runs
        return mask_utils.frPyObjects({"counts": runs, "size": rle["size"]}, *rle["size"])["counts"].decode()
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["cut", "char", "short"])
def test_malformed_rle_is_refused_before_pycocotools(coco_mini, how):
    tmp, gt = coco_mini
    res = results_from_ground_truth(gt)
    res[0]["segmentation"]["counts"] = _bad_counts(res[0]["segmentation"], how)
    with pytest.raises(UserError, match=rf"res.json: image .*id {res[0]['image_id']}.*result 0 field "
                                        r"'segmentation' is malformed"):
        _score_files(tmp, gt, res)


def test_rle_decoder_matches_pycocotools_on_real_masks(coco_mini):
    """Our decoder reads pycocotools' own encoding of real and random masks to the exact run lengths."""
    _, gt = coco_mini
    images = {im["id"]: im for im in gt["images"]}
    masks = []
    for a in gt["annotations"][:40]:
        im = images[a["image_id"]]
        seg = a["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, im["height"], im["width"])) if isinstance(seg, list) \
            else mask_utils.frPyObjects(seg, im["height"], im["width"])
        masks.append(mask_utils.decode(rle).astype(bool))
    rng = np.random.default_rng(0)
    masks += [rng.random((61, 47)) > p for p in (0.01, 0.5, 0.99)]
    masks += [np.zeros((9, 7), bool), np.ones((9, 7), bool), np.zeros((300, 400), bool)]
    for m in masks:
        rle = encode_mask(m)
        flat = m.T.reshape(-1)  # column-major, as COCO
        bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
        runs = np.diff(bounds).tolist()
        runs = [0] + runs if flat[0] else runs  # the first run is background, maybe empty
        assert decode_counts(rle["counts"]).tolist() == runs
        check_segmentation(rle, *m.shape)  # accepted
        assert int(mask_utils.area(rle)) == int(m.sum())
    # and every single-character change of a real RLE is either refused or still a sound RLE pycocotools
    # decodes to the right size
    rle = encode_mask(masks[0])
    for pos in range(0, len(rle["counts"]), max(1, len(rle["counts"]) // 25)):
        for ch in "0Oo_~ ":
            bad = dict(rle, counts=rle["counts"][:pos] + ch + rle["counts"][pos + 1:])
            try:
                check_segmentation(bad, *masks[0].shape)
            except RLEError:
                continue
            assert mask_utils.decode({"size": bad["size"], "counts": bad["counts"].encode()}).shape == masks[0].shape


def test_native_call_time_limit():
    import time

    with pytest.raises(EvalTimeoutError, match="time limit of 1 s"):
        run_with_time_limit(time.sleep, (60,), 1.0, "a stuck call")
    assert run_with_time_limit(sum, ([1, 2, 3],), 30.0, "sum") == 6


def test_ap_in_child_process_equals_in_process(coco_mini):
    _, gt = coco_mini
    res = results_from_ground_truth(gt)
    for r in res[::3]:
        r["score"] = 0.3
    res = res[::2]
    assert evaluate_masks(gt, res)["stats"] == evaluate_masks(gt, res, timeout_s=None)["stats"]


# ------------------------------------------------------------------------------------------- semantic


@pytest.fixture
def labels(tmp_path):
    rng = np.random.default_rng(0)
    for d in ("gt", "pred"):
        (tmp_path / d).mkdir()
    for i in range(2):
        lab = rng.integers(0, 4, size=(8, 9)).astype(np.uint8)  # ADE20K-style: 0 = ignore, 1..3 = classes
        Image.fromarray(lab).save(tmp_path / "gt" / f"{i}.png")
        Image.fromarray(lab).save(tmp_path / "pred" / f"{i}.png")
    return tmp_path


def test_label_offset_out_of_range(labels):
    assert score_semantic_dirs(labels / "gt", labels / "pred", 3, label_offset=1)["miou"] == pytest.approx(1.0)
    with pytest.raises(UserError, match=r"--label-offset -1 is out of range"):
        score_semantic_dirs(labels / "gt", labels / "pred", 3, label_offset=-1)
    with pytest.raises(UserError, match=r"--pred-label-offset 70000 is out of range"):
        score_semantic_dirs(labels / "gt", labels / "pred", 3, label_offset=1, pred_label_offset=70000)
    # an offset above every label value: today everything is ignored and mIoU is 0 with no warning
    with pytest.raises(UserError, match=r"no ground-truth pixel .* --label-offset 200"):
        score_semantic_dirs(labels / "gt", labels / "pred", 3, label_offset=200)
    with pytest.raises(UserError, match=r"ignore index 255 falls on class"):
        score_semantic_dirs(labels / "gt", labels / "pred", 60, label_offset=200)


def test_uncompressed_rle_whose_int64_sum_wraps_is_refused():
    """Runs that each fit in 62 bits but add up past 2^63: an int64 sum wraps around to the image's pixel
    count, which the total check alone would accept; a run longer than the image is refused first."""
    from study.data.rle import RLEError, check_segmentation

    h, w = 4, 4
    counts = [2 ** 61] * 8 + [h * w]  # 8 * 2^61 = 2^64 wraps to 0 in int64
    with pytest.raises(RLEError, match=r"run 1 of the RLE has length 2305843009213693952, more than the 16"):
        check_segmentation({"size": [h, w], "counts": counts}, h, w)
    check_segmentation({"size": [h, w], "counts": [3, 13]}, h, w)  # a valid one still passes
