"""Scoring a run of equal pixels at a time, in threads, equals counting every pixel (issue 16 item 1).

The oracles are plain per-pixel counts (``np.bincount`` over every pixel pair, ``np.unique`` of 64-bit
combined ids as panopticapi does) on maps built to stress the run cutting: pixel noise (one run per pixel),
runs across row ends, a single pixel, an empty map. The panoptic and semantic file scorers against the
official tools are in tests/test_eval_pq.py and tests/test_eval_miou.py.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import data_dir
from study.errors import UserError
from study.eval.errors import EvalInputError, UnknownSegmentError
from study.eval.image_pool import accumulate
from study.eval.miou import ConfusionMatrix, decode_labels, score_semantic_dirs
from study.eval.pixel_runs import runs, weighted_counts
from study.eval.pq import PQAccumulator, id_to_rgb, rgb_to_id
from study.eval.pq_files import read_id_png, score_panoptic_files


def _maps(rng):
    blocks = np.kron(rng.integers(0, 4, (6, 9)), np.ones((7, 5), np.int64))  # (42, 45) piecewise constant
    yield "blocks", blocks, np.roll(blocks, 3, axis=1)
    yield "noise", rng.integers(0, 3, (17, 23)), rng.integers(0, 3, (17, 23))
    yield "one pixel", np.array([[2]]), np.array([[1]])
    yield "constant", np.full((5, 8), 3), np.full((5, 8), 3)
    yield "empty", np.zeros((0, 4), np.int64), np.zeros((0, 4), np.int64)


@pytest.mark.parametrize("case", ["blocks", "noise", "one pixel", "constant", "empty"])
def test_run_weighted_counts_equal_per_pixel_counts(case):
    name, a, b = next(m for m in _maps(np.random.default_rng(0)) if m[0] == case)
    a, b = a.reshape(-1), b.reshape(-1)
    starts, lengths = runs(a, b)
    assert lengths.sum() == a.size and (lengths > 0).all()
    # each run is constant in both maps
    for s, n in zip(starts, lengths):
        assert (a[s:s + n] == a[s]).all() and (b[s:s + n] == b[s]).all()
    got = weighted_counts(a[starts] * 4 + b[starts], lengths, 16)
    assert np.array_equal(got, np.bincount(a * 4 + b, minlength=16))
    if case == "noise":
        assert starts.size > 0.5 * a.size  # the map the runs do not compress is still exact


def _direct_intersections(gt, pred):
    """panopticapi's way: np.unique of combined 64-bit ids -> {(gt id, pred id): pixels}."""
    combined = gt.astype(np.uint64) * np.uint64(1 << 32) + pred.astype(np.uint64)
    labels, counts = np.unique(combined, return_counts=True)
    return {(int(label >> np.uint64(32)), int(label & np.uint64(0xFFFFFFFF))): int(c)
            for label, c in zip(labels, counts)}


@pytest.mark.parametrize("ids_kind", ["coco", "beyond 2^24"])
def test_panoptic_noise_maps_score_like_per_pixel_matching(ids_kind):
    """Pixel-noise id maps (one run per pixel; ids past 2^24 take the binary-search path): TP / FP / FN and
    IoU sums equal panopticapi's rules applied to per-pixel intersections counted with np.unique."""
    rng = np.random.default_rng(1)
    base = 5 if ids_kind == "coco" else (1 << 30)
    cats = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}]
    acc = PQAccumulator(cats)
    tp = fp = fn = 0
    iou_sum = 0.0
    for _ in range(4):
        gt = np.where(rng.random((31, 29)) < 0.1, 0, base + rng.integers(0, 3, (31, 29)))
        gt[:15] = base  # one large segment so that some pairs match
        pred = gt.copy()
        noise = rng.random(pred.shape) < 0.2
        pred[noise] = base + 7 + rng.integers(0, 2, noise.sum())
        g_segs = [{"id": int(base + k), "category_id": 1 + k % 2, "iscrowd": 0} for k in range(3)]
        p_segs = [{"id": int(i), "category_id": 1 + (int(i) - base) % 2} for i in np.unique(pred) if i]
        acc.add(gt, g_segs, pred, p_segs, image="x")
        inter = _direct_intersections(gt, pred)
        g_area = {s["id"]: int((gt == s["id"]).sum()) for s in g_segs}
        p_area = {s["id"]: int((pred == s["id"]).sum()) for s in p_segs}
        cat = {s["id"]: s["category_id"] for s in g_segs + p_segs}
        matched_g, matched_p = set(), set()
        for (g, p), n in inter.items():
            if g and p and cat[g] == cat[p]:
                iou = n / (g_area[g] + p_area[p] - n - inter.get((0, p), 0))
                if iou > 0.5:
                    tp, iou_sum = tp + 1, iou_sum + iou
                    matched_g.add(g)
                    matched_p.add(p)
        fn += sum(1 for s in g_segs if g_area[s["id"]] and s["id"] not in matched_g)
        fp += sum(1 for s in p_segs if s["id"] not in matched_p and inter.get((0, s["id"]), 0) / p_area[s["id"]] <= 0.5)
    assert tp > 0 and fp > 0
    assert (int(acc.tp.sum()), int(acc.fp.sum()), int(acc.fn.sum())) == (tp, fp, fn)
    assert acc.iou.sum() == pytest.approx(iou_sum, abs=1e-12)


def test_read_id_png_equals_rgb_to_id_for_every_mode(tmp_path):
    """The RGBX-buffer read gives R + 256 G + 256^2 B, for RGB PNGs and RGBA (alpha ignored, as panopticapi
    and hotcoco do); grayscale PNGs, 8- or 16-bit, are refused naming their type, as hotcoco refuses them
    (issue 28: a 16-bit PNG read as RGB gave ids the JSON does not list, a misleading message)."""
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 256 ** 3 - 1, 123456]])
    rgb = id_to_rgb(ids)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full(ids.shape, 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(np.array([[3, 9], [200, 0]], np.uint8)).save(tmp_path / "l.png")
    got = read_id_png(tmp_path / "rgb.png", "x", "prediction")
    assert got.dtype == np.uint32 and np.array_equal(got, ids)
    assert np.array_equal(read_id_png(tmp_path / "rgba.png", "x", "prediction"), ids)
    with pytest.raises(EvalInputError, match=r"l.png is a 8-bit grayscale PNG \(2x2\); the COCO panoptic format"):
        read_id_png(tmp_path / "l.png", "x", "prediction")
    Image.fromarray(np.array([[3, 900], [20000, 0]], np.uint16)).save(tmp_path / "i16.png")
    with pytest.raises(EvalInputError, match=r"i16.png is a 16-bit grayscale PNG"):
        read_id_png(tmp_path / "i16.png", "x", "prediction")


def test_semantic_runs_equal_per_pixel_confusion(tmp_path):
    """Raw label PNGs with an offset, scored in threads a run at a time, equal a per-pixel confusion
    matrix of the decoded labels (noise and blocks, ignore pixels included)."""
    rng = np.random.default_rng(2)
    c, ignore, offset = 5, 255, 1
    want = np.zeros((c, c + 1), np.int64)
    for k in range(6):
        for d in ("gt", "pred"):
            (tmp_path / d).mkdir(exist_ok=True)
        gt = np.kron(rng.integers(0, c + 1, (5, 6)), np.ones((8, 9), np.int64)).astype(np.uint8)
        pred = gt.copy() if k % 2 else rng.integers(0, c + 1, gt.shape).astype(np.uint8)
        pred[:3] = ignore
        Image.fromarray(gt).save(tmp_path / "gt" / f"{k}.png")
        Image.fromarray(pred).save(tmp_path / "pred" / f"{k}.png")
        g, p = decode_labels(gt, offset, ignore).reshape(-1), decode_labels(pred, offset, ignore).reshape(-1)
        valid = g != ignore
        p = np.where(p == ignore, c, p)
        want += np.bincount(g[valid] * (c + 1) + p[valid], minlength=c * (c + 1)).reshape(c, c + 1)
    for workers in (1, 3):
        cm = ConfusionMatrix(c, ignore)
        for k in range(6):
            cm.add_labels(np.asarray(Image.open(tmp_path / "gt" / f"{k}.png")),
                          np.asarray(Image.open(tmp_path / "pred" / f"{k}.png")), str(k), offset, offset)
        assert np.array_equal(cm.matrix, want)
        res = score_semantic_dirs(tmp_path / "gt", tmp_path / "pred", c, ignore, offset, workers=workers)
        assert res["num_images"] == 6
        direct = ConfusionMatrix(c, ignore)
        direct.matrix[:] = want
        assert res["miou"] == direct.summary()["miou"]


@pytest.fixture
def panoptic_sample(tmp_path):
    root = data_dir("coco_panoptic_sample")
    gt = json.loads((root / "panoptic_examples.json").read_text())
    gt["categories"] = json.loads((root / "panoptic_coco_categories.json").read_text())
    anns = []
    for k in range(3):  # 6 images: the 2 sample images 3 times over
        for a in gt["annotations"]:
            name = f"{k}_{a['file_name']}"
            for d in ("gt", "pred"):
                (tmp_path / d).mkdir(exist_ok=True)
                shutil.copy(root / "panoptic_examples" / a["file_name"], tmp_path / d / name)
            anns.append({**a, "image_id": a["image_id"] * 10 + k, "file_name": name})
    gt["annotations"] = anns
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": anns}))
    return tmp_path, anns


def test_threads_raise_the_first_bad_images_error(panoptic_sample):
    """Two bad predictions: in threads as in one, the error names the first bad image of the GT order."""
    tmp, anns = panoptic_sample
    for a in (anns[3], anns[4]):
        ids = read_id_png(tmp / "pred" / a["file_name"], "x", "prediction")
        ids[:4, :4] = 4242 + a["image_id"]
        Image.fromarray(id_to_rgb(ids)).save(tmp / "pred" / a["file_name"])
    for workers in (1, 2, 4, 0):
        with pytest.raises(UnknownSegmentError, match=rf"\(id {anns[3]['image_id']}\).*{4242 + anns[3]['image_id']}"):
            score_panoptic_files(tmp / "gt.json", tmp / "pred.json", tmp / "gt", tmp / "pred", workers=workers)


def test_threads_give_the_same_sums(panoptic_sample):
    tmp, _ = panoptic_sample
    one = score_panoptic_files(tmp / "gt.json", tmp / "pred.json", tmp / "gt", tmp / "pred", workers=1)
    for workers in (2, 5, 0):
        many = score_panoptic_files(tmp / "gt.json", tmp / "pred.json", tmp / "gt", tmp / "pred", workers=workers)
        assert many["per_class"] == one["per_class"] and many["num_images"] == one["num_images"] == 6


@pytest.mark.parametrize("workers", [-1, 1.5, True, "2"])
def test_bad_worker_count_is_a_user_error(panoptic_sample, workers):
    tmp, _ = panoptic_sample
    with pytest.raises(UserError, match=r"workers \(--workers\) must be an integer >= 0"):
        score_panoptic_files(tmp / "gt.json", tmp / "pred.json", tmp / "gt", tmp / "pred", workers=workers)


def test_non_numeric_segment_area_names_the_segment():
    cats = [{"id": 1, "isthing": 1}]
    ids = np.ones((4, 4), np.int64)
    with pytest.raises(EvalInputError, match=r"image im: ground-truth segment 1 has area '16'; expected a number"):
        PQAccumulator(cats).add(ids, [{"id": 1, "category_id": 1, "area": "16"}], ids,
                                [{"id": 1, "category_id": 1}], image="im")
    # a prediction's area and crowd flag are not read (panopticapi recounts areas from the PNG)
    acc = PQAccumulator(cats)
    acc.add(ids, [{"id": 1, "category_id": 1}], ids, [{"id": 1, "category_id": 1, "area": "16", "iscrowd": "x"}],
            image="im")
    assert acc.summary()["All"]["pq"] == pytest.approx(1.0)


def test_accumulate_merges_every_part():
    """Each thread's accumulator is merged once: the total sees every item exactly once."""
    total = accumulate(list(range(50)), lambda i, acc: acc.append(i), list, list.extend, workers=4)
    assert sorted(total) == list(range(50))


def test_zero_copy_words_equal_the_copy_and_outlive_the_image(tmp_path, monkeypatch):
    """Pillow's pixel block seen through its Arrow export gives the same ids as the tobytes copy, stays valid
    after the image is closed and its memory could be reused, and the copy is the fallback."""
    import gc

    if not hasattr(Image.Image, "__arrow_c_array__"):  # Pillow < 11.2 (pyproject allows 10): the copy only
        pytest.skip(f"Pillow {Image.__version__} has no Arrow export; scoring uses the copy")

    import study.eval.pq_files as pq_files

    rng = np.random.default_rng(5)
    paths = []
    for k in range(4):
        ids = np.kron(rng.integers(0, 1 << 24, (6, 5)), np.ones((9, 13), np.int64))
        paths.append((tmp_path / f"{k}.png", ids))
        Image.fromarray(id_to_rgb(ids)).save(paths[-1][0])
    words = [pq_files.read_id_words(p, "x", "prediction") for p, _ in paths]
    assert all(not w.flags.writeable and isinstance(w.base, pq_files._PillowPixels) for w in words)
    gc.collect()
    junk = [np.full(1 << 20, 7, np.uint32) for _ in range(8)]  # noqa: F841 (memory a freed block would go to)
    for w, (p, ids) in zip(words, paths):
        assert np.array_equal(w & np.uint32(pq_files.ID_MASK), ids)

    def refuse(im):
        raise ValueError("unexpected Arrow layout")

    monkeypatch.setattr(pq_files, "_PillowPixels", refuse)
    for w, (p, ids) in zip(words, paths):
        copy = pq_files.read_id_words(p, "x", "prediction")
        assert copy.base.base.__class__ is bytes and np.array_equal(copy & np.uint32(pq_files.ID_MASK), ids)
