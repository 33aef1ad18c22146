"""The built-in synthetic data set: official formats read back by the ordinary readers, the three views agree,
the official tools accept the files, and generation is deterministic and cached."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import require
import torch

from study.data import DataError, build_dataset
from study.data.config import DataConfig
from study.data.synthetic import STUFF, THINGS, ensure_synthetic, generate

SIZE, TRAIN, VAL = 64, 24, 6


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("syn") / "set", SIZE, TRAIN, VAL, seed=3)


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="synthetic", root=str(root), synthetic_image_size=SIZE, synthetic_train_images=TRAIN,
                      synthetic_val_images=VAL, synthetic_seed=3, **kw)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def test_three_views_read_back_and_agree(root):
    cfg = _cfg(root, drop_empty_train_images=False)
    for split, n in (("train", TRAIN), ("val", VAL)):
        pan = build_dataset(cfg, split, "panoptic")
        ins = build_dataset(cfg, split, "instance")
        sem = build_dataset(cfg, split, "semantic")
        assert len(pan) == len(ins) == len(sem) == n
        assert pan.info.num_classes == sem.info.num_classes == len(THINGS) + len(STUFF)
        assert ins.info.num_classes == len(THINGS)
        assert pan.info.is_thing == [True] * len(THINGS) + [False] * len(STUFF)
        assert pan.info.class_names == sem.info.class_names  # one contiguous order for every view
        assert ins.info.category_ids == pan.info.category_ids[:len(THINGS)]
        for p, i, s in zip(pan, ins, sem):
            assert p.image.shape == (3, SIZE, SIZE) and torch.equal(p.image, i.image) and torch.equal(p.image, s.image)
            # panoptic: every pixel in exactly one segment, each stuff class at most once
            assert torch.equal(p.masks.sum(0), torch.ones(SIZE, SIZE, dtype=torch.long))
            stuff = p.labels[p.labels >= len(THINGS)]
            assert len(stuff) == len(set(stuff.tolist())) >= 1
            # instance == the panoptic things, mask for mask, crowd flag for crowd flag
            things = p.labels < len(THINGS)
            assert torch.equal(i.masks, p.masks[things]) and torch.equal(i.labels, p.labels[things])
            assert torch.equal(i.is_crowd, p.is_crowd[things]) and len(i.labels) >= 1
            # semantic == union of panoptic segments per class
            for m, lab in zip(s.masks, s.labels):
                assert torch.equal(m, p.masks[p.labels == lab].any(0))
            assert set(s.labels.tolist()) == set(p.labels.tolist())
    # the synthetic set has crowd somewhere, as COCO does
    assert any(build_dataset(cfg, "train", "panoptic")[k].is_crowd.any() for k in range(TRAIN))


def test_official_tools_accept_the_files(root, tmp_path):
    """panopticapi's pq_compute and pycocotools' COCOeval score the ground truth against itself perfectly."""
    pq_compute = require("panopticapi.evaluation").pq_compute
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_json = root / "annotations" / "panoptic_val2017.json"
    with contextlib.redirect_stdout(io.StringIO()):
        res = pq_compute(str(gt_json), str(gt_json), str(root / "annotations" / "panoptic_val2017"),
                         str(root / "annotations" / "panoptic_val2017"))
    assert res["All"]["pq"] == pytest.approx(1.0)

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(root / "annotations" / "instances_val2017.json"))
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                 "segmentation": gt.annToRLE(a)} for a in gt.dataset["annotations"] if not a["iscrowd"]]
        ev = COCOeval(gt, gt.loadRes(dets), "segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_generation_is_deterministic_and_seeded(tmp_path):
    a = generate(tmp_path / "a", 48, 4, 2, seed=7)
    b = generate(tmp_path / "b", 48, 4, 2, seed=7)
    c = generate(tmp_path / "c", 48, 4, 2, seed=8)
    assert _digest(a) == _digest(b) != _digest(c)
    # image i does not depend on how many images are generated
    d = generate(tmp_path / "d", 48, 2, 1, seed=7)
    assert (d / "train2017" / "000000000002.png").read_bytes() == (a / "train2017" / "000000000002.png").read_bytes()


def test_ensure_synthetic_reuses_and_refuses_other_parameters(tmp_path, monkeypatch):
    first = ensure_synthetic(tmp_path / "s", 48, 3, 2, seed=0)
    stamp = (first / "synthetic.json").stat().st_mtime_ns
    assert ensure_synthetic(tmp_path / "s", 48, 3, 2, seed=0) == first
    assert (first / "synthetic.json").stat().st_mtime_ns == stamp  # not regenerated
    assert not list(tmp_path.glob(".s.tmp-*"))  # no temporary folder left behind
    with pytest.raises(DataError, match="made with"):
        ensure_synthetic(tmp_path / "s", 48, 3, 2, seed=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("user data")
    with pytest.raises(DataError, match="not a synthetic data set"):
        ensure_synthetic(tmp_path / "other", 48, 3, 2)
    # without a root: a cache folder named after the parameters
    monkeypatch.setenv("STUDY_CACHE", str(tmp_path / "cache"))
    cached = ensure_synthetic(None, 48, 3, 2, seed=0)
    assert cached.parent == tmp_path / "cache" and "s48" in cached.name
    assert json.loads((cached / "synthetic.json").read_text())["num_train"] == 3


def test_scenes_are_learnable_by_colour(root):
    """The classes are told apart by colour alone: nearest class-mean colour labels > 90% of pixels right.
    (A cheap stand-in for 'a tiny model reaches a clearly non-trivial PQ'.)"""
    sem = build_dataset(_cfg(root), "train", "semantic")
    c = sem.info.num_classes
    sums, counts = torch.zeros(c, 3), torch.zeros(c)
    for s in sem:
        px = s.image.flatten(1).T.float()  # (H*W, 3)
        for m, lab in zip(s.masks.flatten(1), s.labels):
            sums[lab] += px[m].sum(0)
            counts[lab] += m.sum()
    means = sums / counts[:, None]
    right = total = 0
    for s in build_dataset(_cfg(root), "val", "semantic"):
        px = s.image.flatten(1).T.float()
        pred = torch.cdist(px, means).argmin(1)
        gt = (s.masks.flatten(1).float().T @ torch.arange(len(s.labels)).float()).long()
        right += int((pred == s.labels[gt]).sum())
        total += px.shape[0]
    assert right / total > 0.9


def test_build_dataset_generates_on_first_use(tmp_path):
    cfg = DataConfig(dataset="synthetic", root=str(tmp_path / "fresh"), synthetic_image_size=48,
                     synthetic_train_images=3, synthetic_val_images=2)
    ds = build_dataset(cfg, "val", "panoptic")
    assert len(ds) == 2 and (tmp_path / "fresh" / "synthetic.json").is_file()
    assert Path(ds.info.extra["panoptic_json"]).is_file() and Path(ds.info.extra["panoptic_dir"]).is_dir()
    assert build_dataset(cfg, "val", "instance").info.extra["instances_json"].endswith("instances_val2017.json")
    assert np.asarray(ds[0].image).dtype == np.uint8


def test_training_split_leaves_out_images_without_non_crowd_segments(tmp_path):
    root = generate(tmp_path / "s", 48, 4, 2, seed=0)
    for split in ("train2017", "val2017"):  # first image of each split: every thing becomes crowd
        path = root / "annotations" / f"instances_{split}.json"
        js = json.loads(path.read_text())
        first = js["images"][0]["id"]
        for a in js["annotations"]:
            if a["image_id"] == first:
                a["iscrowd"] = 1
        path.write_text(json.dumps(js))
    cfg = DataConfig(dataset="coco_instance", root=str(root))
    train, val = build_dataset(cfg, "train", "instance"), build_dataset(cfg, "val", "instance")
    assert len(train) == 3 and 1 not in [e[0]["id"] for e in train.entries]
    assert len(val) == 2  # evaluation keeps every image
    cfg.drop_empty_train_images = False
    assert len(build_dataset(cfg, "train", "instance")) == 4


def _panoptic_ids(mask_logits, class_logits, is_thing, threshold=0.5):
    """A plain Mask2Former-style merge for the learnability check: (Q, H, W) logits -> id map and segments."""
    prob = mask_logits.sigmoid()
    score, cls = class_logits.softmax(-1)[:, :-1].max(-1)
    keep = (score > threshold).nonzero()[:, 0].tolist()
    ids = np.zeros(prob.shape[1:], np.int64)
    segs, stuff = [], {}
    if keep:
        owner = (score[keep, None, None] * prob[keep]).argmax(0)
        for j, q in enumerate(keep):
            m = ((owner == j) & (prob[q] >= 0.5)).numpy()
            if m.sum() == 0 or m.sum() < 0.8 * int((prob[q] >= 0.5).sum()):
                continue
            c = int(cls[q])
            if not is_thing[c] and c in stuff:
                ids[m] = stuff[c]
                continue
            segs.append({"id": len(segs) + 1, "label": c})
            stuff[c] = ids[m] = len(segs)
    present = set(np.unique(ids).tolist())
    return ids, [s for s in segs if s["id"] in present]


@pytest.mark.slow
def test_tiny_model_learns_the_synthetic_set_in_cpu_minutes(tmp_path):
    """The default synthetic set is learnable: a tiny EoMT (4 blocks, 64 wide) trained for 250 steps of 8
    images (about 2-3 CPU minutes) reaches a clearly non-trivial PQ (measured 78 on 2 cores)."""
    from study.eval.pq import PQAccumulator
    from study.models.build import build_model
    from study.models.config import ModelConfig
    from study.train.loss import MaskClassificationLoss
    from study.data.transforms import AugmentedDataset, TrainTransform, collate

    torch.manual_seed(0)
    cfg = DataConfig(dataset="synthetic", root=str(tmp_path / "syn"))
    train, val = build_dataset(cfg, "train", "panoptic"), build_dataset(cfg, "val", "panoptic")
    size, c = cfg.synthetic_image_size, train.info.num_classes
    aug = AugmentedDataset(train, TrainTransform.from_config(cfg, "panoptic", size), seed=0)
    model = build_model(ModelConfig(size="tiny", img_size=size, num_classes=c, num_queries=20,
                                    num_query_blocks=2, masked_attention=False))
    criterion = MaskClassificationLoss(c, num_points=1024)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loader = torch.utils.data.DataLoader(aug, batch_size=8, shuffle=True, collate_fn=collate, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    step, epoch = 0, 0
    model.train()
    while step < 250:
        aug.set_epoch(epoch)
        for images, targets in loader:
            loss, _ = criterion(model(images), targets)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step == 250:
                break
        epoch += 1

    model.eval()
    acc = PQAccumulator(val.info.extra["categories"])
    with torch.no_grad():
        for s in val:
            pred = model(s.image.float()[None] / 255)[-1]
            logits = torch.nn.functional.interpolate(pred.mask_logits, size=(size, size), mode="bilinear")[0]
            ids, segs = _panoptic_ids(logits, pred.class_logits[0], val.info.is_thing)
            gt = np.zeros((size, size), np.int64)
            for m, sid in zip(s.masks, s.segment_ids.tolist()):
                gt[m.numpy()] = sid
            gt_segs = [{"id": int(sid), "category_id": val.info.category_ids[int(lab)], "iscrowd": int(cr)}
                       for lab, cr, sid in zip(s.labels, s.is_crowd, s.segment_ids)]
            pred_segs = [{"id": p["id"], "category_id": val.info.category_ids[p["label"]]} for p in segs]
            acc.add(gt, gt_segs, ids, pred_segs, image=s.file_name)
    result = acc.summary()
    assert result["All"]["pq"] > 0.4, result["All"]
