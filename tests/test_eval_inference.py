"""Inference protocols (padded, windowed, masking) and post-processing (docs/paper.md section 7)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from study.config import load_config
from study.eval.config import EvalConfig
from study.eval.inference import pad_to_square, run_padded, run_windowed, window_crops
from study.eval.postprocess import instance_topk, panoptic_merge, semantic_logits
from study.models.build import build_model
from study.models.contract import PredictionSet

CFG = EvalConfig()
BIG = 20.0  # a logit that saturates softmax / sigmoid


def _merge(masks, classes, is_thing):
    return panoptic_merge(masks, classes, is_thing, CFG.score_threshold, CFG.overlap_threshold, CFG.mask_threshold)


def _class_logits(probs_rows):
    """Rows of probabilities over C + 1 -> logits with exactly these softmax values."""
    return torch.log(torch.tensor(probs_rows, dtype=torch.float64)).float()


# ---------------------------------------------------------------------------------------- post-processing


def test_panoptic_merge_rules():
    h, w = 8, 8
    # classes: 0 thing, 1 stuff; C + 1 = 3 with no-object last
    is_thing = [True, False]
    m = torch.full((6, h, w), -BIG)
    m[0, :4, :4] = BIG  # thing, score 0.9: kept
    m[1, 4:, :4] = BIG  # stuff, score 0.85: kept
    m[2, 4:, 4:] = BIG  # the same stuff class elsewhere: merged into query 1's segment
    m[3, :4, 4:] = BIG  # score 0.79 < 0.8: dropped -> void
    m[4, :2, :2] = BIG  # no-object is its top class: dropped
    m[5, :4, :] = BIG  # thing, score 0.95, covers query 0's area and query 3's: wins only the right half
    m[5, :4, :4] = -BIG  # ... after we take back the left half; keep an overlap to test the ratio rule below
    classes = _class_logits([[0.9, 0.05, 0.05], [0.05, 0.85, 0.1], [0.05, 0.9, 0.05], [0.79, 0.11, 0.1],
                             [0.1, 0.1, 0.8], [0.95, 0.03, 0.02]])
    r = _merge(m, classes, is_thing)
    ids = r.ids
    labels = {s["id"]: s["label"] for s in r.segments}
    assert len(r.segments) == 3  # thing (q0), stuff (q1 + q2), thing (q5)
    assert labels[int(ids[0, 0])] == 0 and labels[int(ids[5, 0])] == 1
    assert int(ids[5, 0]) == int(ids[5, 7])  # stuff merged per class
    assert int(ids[0, 7]) not in (0, int(ids[0, 0]))  # q5's own segment
    assert r.segments[0]["score"] == pytest.approx(0.9, abs=1e-5)


def test_panoptic_overlap_ratio_drops_a_mostly_covered_query():
    is_thing = [True, True]
    m = torch.full((2, 10, 10), -BIG)
    m[0, :, :] = BIG  # everywhere, score 0.9
    m[1, :, :] = BIG  # everywhere too, but score 0.95 wins every pixel -> q0 wins nothing
    m[1, :, 8:] = -BIG  # q1 absent on the right 2 columns: q0 wins 20 of its 100 pixels (0.2 < 0.8)
    classes = _class_logits([[0.9, 0.05, 0.05], [0.02, 0.95, 0.03]])
    r = _merge(m, classes, is_thing)
    assert [s["label"] for s in r.segments] == [1]
    assert int((r.ids == 0).sum()) == 20  # q0's remaining pixels stay void
    # With the ratio just above the threshold the query survives: q1 absent on 9 of 10 columns.
    m[1, :, 1:] = -BIG
    r = _merge(m, classes, is_thing)
    assert sorted(s["label"] for s in r.segments) == [0, 1]


def test_panoptic_mask_threshold_is_sigmoid_half():
    m = torch.full((1, 4, 4), -BIG)
    m[0, :2] = 0.0  # sigmoid exactly 0.5: inside (>= 0.5)
    m[0, 2:] = -1e-3  # just below
    r = _merge(m, _class_logits([[0.9, 0.05, 0.05]]), [True, True])
    assert int((r.ids > 0).sum()) == 8


def test_instance_topk_scores_and_count():
    torch.manual_seed(0)
    q, c, h, w = 30, 7, 12, 10
    masks = torch.randn(q, h, w) * 3
    classes = torch.randn(q, c + 1) * 2
    r = instance_topk(masks, classes, CFG.top_k)
    assert len(r.scores) == CFG.top_k == 100  # docs/paper.md section 7: top 100 of the 210 (query, class) pairs
    probs = classes.softmax(-1)[:, :c]
    best = probs.flatten().topk(CFG.top_k).indices
    assert torch.equal(r.labels, best % c)
    qi = best // c
    for k in (0, 17, 99):
        inside = masks[qi[k]] > 0
        mean_prob = masks[qi[k]].sigmoid()[inside].mean() if inside.any() else torch.tensor(0.0)
        assert r.scores[k] == pytest.approx(float(probs.flatten()[best[k]] * mean_prob), rel=1e-4)
        assert torch.equal(r.masks[k], inside)
    few = instance_topk(masks[:3], classes[:3], CFG.top_k)  # fewer pairs than top_k: all of them
    assert len(few.scores) == 3 * c


def test_semantic_logits_is_sum_over_queries():
    torch.manual_seed(0)
    masks, classes = torch.randn(5, 6, 4), torch.randn(5, 4)
    out = semantic_logits(masks, classes)
    ref = sum(classes[q].softmax(-1)[:3, None, None] * masks[q].sigmoid()[None] for q in range(5))
    assert torch.allclose(out, ref, atol=1e-6) and out.shape == (3, 6, 4)


# ----------------------------------------------------------------------------------------- protocols


class EchoModel(nn.Module):
    """A contract model whose single mask is the input's red channel at 1/4 resolution (as a logit), and
    whose class logits favour class 0; it records the inputs it saw."""

    num_classes = 2
    masked_inference = False

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images):
        self.seen.append(images.clone())
        b, _, h, w = images.shape
        red = F.interpolate(images[:, :1], size=(h // 4, w // 4), mode="bilinear", align_corners=False)
        masks = torch.cat([red * 10 - 5, -red * 10 + 5], dim=1)  # (B, 2, H/4, W/4)
        classes = torch.tensor([[BIG, 0.0, 0.0], [0.0, BIG, 0.0]]).expand(b, 2, 3)
        return [PredictionSet(masks, classes)]


def _ramp(h, w):
    """uint8 image whose red channel is a smooth horizontal ramp, green/blue constant."""
    x = torch.linspace(0, 255, w).round().to(torch.uint8)
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[0] = x[None].expand(h, w)
    img[1] = 77
    return img


def test_padded_protocol_resizes_pads_and_crops():
    imgs = [_ramp(30, 60), _ramp(64, 32)]
    batch, kept = pad_to_square(imgs, 64)
    assert kept == [(32, 64), (64, 32)]
    assert batch.shape == (2, 3, 64, 64)
    assert bool((batch[0, :, 32:] == 0).all()) and bool((batch[1, :, :, 32:] == 0).all())  # zero pad bottom/right
    assert float(batch[0, 1, :32].mean()) == pytest.approx(77 / 255)  # content top-left, in [0, 1]
    model = EchoModel()
    out = run_padded(model, imgs, 64)
    assert model.seen[0].shape == (2, 3, 64, 64)  # batched
    for img, (m, c) in zip(imgs, out):
        assert m.shape == (2, *img.shape[-2:]) and c.shape == (2, 3)
        # The echoed mask follows the ramp at the original resolution: padding was cropped away.
        ref = img[0].float() / 255 * 10 - 5
        inner = (slice(4, -4), slice(4, -4))
        assert torch.allclose(m[0][inner], ref[inner], atol=0.6)


@pytest.mark.parametrize("hw,size,starts", [((30, 70), 10, [0, 6, 13]), ((50, 50), 25, [0]),
                                            ((90, 40), 20, [0, 12, 25])])
def test_window_crops_spread_overlap(hw, size, starts):
    crops, got, (nh, nw) = window_crops(_ramp(*hw), size)
    assert min(nh, nw) == size and len(got) == math.ceil(max(nh, nw) / size) == crops.shape[0]
    assert got == starts and got[-1] + size == max(nh, nw)
    assert crops.shape[1:] == (3, size, size)


def test_windowed_protocol_averages_overlaps():
    img = _ramp(40, 100)
    model = EchoModel()
    out = run_windowed(model, [img, _ramp(20, 20)], 20, batch_size=2)
    assert out[0].shape == (2, 40, 100) and out[1].shape == (2, 20, 20)
    assert sum(s.shape[0] for s in model.seen) == 3 + 1 and model.seen[0].shape[0] == 2  # crops batched
    # Class 0's per-pixel logit = sigmoid(mask 0) everywhere (class probs ~ one-hot): a smooth function of
    # the ramp, so averaging overlapping crops must reproduce it without seams.
    ref = torch.sigmoid(img[0].float() / 255 * 10 - 5)
    assert torch.allclose(out[0][0, :, 3:-3], ref[:, 3:-3], atol=0.08)


def test_masked_inference_switch_on_tiny_eomt():
    model = build_model(load_config(None, ["model.size=tiny", "model.img_size=64", "model.num_classes=4",
                                           "model.num_queries=6", "model.num_query_blocks=2"]).model).eval()
    model.set_mask_probs([1.0, 1.0])
    img = [torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)]
    off = run_padded(model, img, 64, masked=False)[0][0]
    on = run_padded(model, img, 64, masked=True)[0][0]
    assert model.masked_inference is False  # restored
    assert off.shape == on.shape == (6, 48, 64)
    assert not torch.allclose(on, off)  # masked attention changes the final prediction
    assert torch.allclose(run_padded(model, img, 64)[0][0], off)


class RandomModel(nn.Module):
    """Random prediction sets (a fixed generator), Q queries at 1/4 of the input."""

    def __init__(self, queries=37, classes=5):
        super().__init__()
        self.q, self.c = queries, classes
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, images):
        b, _, s, _ = images.shape
        return [PredictionSet(torch.randn(b, self.q, s // 4, s // 4, generator=self.gen) * 4,
                              torch.randn(b, self.q, self.c + 1, generator=self.gen))]


def _whole_batch_padded(pred, images, size):
    """The former padded path: the whole batch upsampled to (B, Q, S, S) at once."""
    _, kept = pad_to_square(images, size)
    masks = F.interpolate(pred.mask_logits.float(), size=(size, size), mode="bilinear", align_corners=False)
    return [F.interpolate(masks[i:i + 1, :, :nh, :nw], size=tuple(img.shape[-2:]), mode="bilinear",
                          align_corners=False)[0] for i, (img, (nh, nw)) in enumerate(zip(images, kept))]


@pytest.mark.parametrize("chunk", [8, 32, 1000])
def test_padded_masks_per_image_and_query_chunk_equal_the_whole_batch(chunk):
    from study.eval.inference import iter_padded

    images = [_ramp(30, 60), _ramp(64, 40), _ramp(17, 9)]
    pred = RandomModel()(pad_to_square(images, 64)[0])[-1]
    ref = _whole_batch_padded(pred, images, 64)
    got = list(iter_padded(RandomModel(), images, 64, chunk=chunk))  # same generator seed: same prediction
    assert len(got) == 3
    for (m, c), r, k in zip(got, ref, pred.class_logits):
        assert torch.equal(m, r) and torch.equal(c, k)


def test_windowed_per_crop_upsampling_equals_the_whole_batch():
    images = [_ramp(40, 100), _ramp(20, 20)]
    out = run_windowed(RandomModel(), images, 20, batch_size=3)
    model, crops = RandomModel(), torch.cat([window_crops(img, 20)[0] for img in images])
    per_crop = []
    for i in range(0, len(crops), 3):  # the former path: a batch of crops upsampled at once
        pred = model(crops[i:i + 3])[-1]
        masks = F.interpolate(pred.mask_logits.float(), size=(20, 20), mode="bilinear", align_corners=False)
        per_crop.extend(semantic_logits(m, c) for m, c in zip(masks, pred.class_logits))
    assert torch.equal(out[1], F.interpolate(per_crop[-1][None], size=(20, 20), mode="bilinear",
                                             align_corners=False)[0])  # the one-crop image, exactly
    # the first image: its crops, averaged where they overlap, as run_windowed does
    starts = window_crops(images[0], 20)[1]
    total, count = torch.zeros(5, 20, 50), torch.zeros(1, 20, 50)
    for s, logits in zip(starts, per_crop):
        total[:, :, s:s + 20] += logits
        count[:, :, s:s + 20] += 1
    ref = F.interpolate((total / count)[None], size=(40, 100), mode="bilinear", align_corners=False)[0]
    assert torch.equal(out[0], ref)


# ------------------------------------------------- post-processing a chunk of queries at a time (issue 16)


def _former_panoptic_merge(mask_logits, class_logits, is_thing, score_threshold, overlap_threshold, mask_threshold):
    """The merge as it was on every query's full-size masks at once (git history of postprocess.py)."""
    num_classes = class_logits.shape[-1] - 1
    scores, labels = F.softmax(class_logits.float(), dim=-1).max(-1)
    keep = (labels != num_classes) & (scores > score_threshold)
    ids = torch.zeros(mask_logits.shape[-2:], dtype=torch.int64)
    segments = []
    if not bool(keep.any()):
        return ids, segments
    scores, labels = scores[keep], labels[keep]
    probs = mask_logits[keep].float().sigmoid()
    winner = (scores[:, None, None] * probs).argmax(0)
    stuff_ids = {}
    for k in range(len(labels)):
        label = int(labels[k])
        won = winner == k
        won_area = int(won.sum())
        above = probs[k] >= mask_threshold
        above_area = int(above.sum())
        mask = won & above
        if won_area == 0 or above_area == 0 or not bool(mask.any()):
            continue
        if won_area / above_area < overlap_threshold:
            continue
        thing = bool(is_thing[label])
        if not thing and label in stuff_ids:
            ids[mask] = stuff_ids[label]
            continue
        seg_id = len(segments) + 1
        if not thing:
            stuff_ids[label] = seg_id
        ids[mask] = seg_id
        segments.append({"id": seg_id, "label": label, "isthing": thing, "score": float(scores[k])})
    return ids, segments


def _former_instance_topk(mask_logits, class_logits, top_k):
    num_classes = class_logits.shape[-1] - 1
    probs = F.softmax(class_logits.float(), dim=-1)[:, :num_classes]
    top_scores, flat = probs.flatten().topk(min(top_k, probs.numel()), sorted=True)
    logits = mask_logits[flat // num_classes].float()
    masks = logits > 0
    mask_prob = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    return masks, flat % num_classes, top_scores * mask_prob


def _blobs(q, s, seed):
    """Mask logits (Q, s, s) of round blobs of random centres and radii (so queries overlap partly), class
    logits with confident classes (so most queries are kept)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(s).float(), torch.arange(s).float(), indexing="ij")
    c = torch.rand(q, 2, generator=g) * s
    r = 1 + torch.rand(q, generator=g) * s / 5
    d = ((yy - c[:, :1, None]) ** 2 + (xx - c[:, 1:, None]) ** 2).sqrt()
    masks = (r[:, None, None] - d) * (0.5 + torch.rand(q, 1, 1, generator=g)) + torch.randn(q, s, s, generator=g) * 0.3
    classes = torch.randn(q, 8, generator=g)
    classes[torch.arange(q), torch.randint(0, 7, (q,), generator=g)] += 6
    return masks, classes


@pytest.mark.parametrize("queries,chunk,threads", [(200, 32, 2), (37, 8, 2), (61, 32, 1), (100, 1000, 2)])
def test_chunked_postprocessing_equals_the_whole_query_set(queries, chunk, threads):
    """Panoptic merge and instance top-k reading (c, H, W) chunks give exactly the former results on every
    query's (Q, H, W) masks, upsampled by the former whole-batch path."""
    from study.eval.inference import iter_query_chunks
    from study.eval.postprocess import instance_topk_chunks, panoptic_merge_chunks

    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        low, classes = _blobs(queries, 24, seed=queries)
        images = [_ramp(75, 90)]
        kept = pad_to_square(images, 96)[1][0]
        full = _whole_batch_padded(PredictionSet(low[None], classes[None]), images, 96)[0]
        is_thing = [True, True, True, False, False, False, True]
        placed = 0
        for st, ot in ((0.8, 0.8), (0.3, 0.1)):
            ids, segs = _former_panoptic_merge(full, classes, is_thing, st, ot, 0.5)
            got = panoptic_merge_chunks(iter_query_chunks(low, 96, kept, (75, 90), chunk), classes, (75, 90),
                                        is_thing, st, ot, 0.5)
            assert torch.equal(got.ids, ids) and got.segments == segs
            placed += len(segs)
        assert placed >= 3  # a real merge: segments placed (and, with this many queries, others dropped)
        masks, labels, scores = _former_instance_topk(full, classes, 100)
        got = instance_topk_chunks(iter_query_chunks(low, 96, kept, (75, 90), chunk), classes, (75, 90), 100)
        assert torch.equal(got.masks, masks) and torch.equal(got.labels, labels) and torch.equal(got.scores, scores)
    finally:
        torch.set_num_threads(n)


def test_chunks_not_a_multiple_of_8_round_differently():
    """Why eval.query_chunk is a multiple of 8: a chunk of 5 sends every map through the CPU kernel's scalar
    path, which rounds differently from the 8-plane SIMD groups of the whole-set call (on a CPU where the
    whole-set call uses them; CUDA has no such groups)."""
    from study.eval.inference import _to_original

    low = torch.randn(40, 16, 16) * 4
    whole = _to_original(low, 64, (48, 64), (37, 50), chunk=1000)
    assert torch.equal(_to_original(low, 64, (48, 64), (37, 50), chunk=8), whole)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert not torch.equal(_to_original(low, 64, (48, 64), (37, 50), chunk=5), whole)
