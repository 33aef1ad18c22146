"""Every baseline variant (Table 1 rows 0-3) at toy size on the CPU follows the model contract."""
from __future__ import annotations

import pytest
import torch

from baselines.variants import BUILDERS, VARIANTS
from study.models.build import build_model
from study.models.config import ModelConfig

# Small widths so that a forward takes milliseconds; the structure is the full one (9 decoder layers).
SMALL = dict(hidden_dim=32, encoder_layers=2, encoder_heads=4, encoder_ffn=48, decoder_heads=4, decoder_ffn=48,
             conv_inplane=32)
IMG, CLASSES, QUERIES = 64, 5, 6


def tiny(variant: str, **kw) -> torch.nn.Module:
    cfg = ModelConfig(variant=variant, size="tiny", img_size=IMG, num_classes=CLASSES, num_queries=QUERIES,
                      baseline=dict(SMALL), **kw)
    return build_model(cfg)


def test_registry_order():
    assert list(BUILDERS) == ["vit_adapter_m2f", "sfp_m2f", "sfp_no_pixel_decoder", "single_scale"]
    from study.models.build import variants

    assert list(variants())[:4] == list(BUILDERS) and {"eomt", "eomt_masked"} <= set(variants())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_forward_backward(variant):
    model = tiny(variant).train()
    sets = model(torch.rand(2, 3, IMG, IMG))
    assert len(sets) == 10  # before the first layer and after each of the 9 layers, all supervised
    for s in sets:
        assert s.mask_logits.shape == (2, QUERIES, IMG // 4, IMG // 4)
        assert s.class_logits.shape == (2, QUERIES, CLASSES + 1)
    sum(s.mask_logits.square().mean() + s.class_logits.square().mean() for s in sets).backward()
    # every trainable parameter takes part (DDP needs no find_unused_parameters)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused
    assert model.attn_mask_probs.shape == (9,)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inference_with_and_without_masking(variant):
    model = tiny(variant).eval()
    assert model.masked_inference  # Mask2Former masks at inference: the rows' default
    images = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        assert len(model(images)) == 10
        model.masked_inference = False
        final = model(images)
    assert len(final) == 1 and final[0].mask_logits.shape == (1, QUERIES, IMG // 4, IMG // 4)
    assert not tiny(variant, masked_inference=False).masked_inference


@pytest.mark.parametrize("variant", ["sfp_m2f", "single_scale"])
def test_annealing_drives_the_decoder(variant):
    """P_mask = 0 in training opens every query's mask: the final set equals inference without masking;
    with P_mask = 1 the masks change it. (Pyramid rows: no batch statistics, so train = eval numerically.)"""
    model = tiny(variant)
    images = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        model.eval()
        model.masked_inference = False
        unmasked = model(images)[-1].mask_logits
        model.train()
        masked = model(images)[-1].mask_logits
        model.set_mask_probs(torch.zeros(9))
        annealed = model(images)[-1].mask_logits
    torch.testing.assert_close(annealed, unmasked)
    assert not torch.allclose(masked, unmasked, atol=1e-4)


def test_param_groups_layer_decay():
    model = tiny("vit_adapter_m2f")
    groups = model.param_groups(0.8)
    ids = [id(p) for g in groups for p in g.params]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    depth = model.backbone.depth
    scales = sorted(g.lr_scale for g in groups if g.backbone)
    assert scales == pytest.approx([0.8 ** k for k in range(depth - 1, -1, -1)])
    new = [g for g in groups if not g.backbone]
    adapter_params = {id(p) for p in model.adapter.parameters()}
    assert len(new) == 1 and new[0].lr_scale == 1.0 and adapter_params <= {id(p) for p in new[0].params}
    # the adapter never reads the ViT's final norm: frozen, so neither trained nor unused under DDP
    assert not any(p.requires_grad for p in model.backbone.vit.norm.parameters())


@pytest.mark.parametrize("variant,expected", [
    ("vit_adapter_m2f", {"backbone", "adapter", "pixel_decoder", "decoder"}),
    ("sfp_m2f", {"backbone", "pyramid", "pixel_decoder", "decoder"}),
    ("sfp_no_pixel_decoder", {"backbone", "pyramid", "projection", "decoder"}),
    ("single_scale", {"backbone", "pyramid", "projection", "decoder"})])
def test_components_are_disjoint_submodules(variant, expected):
    model = tiny(variant)
    parts = model.components()
    assert set(parts) == expected
    own = {id(m) for m in model.modules()}
    listed = [m for mods in parts.values() for m in mods]
    assert all(id(m) in own for m in listed)
    # no module is listed twice or inside another listed module (a time would be counted twice)
    inner = {id(sub) for m in listed for sub in m.modules() if sub is not m}
    assert len({id(m) for m in listed}) == len(listed) and not inner & {id(m) for m in listed}


def test_component_breakdown_covers_the_time():
    from study.bench.protocol import SpeedProtocol
    from study.bench.speed import measure_fps

    ms = measure_fps(tiny("vit_adapter_m2f"), IMG, SpeedProtocol(device="cpu", warmup=1, iters=2),
                     breakdown=True)["breakdown_ms"]
    assert {"backbone", "adapter", "pixel_decoder", "decoder", "other", "total"} <= set(ms)
    assert sum(v for k, v in ms.items() if k not in ("other", "total")) <= ms["total"] * 1.01


def test_flop_count_sees_the_deformable_sampling():
    """fvcore with our handles: the sampling is counted as 5 multiply-adds per sampled value, nothing of the
    model is left uncounted but element-wise ops."""
    from study.bench.flops import count_flops

    model = tiny("vit_adapter_m2f")
    with_handles = count_flops(model, IMG)
    assert with_handles.by_operator["grid_sampler"] > 0
    assert not {k for k in with_handles.uncounted if "grid" in k or "deform" in k}
    # the adapter's extractor attends from c (8x8 + 4x4 + 2x2 = 84 tokens) into x (4x4): one level, 4 points,
    # 4 heads of 16 (ratio 1): 84 * 4 * 1 * 4 * 16 * 5 multiply-adds per extractor call
    one_extractor = 84 * 4 * 1 * 4 * 16 * 5
    injector = 16 * 4 * 3 * 4 * 16 * 5  # 16 ViT patches sampling 3 levels
    encoder = 84 * 4 * 3 * 4 * 8 * 5  # pixel decoder: 84 tokens, 4 heads of 8, 3 levels
    expected = 6 * one_extractor + 4 * injector + 2 * encoder
    assert with_handles.by_operator["grid_sampler"] == expected


def test_bf16_autocast_forward():
    model = tiny("vit_adapter_m2f").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sets = model(torch.rand(1, 3, IMG, IMG))
    assert len(sets) == 10 and torch.isfinite(sets[-1].mask_logits.float()).all()


def test_batchnorm_becomes_syncbatchnorm_for_ddp():
    from baselines.vit_adapter import convert_sync_batchnorm

    model = convert_sync_batchnorm(tiny("vit_adapter_m2f"))
    kinds = {type(m).__name__ for m in model.adapter.modules()}
    assert "SyncBatchNorm" in kinds and "BatchNorm2d" not in kinds
