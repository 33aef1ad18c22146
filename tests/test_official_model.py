"""Our EoMT against the official EoMT code run on the same inputs (issue 27 item 1).

The official ``EoMT`` on its ``ViT`` (timm backbone, nothing downloaded; tests/official_oracle.py) and ours,
with the same weights: at S size (DINOv2-S with registers, patch 16) on 64 x 64 inputs, and at tiny size by
swapping the official encoder's timm backbone for ours after it is built.

Tolerance 1e-5 (absolute, on logits of order 1-10): the two models run the same operations in the same order
on the same weights (timm's blocks; the official code calls the attention's parts itself, we call the timm
block), so they differ at most by a kernel's summation order: fused attention vs the block's own call, and our
channels-last mask product (study/models/eomt.py ``mask_product``, within a 384-term dot product's rounding,
about 1e-6 on these logits).
"""
from __future__ import annotations

import re

import pytest
import torch

from official_oracle import official, official_vit
from study.models.backbone import build_backbone
from study.models.checkpoint import convert_state_dict
from study.models.eomt import EoMT

TOL = 1e-5
NUM_CLASSES, NUM_Q = 5, 7


def _official_eomt(size: str, img: int, l2: int, masked: bool):
    eomt = official("models.eomt")
    if size == "S":
        encoder = official_vit(img, "vit_small_patch14_reg4_dinov2")
    else:  # tiny: the official wrapper around our tiny timm ViT (built small, swapped in)
        encoder = official_vit(img, "vit_small_patch14_reg4_dinov2")
        encoder.backbone = build_backbone("tiny", None, img).vit
    return eomt.EoMT(encoder, NUM_CLASSES, NUM_Q, num_blocks=l2, masked_attn_enabled=masked)


def official_to_ours(sd: dict) -> dict:
    """The official network's state dict (as the Lightning module names it) in our names."""
    return convert_state_dict({"network." + k: v for k, v in sd.items()}, "official")


# Ours -> official: the inverse of study/models/checkpoint.py's rules, written here independently.
_TO_OFFICIAL = [(r"^backbone\.vit\.", "encoder.backbone."), (r"^backbone\.pixel_", "encoder.pixel_"),
                (r"^head\.", ""), (r"^(q\.|attn_mask_probs$)", r"\1")]


def ours_to_official(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        pat, rep = next((p, r) for p, r in _TO_OFFICIAL if re.match(p, k))
        out[re.sub(pat, rep, k)] = v
    return out


def pair(size="S", img=64, masked=True, masked_inference=True, seed=0):
    torch.manual_seed(seed)
    off = _official_eomt(size, img, 3 if size == "S" else 2, masked)
    with torch.no_grad():  # timm's init, but LayerScale at 0.1-0.3 (timm starts it at 1e-5: blocks near identity)
        for name, p in off.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(0.1, 0.3)
    ours = EoMT(build_backbone(size, None, img), NUM_CLASSES, NUM_Q, off.num_blocks, masked_attention=masked,
                masked_inference=masked_inference)
    ours.load_state_dict(official_to_ours(off.state_dict()), strict=True)
    return off, ours


def official_sets(off, images):
    masks, classes = off(images)
    return list(zip(masks, classes))


def assert_sets_close(a, b):
    assert len(a) == len(b)
    for (ma, ca), (mb, cb) in zip(a, b):
        torch.testing.assert_close(ma, mb, atol=TOL, rtol=0)
        torch.testing.assert_close(ca, cb, atol=TOL, rtol=0)


@pytest.mark.parametrize("size", ["S", "tiny"])
def test_eval_masked_every_prediction_set(size, one_thread):
    off, ours = pair(size)
    off.eval(), ours.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = official_sets(off, images), [tuple(s) for s in ours(images)]
    assert len(b) == off.num_blocks + 1
    assert_sets_close(a, b)


@pytest.mark.parametrize("size", ["S", "tiny"])
def test_eval_unmasked(size, one_thread):
    off, ours = pair(size, masked=False, masked_inference=False)
    off.eval(), ours.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = official_sets(off, images), [tuple(s) for s in ours(images)]
    assert len(a) == len(b) == 1
    assert_sets_close(a, b)


def test_eval_after_annealing_final_set_equal(one_thread):
    """At the end of annealing (P_mask = 0) the official model still runs its masked branch and opens every
    query (rand > 0); ours skips the branch (masking_active). The final prediction is the same."""
    off, ours = pair("S", masked_inference=False)
    off.attn_mask_probs.zero_()
    ours.set_mask_probs([0.0] * 3)
    off.eval(), ours.eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = official_sets(off, images), [tuple(s) for s in ours(images)]
    assert len(a) == 4 and len(b) == 1
    assert_sets_close(a[-1:], b)


@pytest.mark.parametrize("size", ["S", "tiny"])
def test_training_mode_with_probabilities_between_0_and_1(size, one_thread):
    """Training mode, P_mask in (0, 1): each masked layer draws (B, Q) uniforms in the same order, so with the
    same seed the same queries are opened."""
    off, ours = pair(size)
    probs = [0.3, 0.6, 0.9][: off.num_blocks]
    off.attn_mask_probs.copy_(torch.tensor(probs))
    ours.set_mask_probs(probs)
    off.train(), ours.train()
    images = torch.rand(2, 3, 64, 64)
    torch.manual_seed(5)
    a = official_sets(off, images)
    torch.manual_seed(5)
    b = [tuple(s) for s in ours(images)]
    assert_sets_close(a, b)
    torch.manual_seed(6)  # other draws open other queries: the comparison above sees the draws
    c = [tuple(s) for s in ours(images)]
    assert any((x[0] - y[0]).abs().max() > 1e-3 for x, y in zip(a[1:], c[1:]))


def test_state_dicts_load_both_ways(one_thread):
    off, ours = pair("S")
    # ours -> official: every official key filled, none left over
    fresh_off = _official_eomt("S", 64, 3, True)
    missing = fresh_off.load_state_dict(ours_to_official(ours.state_dict()), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    for k, v in off.state_dict().items():
        assert torch.equal(fresh_off.state_dict()[k], v), k
    # official -> ours: the same tensors under our names (pair() loaded them strictly)
    assert set(official_to_ours(off.state_dict())) == set(ours.state_dict())
