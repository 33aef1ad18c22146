"""The paper's metric protocol (study.eval.protocol) against the official EoMT code's own metric path.

PQ: the official Lightning module's ``update_metrics_panoptic`` (loaded by path, tests/official_oracle.py) on
torchmetrics' PanopticQuality built as its ``init_metrics_panoptic`` builds it, then ``compute()[:-1]`` and the
means of ``_on_eval_epoch_end_panoptic``. AP: torchmetrics' MeanAveragePrecision(iou_type="segm"), which the
official module just calls. mIoU: MulticlassJaccardIndex(average=None).mean(), likewise.

Tolerances: torchmetrics divides integer pixel counts into a float32 IoU (our protocol: float64); a float32
quotient is within 2^-24 (6e-8) relative of the float64 one, and a per-class mean of such numbers in [0, 1]
stays within that, so 1e-6 is a bound with margin. AP: both run pycocotools' COCOeval on the same masks and
float32-exact scores: the same computation, 1e-12. mIoU: torchmetrics' float32 division vs our float64: 1e-6.
"""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import data_dir, require
from official_oracle import official
from study.eval.bench_score import _perturb
from study.eval.pq import rgb_to_id
from study.eval.protocol import OfficialPQ

PQ_TOL = 1e-6  # float32 IoU in torchmetrics (see the module docstring)


def _sample():
    d = data_dir("coco_panoptic_sample")
    gt = json.loads((d / "panoptic_examples.json").read_text())
    cats = json.loads((d / "panoptic_coco_categories.json").read_text())
    images = [(a, rgb_to_id(np.asarray(Image.open(d / "panoptic_examples" / a["file_name"]).convert("RGB"))))
              for a in gt["annotations"]]
    return cats, images


def _official_pq(cats, items):
    """items: (gt_ids, gt_segs, pred_ids, pred_segs) -> the official module's per-class (C, 3) and means."""
    lm = official("training.lightning_module")
    tm = require("torchmetrics.detection")
    index = {c["id"]: k for k, c in enumerate(cats)}
    stuff = [k for k, c in enumerate(cats) if not c["isthing"]]
    things = [k for k, c in enumerate(cats) if c["isthing"]]
    metric = tm.PanopticQuality(things, stuff + [len(cats)], return_sq_and_rq=True, return_per_class=True)
    fake = types.SimpleNamespace(metrics=[metric])
    for g_ids, g_segs, p_ids, p_segs in items:
        tgt = -torch.ones((*g_ids.shape, 2), dtype=torch.long)
        for j, s in enumerate(g_segs):
            m = torch.from_numpy(g_ids == s["id"])
            tgt[m] = torch.tensor([index[s["category_id"]], j])
        pred = -torch.ones((*p_ids.shape, 2), dtype=torch.long)
        pred[..., 0] = len(cats)  # unassigned pixels: the appended class (to_per_pixel_preds_panoptic)
        for j, s in enumerate(p_segs):
            m = torch.from_numpy(p_ids == s["id"])
            pred[m] = torch.tensor([index[s["category_id"]], j])
        crowd = torch.tensor([bool(s.get("iscrowd", 0)) for s in g_segs])
        lm.LightningModule.update_metrics_panoptic(fake, [pred], [tgt], [crowd], 0)
    result = metric.compute()[:-1].double()
    n_things = len(metric.things)
    return result, {"All": result.mean(0), "Things": result[:n_things].mean(0), "Stuff": result[n_things:].mean(0)}


def _ours(cats, items):
    acc = OfficialPQ(cats)
    for g_ids, g_segs, p_ids, p_segs in items:
        acc.add(g_ids, g_segs, p_ids, p_segs)
    return acc.summary()


def _compare(cats, items):
    per_class, groups = _official_pq(cats, items)
    ours = _ours(cats, items)
    for name in ("All", "Things", "Stuff"):
        np.testing.assert_allclose([ours[name][k] for k in ("pq", "sq", "rq")], groups[name].numpy(), atol=PQ_TOL,
                                   err_msg=name)
    # torchmetrics' rows: things (sorted contiguous ids), then stuff
    order = [k for k, c in enumerate(cats) if c["isthing"]] + [k for k, c in enumerate(cats) if not c["isthing"]]
    mine = np.array([[ours["per_class"][cats[k]["id"]][m] for m in ("pq", "sq", "rq")] for k in order])
    np.testing.assert_allclose(mine, per_class.numpy(), atol=PQ_TOL)
    return ours


def test_official_pq_equals_the_official_code_on_the_sample_and_perturbations():
    cats, images = _sample()
    present = sorted({s["category_id"] for a, _ in images for s in a["segments_info"]})
    rng = np.random.default_rng(0)
    items = [(ids, a["segments_info"], ids, a["segments_info"]) for a, ids in images]
    ours = _compare(cats, items)
    assert ours["All"]["pq"] == pytest.approx(8 / 133)  # 8 perfect classes, 125 absent ones counting 0
    for _ in range(3):
        items = []
        for a, ids in images:
            p_ids, p_segs = _perturb(ids, a["segments_info"], present, rng)
            items.append((ids, a["segments_info"], p_ids, p_segs))
        ours = _compare(cats, items)
        assert 0 < ours["All"]["pq"] < 8 / 133


def test_official_pq_stuff_crowd_quirk_matches_the_official_code():
    """A crowd segment listed first makes every stuff segment of the image crowd in the official code (its crowd
    flags are indexed by instance id, and a stuff segment's is 0): ours must reproduce it."""
    cats, images = _sample()
    present = sorted({s["category_id"] for a, _ in images for s in a["segments_info"]})
    rng = np.random.default_rng(1)
    items = []
    for a, ids in images:
        segs = sorted(a["segments_info"], key=lambda s: -s.get("iscrowd", 0))  # a crowd segment first
        assert segs[0]["iscrowd"] == 1
        p_ids, p_segs = _perturb(ids, segs, present, rng)
        items.append((ids, segs, p_ids, p_segs))
    ours = _compare(cats, items)
    stuff_fn = sum(r["fn"] for c, r in ours["per_class"].items() if not next(x for x in cats if x["id"] == c)["isthing"])
    assert stuff_fn == 0  # every stuff GT segment is crowd here: never a false negative


def test_official_ap_equals_torchmetrics_mean_average_precision():
    tm = require("torchmetrics.detection")
    from pycocotools import mask as mu

    from study.eval.coco_ap import evaluate_masks, prepare_ground_truth
    from study.eval.protocol import official_ap

    gt = json.loads((data_dir("coco_mini") / "annotations" / "instances_val2017.json").read_text())
    keep = {im["id"] for im in gt["images"][:12]}
    gt["images"] = [im for im in gt["images"] if im["id"] in keep]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    g = prepare_ground_truth(gt)
    rng = np.random.default_rng(0)
    metric = tm.MeanAveragePrecision(iou_type="segm")
    results = []
    for im in g["images"]:
        h, w = im["height"], im["width"]
        anns = [a for a in g["annotations"] if a["image_id"] == im["id"]]
        def mask(a):
            s = a["segmentation"]
            r = mu.merge(mu.frPyObjects(s, h, w)) if isinstance(s, list) else (
                mu.frPyObjects(s, h, w) if isinstance(s["counts"], list) else s)
            return mu.decode(r).astype(bool)
        gm = [mask(a) for a in anns]
        pm, ps, pl = [], [], []
        for a, m in zip(anns, gm):
            if rng.random() < 0.2:
                continue
            pm.append(np.roll(m, tuple(rng.integers(-6, 7, 2)), (0, 1)))
            ps.append(float(np.float32(rng.random())))  # float32-exact: torchmetrics keeps scores in float32
            pl.append(a["category_id"])
        from study.eval.coco_ap import encode_mask
        results += [{"image_id": im["id"], "category_id": c, "segmentation": encode_mask(m), "score": s}
                    for m, s, c in zip(pm, ps, pl)]
        empty = torch.zeros((0, h, w), dtype=torch.bool)
        metric.update([{"masks": torch.from_numpy(np.stack(pm)) if pm else empty, "scores": torch.tensor(ps),
                        "labels": torch.tensor(pl, dtype=torch.long)}],
                      [{"masks": torch.from_numpy(np.stack(gm)) if gm else empty,
                        "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.long),
                        "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.long)}])
    ref = metric.compute()
    ours = official_ap(g, results)
    names = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
             "mar_small", "mar_medium", "mar_large"]
    np.testing.assert_allclose(ours["stats"], [float(ref[n]) for n in names], atol=1e-12)
    for engine in ("pycocotools", "faster-coco-eval"):
        np.testing.assert_allclose(official_ap(g, results, engine=engine)["stats"], ours["stats"], atol=1e-12)
    standard = evaluate_masks(g, results, prepared=True)
    assert abs(standard["AP"] - ours["AP"]) > 1e-5  # the float32 thresholds move AP on this set


def test_official_miou_equals_torchmetrics_jaccard():
    tm = require("torchmetrics.classification")
    from study.eval.miou import ConfusionMatrix

    rng = np.random.default_rng(0)
    d = data_dir("ade20k_sample") / "annotations"
    cm = ConfusionMatrix(150, 255)
    metric = tm.MulticlassJaccardIndex(num_classes=150, ignore_index=255, average=None, validate_args=False)
    for p in sorted(d.glob("*.png")):
        lab = np.asarray(Image.open(p)).astype(np.int64) - 1
        lab[lab < 0] = 255
        pred = np.where(rng.random(lab.shape) < 0.1, rng.integers(0, 150, lab.shape), np.where(lab == 255, 0, lab))
        cm.add(lab, pred)
        metric.update(torch.from_numpy(pred)[None], torch.from_numpy(lab)[None])
    assert cm.summary()["miou_all_classes"] == pytest.approx(float(metric.compute().double().mean()), abs=1e-6)


def test_score_commands_report_the_official_protocol_beside_the_standard_one(tmp_path, capsys):
    from study.eval.cli import main

    d = data_dir("coco_panoptic_sample")
    out = tmp_path / "pq.json"
    assert main(["score", "panoptic", "--gt-json", str(d / "panoptic_examples.json"), "--pred-json",
                 str(d / "panoptic_examples.json"), "--categories", str(d / "panoptic_coco_categories.json"),
                 "--protocol", "official", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["engine"] == "hotcoco" and r["protocol"] == "standard" and r["All"]["pq"] == 1.0
    assert r["official"]["protocol"] == "official" and r["official"]["All"]["pq"] == pytest.approx(8 / 133)
    assert "the paper's protocol" in capsys.readouterr().out
    a = data_dir("ade20k_sample") / "annotations"
    out = tmp_path / "miou.json"
    assert main(["score", "semantic", "--gt-dir", str(a), "--pred-dir", str(a), "--num-classes", "150",
                 "--label-offset", "1", "--protocol", "official", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["protocol"] == "standard" and r["engine"] == "ours" and r["reported"] == "miou"  # the standard one
    assert r["official"] == {"protocol": "official", "miou": pytest.approx(0.1)}  # beside it: all 150 classes
    assert r["miou_all_classes"] == pytest.approx(0.1)
