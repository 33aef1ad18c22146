"""PQ against the official panopticapi on the real COCO panoptic sample: GT vs itself and perturbations.

Every perturbation writes a prediction (JSON + PNGs) to a temporary folder; our scorer and panopticapi's
``pq_compute`` read the same files and must agree to 1e-9 on All / Things / Stuff and every class.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import data_dir, oracle
from study.eval.errors import (EvalInputError, MissingPredictionError, SizeMismatchError, UnknownCategoryError,
                               UnknownSegmentError)
from study.eval.pq import id_to_rgb, rgb_to_id
from study.eval.pq_files import score_panoptic_files

_panopticapi = oracle("panopticapi.evaluation")


@pytest.fixture(scope="module")
def sample():
    root = data_dir("coco_panoptic_sample")
    gt = json.loads((root / "panoptic_examples.json").read_text())
    gt["categories"] = json.loads((root / "panoptic_coco_categories.json").read_text())
    ids = {a["image_id"]: rgb_to_id(np.asarray(Image.open(root / "panoptic_examples" / a["file_name"])))
           for a in gt["annotations"]}
    return root, gt, ids


def _write_gt(tmp: Path, root: Path, gt: dict) -> Path:
    path = tmp / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def _write_pred(tmp: Path, preds: dict) -> tuple[Path, Path]:
    """preds: image_id -> (ids (H, W), segments_info, file_name)."""
    folder = tmp / "pred"
    folder.mkdir(exist_ok=True)
    anns = []
    for image_id, (ids, segs, name) in preds.items():
        Image.fromarray(id_to_rgb(ids)).save(folder / name)
        anns.append({"image_id": image_id, "file_name": name, "segments_info": segs})
    path = tmp / "pred.json"
    path.write_text(json.dumps({"annotations": anns}))
    return path, folder


def _assert_same(ours: dict, theirs: dict):
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == theirs[group]["n"], group
        for k in ("pq", "sq", "rq"):
            assert abs(ours[group][k] - theirs[group][k]) < 1e-9, (group, k, ours[group][k], theirs[group][k])
    assert set(ours["per_class"]) == set(theirs["per_class"])
    for cid, r in theirs["per_class"].items():
        for k in ("pq", "sq", "rq"):
            assert abs(ours["per_class"][cid][k] - r[k]) < 1e-9, (cid, k)


def _segs(gt_ann):
    return [{"id": s["id"], "category_id": s["category_id"]} for s in gt_ann["segments_info"]]


def _perturb(kind: str, gt: dict, ids: dict, rng: np.random.Generator) -> dict:
    cats = {c["id"]: c for c in gt["categories"]}
    out = {}
    for ann in gt["annotations"]:
        m = ids[ann["image_id"]].copy()
        segs = _segs(ann)
        name = ann["file_name"]
        info = {s["id"]: s for s in ann["segments_info"]}
        if kind == "identity":
            pass
        elif kind == "shift":  # every mask moved by a few pixels; void enters at the border
            m = np.roll(m, (9, -13), axis=(0, 1))
            m[:9] = 0
            present = set(np.unique(m).tolist())
            segs = [s for s in segs if s["id"] in present]
        elif kind == "drop":  # every third segment removed (its pixels become void)
            for s in segs[::3]:
                m[m == s["id"]] = 0
            segs = [s for i, s in enumerate(segs) if i % 3]
        elif kind == "relabel":  # some things and stuff get another category, one absent from the GT
            things = [c for c in cats if cats[c]["isthing"]]
            stuff = [c for c in cats if not cats[c]["isthing"]]
            for i, s in enumerate(segs):
                if i % 4 == 1:
                    pool = things if cats[s["category_id"]]["isthing"] else stuff
                    s["category_id"] = int(rng.choice(pool))
        elif kind == "merge_split":  # two non-crowd things merged; the largest stuff segment split in two
            same = [s for s in segs if not info[s["id"]]["iscrowd"] and cats[s["category_id"]]["isthing"]]
            by_cat = {}
            for s in same:
                by_cat.setdefault(s["category_id"], []).append(s)
            pair = next((v for v in by_cat.values() if len(v) >= 2), None)
            if pair:
                m[m == pair[1]["id"]] = pair[0]["id"]
                segs = [s for s in segs if s["id"] != pair[1]["id"]]
            stuff = [s for s in segs if not cats[s["category_id"]]["isthing"]]
            big = max(stuff, key=lambda s: info[s["id"]]["area"])
            cols = np.nonzero((m == big["id"]).any(0))[0]
            half = (m == big["id"]) & (np.arange(m.shape[1])[None] >= cols[len(cols) // 3])
            m[half] = 7777
            segs.append({"id": 7777, "category_id": big["category_id"]})
        elif kind == "crowd_void":  # predictions on crowd regions and on void, segments grown into void
            crowd = [s for s in ann["segments_info"] if s["iscrowd"]]
            for k, c in enumerate(crowd):  # crowd split into person-like pieces and a wrong-class piece
                ys, xs = np.nonzero(m == c["id"])
                left = (m == c["id"]) & (np.arange(m.shape[1])[None] < np.median(xs))
                m[left] = 9000 + k
                segs.append({"id": 9000 + k, "category_id": c["category_id"]})
                rest = m == c["id"]
                m[rest & (np.arange(m.shape[0])[:, None] < np.median(ys))] = 9100 + k
                segs.append({"id": 9100 + k, "category_id": 2 if c["category_id"] != 2 else 3})
            void = ids[ann["image_id"]] == 0
            ys, xs = np.nonzero(void)
            if ys.size:  # a segment made mostly of void pixels plus a bit of a thing
                block = np.zeros_like(void)
                block[max(ys.min() - 3, 0):ys.min() + 20, max(xs.min() - 3, 0):xs.min() + 20] = True
                m[block] = 9500
                segs.append({"id": 9500, "category_id": 1})
            present = set(np.unique(m).tolist())
            segs = [s for s in segs if s["id"] in present]
        elif kind == "noise":  # random rectangles of random existing segments and new ids
            for j in range(12):
                y, x = rng.integers(0, m.shape[0] - 40), rng.integers(0, m.shape[1] - 40)
                h, w = rng.integers(5, 120, size=2)
                src = segs[rng.integers(len(segs))]
                m[y:y + h, x:x + w] = src["id"] if j % 2 else 50000 + j
                if not j % 2:
                    segs.append({"id": 50000 + j, "category_id": src["category_id"]})
            present = set(np.unique(m).tolist())
            segs = [s for s in segs if s["id"] in present]
        out[ann["image_id"]] = (m, segs, name)
    return out


KINDS = ["identity", "shift", "drop", "relabel", "merge_split", "crowd_void", "noise"]


@pytest.mark.parametrize("kind", KINDS)
def test_pq_equals_panopticapi(kind, sample, tmp_path, capsys):
    root, gt, ids = sample
    gt_json = _write_gt(tmp_path, root, gt)
    pred_json, pred_dir = _write_pred(tmp_path, _perturb(kind, gt, ids, np.random.default_rng(3)))
    theirs = _panopticapi.pq_compute(str(gt_json), str(pred_json), str(root / "panoptic_examples"), str(pred_dir))
    ours = score_panoptic_files(gt_json, pred_json, root / "panoptic_examples", pred_dir)
    _assert_same(ours, theirs)
    if kind == "identity":  # the README's fact: 100 over 8 categories, 4 things and 4 stuff
        assert ours["All"]["pq"] == 1.0 and ours["All"]["n"] == 8 and ours["Things"]["n"] == 4
    else:
        assert ours["All"]["pq"] < 1.0  # the perturbation is visible
    # Threads give the same sums.
    ours2 = score_panoptic_files(gt_json, pred_json, root / "panoptic_examples", pred_dir, workers=2)
    _assert_same(ours2, theirs)


def test_pq_crowd_and_void_rules_are_exercised(sample, tmp_path):
    """The crowd/void perturbation must hit the FP exemption (else the test above proves little)."""
    root, gt, ids = sample
    gt_json = _write_gt(tmp_path, root, gt)
    pred = _perturb("crowd_void", gt, ids, np.random.default_rng(0))
    pred_json, pred_dir = _write_pred(tmp_path, pred)
    ours = score_panoptic_files(gt_json, pred_json, root / "panoptic_examples", pred_dir)
    person = ours["per_class"][1]
    # The person crowd pieces lie entirely on a same-class crowd region: not false positives.
    n_new_person = sum(1 for m, segs, _ in pred.values() for s in segs if s["id"] >= 9000
                       and s["category_id"] == 1)
    assert n_new_person >= 2 and person["fp"] < n_new_person


# ------------------------------------------------------------------------------------------- bad input


def _bad_case(sample, tmp_path, edit):
    root, gt, ids = sample
    gt_json = _write_gt(tmp_path, root, gt)
    pred = _perturb("identity", gt, ids, np.random.default_rng(0))
    edit(pred)
    pred_json, pred_dir = _write_pred(tmp_path, pred)
    return lambda: score_panoptic_files(gt_json, pred_json, root / "panoptic_examples", pred_dir)


def test_png_segment_missing_from_json(sample, tmp_path):
    def edit(pred):
        m, segs, _ = pred[142238]
        m[:10, :10] = 4242

    with pytest.raises(UnknownSegmentError, match=r"000000142238.*4242"):
        _bad_case(sample, tmp_path, edit)()


def test_json_segment_missing_from_png(sample, tmp_path):
    def edit(pred):
        pred[439180][1].append({"id": 31337, "category_id": 1})

    with pytest.raises(UnknownSegmentError, match=r"439180.*31337"):
        _bad_case(sample, tmp_path, edit)()


def test_image_missing_from_predictions(sample, tmp_path):
    with pytest.raises(MissingPredictionError, match=r"000000439180.*439180"):
        _bad_case(sample, tmp_path, lambda pred: pred.pop(439180))()


def test_unknown_category(sample, tmp_path):
    def edit(pred):
        pred[142238][1][0]["category_id"] = 999

    with pytest.raises(UnknownCategoryError, match=r"000000142238.*999"):
        _bad_case(sample, tmp_path, edit)()


def test_size_mismatch(sample, tmp_path):
    def edit(pred):
        m, segs, name = pred[142238]
        pred[142238] = (m[:-5], segs, name)

    with pytest.raises(SizeMismatchError, match=r"000000142238"):
        _bad_case(sample, tmp_path, edit)()


def test_errors_are_value_errors():
    for cls in (UnknownSegmentError, MissingPredictionError, UnknownCategoryError, SizeMismatchError):
        assert issubclass(cls, EvalInputError) and issubclass(cls, ValueError)


def test_id_png_round_trip():
    ids = np.array([[0, 1, 255], [256, 65535, 256 ** 3 - 1]])
    assert (rgb_to_id(id_to_rgb(ids)) == ids).all()


def test_bench_score_runs_and_agrees(capsys):
    """The benchmark script (python -m study.eval.bench_score) at its smallest: every scorer agrees."""
    from study.eval import bench_score

    assert bench_score.main(["--sample", str(data_dir("coco_panoptic_sample")), "--copies", "2",
                             "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith(("ours,", "panopticapi "))]
    assert len(rows) == 4 and all(float(r.split()[-1]) < 1e-9 for r in rows)  # every scorer agrees
    floors = [line for line in out if line.startswith("decode floor")]
    assert len(floors) == 3 and any(line.startswith("ours on all cores:") for line in out)


def test_gt_png_id_missing_from_gt_json_follows_panopticapi(sample, tmp_path):
    """An id drawn in a GT PNG but not listed in the GT JSON is neither void nor matchable (panopticapi)."""
    root, gt, ids = sample
    gt_dir = tmp_path / "gt_png"
    gt_dir.mkdir()
    preds = _perturb("noise", gt, ids, np.random.default_rng(7))
    for ann in gt["annotations"]:
        m = ids[ann["image_id"]].copy()
        m[20:120, 30:200] = 123456  # unlisted in the JSON
        m[300:340, 0:60] = 0  # and some new void
        Image.fromarray(id_to_rgb(m)).save(gt_dir / ann["file_name"])
    gt_json = _write_gt(tmp_path, root, gt)
    pred_json, pred_dir = _write_pred(tmp_path, preds)
    theirs = _panopticapi.pq_compute(str(gt_json), str(pred_json), str(gt_dir), str(pred_dir))
    _assert_same(score_panoptic_files(gt_json, pred_json, gt_dir, pred_dir), theirs)
