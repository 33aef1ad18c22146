"""Inference against the official code run on the same inputs (issue 27 item 6).

The official module's whole ``eval_step`` runs (panoptic, instance, semantic) with its network replaced by a
stand-in that returns fixed logits; its metric update is replaced by a recorder, so what is compared is exactly
what the official code scores: its resize and pad (or windows), the upsampling and revert of the logits, and
``to_per_pixel_preds_panoptic`` (score and overlap thresholds 0.8), the top-k instance selection, the
per-pixel semantic logits. Ours runs the same stand-in through study/eval/inference.py and postprocess.py.

- The images the network sees: identical (both resize the uint8 image with Pillow's bilinear filter).
- Panoptic and instance: the logits go through the same interpolations (same planes in the same SIMD groups,
  study/eval/inference.py), so the per-pixel predictions are identical: 0 differing pixels.
- Semantic: the official code sums over queries in one batched einsum ``bqhw,bqc->bchw``, ours per crop
  ``qc,qhw->chw``: the same terms, maybe in another order, so the class logits agree to float32 rounding
  (1e-6 here) and the argmax may differ only where two classes tie to that rounding: 0 pixels on these inputs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from conftest import data_dir
from official_oracle import official
from study.eval.inference import pad_to_square, padded_forward, run_windowed, window_crops
from study.eval.postprocess import instance_topk_chunks, panoptic_merge_chunks
from study.models.contract import PredictionSet
from test_official_model import pair

C, Q, STUFF = 6, 16, [3, 4, 5]  # classes 0-2 things, 3-5 stuff


def read_images(folder: str, pattern: str = "*.jpg") -> list[torch.Tensor]:
    paths = sorted(data_dir(folder).glob(pattern))
    return [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).contiguous() for p in paths]


def make_logits(n: int, size: int, seed: int = 0):
    """Smooth mask logits (n, Q, S/4, S/4) and class logits (n, Q, C + 1). Queries 0-9 are confident (class
    scores from about 0.4 to 1, stuff classes repeated so that stuff merging runs) and each covers its own
    cells of a 4 x 4 grid; query 9 also covers the cells of queries 7 and 8, more weakly, so its won area is a fraction of
    its mask (the overlap threshold decides); the other queries are uncertain."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randn(n, Q, 4, 4, generator=g) - 4
    owner = torch.randint(0, 10, (n, 4, 4), generator=g)
    for b in range(n):
        for k in range(10):
            cells[b, k][owner[b] == k] += 10
        cells[b, 9][(owner[b] == 8) | (owner[b] == 7)] += 9
    masks = F.interpolate(cells, size=(size // 4, size // 4), mode="bilinear")
    classes = torch.randn(n, Q, C + 1, generator=g)
    pick = torch.randint(0, C, (n, 10), generator=g)
    for b in range(n):
        classes[b, torch.arange(10), pick[b]] += torch.linspace(1.0, 9.0, 10)
    return masks, classes


class Recorder(nn.Module):
    """A network that returns fixed logits for whatever batch it gets and keeps its input."""

    def __init__(self, size: int, official_layout: bool):
        super().__init__()
        self.size, self.official_layout = size, official_layout
        self.masked_inference = False  # read by study.eval.inference.masking
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        m, c = make_logits(x.shape[0], self.size)
        return ([m], [c]) if self.official_layout else [PredictionSet(m, c)]


def official_module(kind: str, size: int, **kw):
    cls = {"panoptic": ("training.mask_classification_panoptic", "MaskClassificationPanoptic"),
           "instance": ("training.mask_classification_instance", "MaskClassificationInstance"),
           "semantic": ("training.mask_classification_semantic", "MaskClassificationSemantic")}[kind]
    module = getattr(official(cls[0]), cls[1])
    extra = {"stuff_classes": STUFF} if kind == "panoptic" else {}
    m = module(network=pair("tiny", img=32)[0], img_size=(size, size), num_classes=C,
               attn_mask_annealing_enabled=False, **extra, **kw)
    m.network = Recorder(size, official_layout=True)
    m.recorded = []
    setattr(m, f"update_metrics_{kind}", lambda preds, *rest: m.recorded.append(preds))
    return m


def dummy_targets(images):
    out = []
    for img in images:
        h, w = img.shape[-2:]
        masks = torch.zeros(1, h, w, dtype=torch.bool)
        masks[0, : h // 2] = True
        out.append({"masks": masks, "labels": torch.tensor([1]), "is_crowd": torch.tensor([False])})
    return out


def panoptic_as_official(res, hw) -> torch.Tensor:
    """Our panoptic result as the official (H, W, 2): (class, 0-based segment), void = (C, -1)."""
    label_of = torch.full((len(res.segments) + 1,), C, dtype=torch.long)
    for s in res.segments:
        label_of[s["id"]] = s["label"]
    return torch.stack([label_of[res.ids], res.ids - 1], -1)


# ---- the images the network sees

@pytest.mark.parametrize("size", [64, 640, pytest.param(1280, marks=pytest.mark.slow)])
def test_padded_images_equal(size, one_thread):
    images = read_images("coco_panoptic_sample/input_images")
    off = official_module("panoptic", size)
    theirs = off.resize_and_pad_imgs_instance_panoptic(images).float() / 255
    ours, kept = pad_to_square(images, size)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("size", [64, 512])
def test_window_crops_equal(size, one_thread):
    images = read_images("ade20k_sample/images")
    off = official_module("semantic", size)
    crops, origins = off.window_imgs_semantic(images)
    ours = [window_crops(img, size) for img in images]
    assert torch.equal(torch.cat([c for c, _, _ in ours]), crops.float() / 255)
    assert [s for _, starts, _ in ours for s in starts] == [start for _, start, _ in origins]


# ---- panoptic, instance, semantic predictions

def test_panoptic_per_pixel_predictions_identical(one_thread):
    images = read_images("coco_panoptic_sample/input_images")
    images.append(torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8))  # upscaled to the input size
    size = 64
    off = official_module("panoptic", size)
    off.eval_step((images, dummy_targets(images)))
    (theirs,) = off.recorded
    mine = Recorder(size, official_layout=False)
    pred = padded_forward(mine, images, size)
    assert torch.equal(mine.inputs[0], off.network.inputs[0])  # the official forward divides by 255
    is_thing = [c not in STUFF for c in range(C)]
    segments = 0
    for i, img in enumerate(images):
        res = panoptic_merge_chunks(pred.chunks(i), pred.classes(i), pred.out_hw[i], is_thing, 0.8, 0.8, 0.5)
        ours = panoptic_as_official(res, pred.out_hw[i])
        assert ours.shape == theirs[i].shape
        assert int((ours != theirs[i]).any(-1).sum()) == 0, f"image {i}: differing pixels"
        segments += len(res.segments)
    assert segments >= 6  # several segments, stuff among them: the merge is exercised


@pytest.mark.parametrize("thresholds", [(0.5, 0.8), (0.8, 0.0)])
def test_the_panoptic_thresholds_matter_here(thresholds, one_thread):
    """The inputs above are sensitive to both thresholds: the official result moves with each."""
    images = read_images("coco_panoptic_sample/input_images")
    base, other = official_module("panoptic", 64), official_module("panoptic", 64, mask_thresh=thresholds[0],
                                                                    overlap_thresh=thresholds[1])
    for m in (base, other):
        m.eval_step((images, dummy_targets(images)))
    assert any(not torch.equal(a, b) for a, b in zip(base.recorded[0], other.recorded[0]))


def test_instance_predictions_identical(one_thread):
    images = read_images("coco_panoptic_sample/input_images")
    size, top_k = 64, 10
    off = official_module("instance", size, eval_top_k_instances=top_k)
    off.eval_step((images, dummy_targets(images)))
    (theirs,) = off.recorded
    pred = padded_forward(Recorder(size, official_layout=False), images, size)
    for i in range(len(images)):
        res = instance_topk_chunks(pred.chunks(i), pred.classes(i), pred.out_hw[i], top_k)
        t = theirs[i]
        order = torch.argsort(t["scores"], descending=True)  # the official top-k is unsorted
        mine = torch.argsort(res.scores, descending=True)  # ours is in class-score order
        torch.testing.assert_close(res.scores[mine], t["scores"][order], rtol=1e-6, atol=1e-7)
        assert torch.equal(res.labels[mine], t["labels"][order])
        assert int((res.masks[mine] != t["masks"][order]).sum()) == 0


def test_semantic_per_pixel_predictions_identical(one_thread):
    images = read_images("ade20k_sample/images")
    size = 64
    off = official_module("semantic", size)
    targets = [{"masks": d["masks"], "labels": d["labels"]} for d in dummy_targets(images)]
    off.eval_step((images, targets), batch_idx=1)  # batch 0 would plot
    (theirs,) = off.recorded
    mine = Recorder(size, official_layout=False)
    ours = run_windowed(mine, images, size, batch_size=64)  # one forward over every crop, as the official
    assert torch.equal(mine.inputs[0], off.network.inputs[0])  # the official forward divides by 255
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert int((a.argmax(0) != b.argmax(0)).sum()) == 0
