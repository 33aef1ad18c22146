"""mIoU equals direct computations on the ADE20K sample and CamVid labels, in both conventions."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import data_dir
from study.eval.errors import EvalInputError, MissingPredictionError, SizeMismatchError, UnknownImageError
from study.eval.miou import ConfusionMatrix, score_semantic_dirs


def _direct_present(pairs, num_classes, ignore):
    """Per class, pixel sets counted one class at a time (no confusion matrix): mean over union > 0."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for gt, pred in pairs:
        valid = gt != ignore
        for c in range(num_classes):
            inter[c] += np.sum((gt == c) & (pred == c) & valid)
            union[c] += np.sum(((gt == c) | (pred == c)) & valid)
    return float(np.mean(inter[union > 0] / union[union > 0]))


def _ade_official(pairs_raw, num_class=150):
    """The ADE20K scene-parsing script's intersectionAndUnion (labels 1..150, 0 = ignore) and its mean."""
    ai, au = np.zeros(num_class), np.zeros(num_class)
    for lab, pred in pairs_raw:
        pred = pred * (lab > 0)
        inter = pred * (pred == lab)
        a_i, _ = np.histogram(inter, bins=num_class, range=(1, num_class))
        a_p, _ = np.histogram(pred, bins=num_class, range=(1, num_class))
        a_l, _ = np.histogram(lab, bins=num_class, range=(1, num_class))
        ai += a_i
        au += a_p + a_l - a_i
    return float(np.mean(ai / (au + 1e-10)))


def _perturb(raw, rng, lo, hi):
    """Shift, overwrite random blocks with random classes in lo..hi."""
    pred = np.roll(raw, (7, -5), axis=(0, 1)).copy()
    for _ in range(8):
        y, x = rng.integers(0, raw.shape[0] - 20), rng.integers(0, raw.shape[1] - 20)
        pred[y:y + rng.integers(5, 80), x:x + rng.integers(5, 80)] = rng.integers(lo, hi + 1)
    return pred


@pytest.fixture(scope="module")
def ade():
    root = data_dir("ade20k_sample") / "annotations"
    return root, {p.name: np.asarray(Image.open(p)) for p in sorted(root.glob("*.png"))}


def _write(folder, arrays):
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        Image.fromarray(a.astype(np.uint8)).save(folder / name)


def test_ade20k_gt_against_itself_both_conventions(ade):
    root, labels = ade
    r = score_semantic_dirs(root, root, 150, label_offset=1)
    assert r["miou"] == 1.0 and r["num_classes_present"] == 15
    assert r["miou_all_classes"] == pytest.approx(0.1, abs=1e-12)  # the README's fact: 15 / 150
    assert r["miou_all_classes"] == pytest.approx(_ade_official([(a, a) for a in labels.values()]), abs=1e-9)


def test_ade20k_perturbed_equals_direct(ade, tmp_path):
    root, labels = ade
    rng = np.random.default_rng(0)
    preds = {n: np.clip(_perturb(a, rng, 1, 150), 1, 150) for n, a in labels.items()}  # official: 1..150
    _write(tmp_path / "pred", preds)
    r = score_semantic_dirs(root, tmp_path / "pred", 150, label_offset=1)
    shifted = [(a.astype(np.int64) - 1, preds[n].astype(np.int64) - 1) for n, a in labels.items()]
    for gt, _ in shifted:
        gt[gt < 0] = 255
    assert abs(r["miou"] - _direct_present(shifted, 150, 255)) < 1e-12
    assert abs(r["miou_all_classes"] - _ade_official([(a, preds[n]) for n, a in labels.items()])) < 1e-9
    assert 0.05 < r["miou"] < 0.95


def test_camvid_perturbed_equals_direct(tmp_path):
    root = data_dir("camvid")
    names = [line.split()[1] for line in (root / "val.txt").read_text().splitlines()[:12]]
    rng = np.random.default_rng(1)
    pairs = []
    for i, rel in enumerate(names):
        gt = np.asarray(Image.open(root / rel.lstrip("/").split("CamVid/")[-1]))
        pred = _perturb(gt, rng, 0, 10)
        pred[pred == 11] = 3  # predictions never hold the void value
        pairs.append((gt, pred))
        _write(tmp_path / "gt", {f"{i:03d}.png": gt})
        _write(tmp_path / "pred", {f"{i:03d}.png": pred})
    r = score_semantic_dirs(tmp_path / "gt", tmp_path / "pred", 11, ignore_index=11)
    assert abs(r["miou"] - _direct_present(pairs, 11, 11)) < 1e-12
    # all-classes convention: every CamVid class present, the two agree; recomputed directly
    inter = [sum(np.sum((g == c) & (p == c)) for g, p in pairs) for c in range(11)]
    union = [sum(np.sum(((g == c) | (p == c)) & (g != 11)) for g, p in pairs) for c in range(11)]
    assert abs(r["miou_all_classes"] - np.mean(np.array(inter) / np.array(union))) < 1e-12


def test_absent_class_counts_only_in_all_classes_convention():
    cm = ConfusionMatrix(4)
    gt = np.array([[0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 2]])
    cm.add(gt, pred)
    r = cm.summary()
    # class 0: 1/2, class 1: 1/2, class 2: predicted only on an ignored pixel -> absent, class 3 absent
    assert r["miou"] == pytest.approx(0.5) and r["num_classes_present"] == 2
    assert r["miou_all_classes"] == pytest.approx(0.25)


def test_prediction_of_no_class_is_a_miss():
    cm = ConfusionMatrix(2)
    cm.add(np.array([[0, 1]]), np.array([[255, 1]]))
    assert cm.summary()["per_class"][0]["iou"] == 0.0 and cm.summary()["per_class"][1]["iou"] == 1.0


def test_bad_semantic_input(ade, tmp_path):
    root, labels = ade
    shutil.copytree(root, tmp_path / "pred")
    first = sorted(labels)[0]
    (tmp_path / "pred" / first).unlink()
    with pytest.raises(MissingPredictionError, match=first):
        score_semantic_dirs(root, tmp_path / "pred", 150, label_offset=1)
    _write(tmp_path / "pred", {first: labels[first][:-3]})
    with pytest.raises(SizeMismatchError, match=first):
        score_semantic_dirs(root, tmp_path / "pred", 150, label_offset=1)
    _write(tmp_path / "pred", {first: np.full_like(labels[first], 200)})
    with pytest.raises(EvalInputError, match=rf"{first}.*199"):
        score_semantic_dirs(root, tmp_path / "pred", 150, label_offset=1)
    _write(tmp_path / "pred", {first: labels[first], "extra.png": labels[first]})
    with pytest.raises(UnknownImageError, match="extra.png"):
        score_semantic_dirs(root, tmp_path / "pred", 150, label_offset=1)
