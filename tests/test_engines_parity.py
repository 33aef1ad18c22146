"""Every scoring engine gives the official tools' numbers, to 1e-9 (study.eval.engines).

PQ: hotcoco, panopticapi and ours against panopticapi's pq_compute on the COCO panoptic sample and random
perturbations of it (crowd and void as they come in the sample). AP: hotcoco, pycocotools and
faster-coco-eval against pycocotools' COCOeval on coco_mini val with shifted GT masks as predictions.
Different programs (Rust, C, numpy) sum in other orders: 1e-9 is far above float64 rounding of sums of at
most a few hundred terms (about 1e-13) and far below any real difference (one TP moves PQ by > 1e-4).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest

from conftest import data_dir, require
from study.eval.bench_score import build

TOL = 1e-9


@pytest.fixture(scope="module")
def panoptic_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("pq")
    gt_json, gt_dir, pred_json, pred_dir = build(data_dir("coco_panoptic_sample"), out, copies=3, seed=5)
    return gt_json, gt_dir, pred_json, pred_dir


@pytest.mark.parametrize("engine", ["hotcoco", "panopticapi", "ours"])
def test_pq_engines_equal_panopticapi(panoptic_set, engine):
    pan = require("panopticapi.evaluation")
    from study.eval.pq_files import score_panoptic_files

    gt_json, gt_dir, pred_json, pred_dir = panoptic_set
    with contextlib.redirect_stdout(io.StringIO()):
        ref = pan.pq_compute(str(gt_json), str(pred_json), str(gt_dir), str(pred_dir))
    ours = score_panoptic_files(gt_json, pred_json, gt_dir, pred_dir, workers=1, engine=engine)
    assert ours["engine"] == engine
    for g in ("All", "Things", "Stuff"):
        for k in ("pq", "sq", "rq"):
            assert ours[g][k] == pytest.approx(ref[g][k], abs=TOL), (g, k)
        assert ours[g]["n"] == ref[g]["n"]
    for cid, r in ref["per_class"].items():
        for k in ("pq", "sq", "rq"):
            assert ours["per_class"][cid][k] == pytest.approx(r[k], abs=TOL), (cid, k)
    assert 0.3 < ours["All"]["pq"] < 0.99  # perturbed: neither trivial nor perfect


@pytest.fixture(scope="module")
def instance_set():
    from pycocotools import mask as mu

    from study.eval.coco_ap import encode_mask, prepare_ground_truth

    gt = json.loads((data_dir("coco_mini") / "annotations" / "instances_val2017.json").read_text())
    g = prepare_ground_truth(gt)
    rng = np.random.default_rng(3)
    ims = {im["id"]: im for im in g["images"]}
    cats = [c["id"] for c in g["categories"]]
    res = []
    for a in g["annotations"]:
        im = ims[a["image_id"]]
        h, w = im["height"], im["width"]
        s = a["segmentation"]
        rle = mu.merge(mu.frPyObjects(s, h, w)) if isinstance(s, list) else (
            mu.frPyObjects(s, h, w) if isinstance(s["counts"], list) else s)
        m = np.roll(mu.decode(rle).astype(bool), tuple(rng.integers(-5, 6, 2)), (0, 1))
        cat = a["category_id"] if rng.random() > 0.1 else int(rng.choice(cats))
        res.append({"image_id": a["image_id"], "category_id": cat, "segmentation": encode_mask(m),
                    "score": float(rng.random())})
    return g, res


@pytest.mark.parametrize("engine", ["hotcoco", "pycocotools", "faster-coco-eval"])
def test_ap_engines_equal_pycocotools(instance_set, engine):
    from study.eval.coco_ap import cocoeval_pycocotools, evaluate_masks

    g, res = instance_set
    ref = cocoeval_pycocotools(g, res)
    ours = evaluate_masks(g, res, prepared=True, engine=engine, timeout_s=None)
    assert ours["engine"] == engine
    np.testing.assert_allclose(ours["stats"], ref["stats"], atol=TOL)
    assert ours["per_class"].keys() == ref["per_class"].keys()
    np.testing.assert_allclose([ours["per_class"][c] for c in ref["per_class"]], list(ref["per_class"].values()),
                               atol=TOL)
    assert 0.2 < ours["AP"] < 0.95


@pytest.mark.parametrize("engine", ["hotcoco", "panopticapi", "ours"])
def test_strict_checks_refuse_whatever_the_engine(panoptic_set, tmp_path, engine):
    """The JSON checks run before every engine: a repeated segment id, an unknown category, a crowd flag
    of 2 and a missing prediction are refused with our error, naming the id."""
    from study.eval.errors import EvalInputError
    from study.eval.pq_files import score_panoptic_files

    gt_json, gt_dir, pred_json, pred_dir = panoptic_set
    gt, pred = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    cases = {
        "segment id 60000 is listed twice": lambda g, p: p["annotations"][0]["segments_info"].append(
            dict(p["annotations"][0]["segments_info"][-1], id=60000)) if any(
            s["id"] == 60000 for s in p["annotations"][0]["segments_info"]) else p["annotations"][0][
            "segments_info"].extend([{"id": 60000, "category_id": 1}] * 2),
        "category id 9999": lambda g, p: p["annotations"][0]["segments_info"][0].update(category_id=9999),
        "iscrowd 2": lambda g, p: g["annotations"][0]["segments_info"][0].update(iscrowd=2),
        "has no prediction": lambda g, p: p["annotations"].pop(),
    }
    for text, mutate in cases.items():
        g, p = json.loads(json.dumps(gt)), json.loads(json.dumps(pred))
        mutate(g, p)
        (tmp_path / "g.json").write_text(json.dumps(g))
        (tmp_path / "p.json").write_text(json.dumps(p))
        with pytest.raises(EvalInputError, match=text):
            score_panoptic_files(tmp_path / "g.json", tmp_path / "p.json", gt_dir, pred_dir, engine=engine)
