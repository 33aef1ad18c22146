"""Our deformable attention, pixel decoder and Transformer decoder against Hugging Face's Mask2Former (the
implementation the paper's authors used): same weights in, same numbers out."""
from __future__ import annotations

import pytest

from conftest import oracle, require
import torch

from baselines.deform_attn import MSDeformAttn, deform_attn, deform_attn_core
from baselines.hf import decoder_from_hf, pixel_decoder_from_hf
from baselines.m2f_decoder import MaskedAttentionDecoder
from baselines.pixel_decoder import PixelDecoder

m2f = oracle("transformers.models.mask2former.modeling_mask2former")

DIM, HEADS, QUERIES, CLASSES = 64, 4, 7, 5


def hf_config(**kw):
    base = dict(feature_size=DIM, mask_feature_size=DIM, hidden_dim=DIM, encoder_feedforward_dim=96,
                encoder_layers=2, decoder_layers=10, num_attention_heads=HEADS, dim_feedforward=80,
                num_queries=QUERIES, num_labels=CLASSES)
    base.update(kw)
    return m2f.Mask2FormerConfig(**base)


def randomise(module: torch.nn.Module, offsets_std: float = 3.0) -> None:
    """Random weights everywhere (HF leaves some uninitialised outside a PreTrainedModel), with large sampling
    offsets so that deformable sampling leaves the maps (zeros padding is exercised)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = offsets_std if name.endswith("sampling_offsets.bias") else 0.15
            p.copy_(torch.randn(p.shape, generator=g) * std)
            if name.endswith(("norm.weight", ".1.weight")) and p.dim() == 1:  # LayerNorm / GroupNorm scales
                p.add_(1.0)


def random_inputs(n=2, heads=3, d=8, shapes=((9, 11), (5, 6), (3, 3)), lq=13, points=4):
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, heads, d)
    loc = torch.rand(n, lq, heads, len(shapes), points, 2) * 1.4 - 0.2  # some points outside [0, 1]
    w = torch.rand(n, lq, heads, len(shapes), points).softmax(-1)
    return value, list(shapes), loc, w


def test_core_matches_hf_function():
    value, shapes, loc, w = random_inputs()
    ours = deform_attn_core(value, shapes, loc, w)
    theirs = m2f.multi_scale_deformable_attention(value, shapes, loc, w)
    assert ours.shape == theirs.shape == (2, 13, 3 * 8)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_compiled_op_agrees_with_pytorch():
    require("torch_ms_deform_attn")
    value, shapes, loc, w = random_inputs()
    torch.testing.assert_close(deform_attn(value, shapes, loc, w, compiled=True),
                               deform_attn(value, shapes, loc, w, compiled=False), atol=1e-5, rtol=1e-5)


def test_float32_inside_autocast():
    value, shapes, loc, w = random_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_attn(value.bfloat16(), shapes, loc.bfloat16(), w.bfloat16())
    assert out.dtype == torch.float32


def test_module_matches_hf_module():
    ours = MSDeformAttn(DIM, HEADS, 3, 4)
    theirs = m2f.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(DIM, HEADS, 3, 4)
    randomise(theirs)
    ours.load_state_dict(theirs.state_dict())
    shapes = [(8, 8), (4, 4), (2, 2)]
    x = torch.randn(2, 84, DIM)
    ref = torch.rand(2, 84, 3, 2)
    expected, _ = theirs(x, encoder_hidden_states=x, reference_points=ref, spatial_shapes_list=shapes)
    torch.testing.assert_close(ours(x, ref, x, shapes), expected, atol=1e-5, rtol=1e-5)


def test_reference_initialisation():
    """Offsets' bias: a ring of head directions scaled by point index; attention weights zero."""
    m = MSDeformAttn(32, 4, 2, 3)
    bias = m.sampling_offsets.bias.view(4, 2, 3, 2)
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(bias[1, 1], torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]), atol=1e-6, rtol=0)
    assert m.attention_weights.weight.abs().sum() == 0 and m.sampling_offsets.weight.abs().sum() == 0


def test_pixel_decoder_matches_hf():
    torch.manual_seed(0)
    in_dim = 48
    theirs = m2f.Mask2FormerPixelDecoder(hf_config(), feature_channels=[in_dim] * 4).eval()
    randomise(theirs)
    ours = PixelDecoder(in_dim, DIM, layers=2, heads=HEADS, points=4, ffn=96).eval()
    ours.load_state_dict(pixel_decoder_from_hf(theirs.state_dict()))
    feats = [torch.randn(2, in_dim, 64 // s, 48 // s) for s in (4, 8, 16, 32)]  # non-square on purpose
    with torch.no_grad():
        expected = theirs(feats)
        mask_features, levels = ours(dict(zip((4, 8, 16, 32), feats)))
    torch.testing.assert_close(mask_features, expected.mask_features, atol=1e-4, rtol=1e-4)
    assert len(levels) == len(expected.multi_scale_features) == 3
    for a, b in zip(levels, expected.multi_scale_features):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_decoder_matches_hf():
    """All 10 prediction sets (9 layers, masked attention on) with the same weights, to 1e-4."""
    torch.manual_seed(0)
    cfg = hf_config()
    theirs = m2f.Mask2FormerTransformerModule(DIM, cfg).eval()
    randomise(theirs)
    class_predictor = torch.nn.Linear(DIM, CLASSES + 1)
    ours = MaskedAttentionDecoder(DIM, HEADS, 80, 9, 3, QUERIES, CLASSES).eval()
    ours.load_state_dict(decoder_from_hf(theirs.state_dict(), class_predictor.state_dict()))
    levels = [torch.randn(2, DIM, 2, 3), torch.randn(2, DIM, 4, 6), torch.randn(2, DIM, 8, 12)]
    mask_features = torch.randn(2, DIM, 32, 48)
    blocked = []
    with torch.no_grad():
        out = theirs(levels, mask_features)
        sets = ours(levels, mask_features, active=lambda i: True, drop=lambda m, i: blocked.append(m) or m)
    assert len(sets) == len(out.masks_queries_logits) == 10
    for i, (s, hf_masks, hf_hidden) in enumerate(zip(sets, out.masks_queries_logits, out.intermediate_hidden_states)):
        torch.testing.assert_close(s.mask_logits, hf_masks, atol=1e-4, rtol=1e-4, msg=f"set {i} masks")
        torch.testing.assert_close(s.class_logits, class_predictor(hf_hidden.transpose(0, 1)), atol=1e-4, rtol=1e-4,
                                   msg=f"set {i} classes")
    # the comparison is meaningful: masks block part of every level, not nothing and not everything
    frac = torch.stack([m.float().mean() for m in blocked])
    assert len(blocked) == 9 and (frac > 0.05).all() and (frac < 0.95).all()


# --- FLOP counts: the paper counted its Hugging Face Mask2Former with fvcore (docs/paper.md section 8, docs/baseline.md).
# Counting HF's modules with fvcore is therefore an oracle for our counts, at the real widths (HF's default
# Mask2FormerConfig: 256 wide, 6 encoder layers, 9 decoder layers) on a smaller input.


def _fvcore(module, inputs, handles=None) -> int:
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module, inputs).set_op_handle(**(handles or {}))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return analysis.total()


class _Outputs(torch.nn.Module):
    """Adapts a decoder's call and output to what fvcore traces: positional tensors in, a tuple of tensors out."""

    def __init__(self, module, call):
        super().__init__()
        self.module, self.call = module, call

    def forward(self, *tensors):
        return self.call(self.module, tensors)


def test_pixel_decoder_flops_equal_hf():
    """Same count as fvcore gives for HF's pixel decoder (its PyTorch deformable sampling is a grid_sample
    fvcore cannot see, as ours: without handles the two must agree to the multiply-add)."""
    torch.manual_seed(0)
    in_dim, img = 96, 256
    theirs = m2f.Mask2FormerPixelDecoder(m2f.Mask2FormerConfig(), feature_channels=[in_dim] * 4).eval()
    ours = PixelDecoder(in_dim, 256, layers=6, heads=8, points=4, ffn=1024).eval()
    feats = tuple(torch.randn(1, in_dim, img // s, img // s) for s in (4, 8, 16, 32))
    hf_count = _fvcore(_Outputs(theirs, lambda m, f: (lambda o: (o.mask_features, *o.multi_scale_features))(
        m(list(f)))), feats)
    our_count = _fvcore(_Outputs(ours, lambda m, f: (lambda o: (o[0], *o[1]))(m(dict(zip((4, 8, 16, 32), f))))),
                        feats)
    assert our_count == hf_count
    assert hf_count > 5e9  # the 6 encoder layers are in it (about 6 GFLOPs of the total at this size)


def _baddbmm_flop_jit(inputs, outputs):
    """fvcore handle for ``aten::baddbmm`` (input + batch1 @ batch2): the matmul's multiply-adds."""
    from fvcore.nn.jit_handles import get_shape

    b, n, k = get_shape(inputs[1])
    return b * n * k * get_shape(inputs[2])[-1]


def test_decoder_flops_equal_hf():
    """Same count as HF's Transformer decoder (all 10 mask predictions traced) once its masked cross-attention
    QK^T is counted: HF computes it with ``baddbmm`` (the attention mask is added there), which plain fvcore
    skips; the paper's convention counts attention matmuls, as our SDPA handler does."""
    from study.bench.flops import DEFAULT_HANDLES

    torch.manual_seed(0)
    img, queries = 256, 200
    theirs = m2f.Mask2FormerTransformerModule(256, m2f.Mask2FormerConfig(num_queries=queries)).eval()
    ours = MaskedAttentionDecoder(256, 8, 2048, 9, 3, queries, 133).eval()
    levels = tuple(torch.randn(1, 256, img // s, img // s) for s in (32, 16, 8))
    inputs = (*levels, torch.randn(1, 256, img // 4, img // 4))

    def hf_masks(m, t):
        return tuple(m(list(t[:3]), t[3]).masks_queries_logits)

    def our_masks(m, t):
        return tuple(s.mask_logits for s in m(list(t[:3]), t[3], active=lambda i: True, drop=lambda mask, i: mask))

    hf_plain = _fvcore(_Outputs(theirs, hf_masks), inputs)
    hf_count = _fvcore(_Outputs(theirs, hf_masks), inputs, {"aten::baddbmm": _baddbmm_flop_jit})
    our_count = _fvcore(_Outputs(ours, our_masks), inputs, DEFAULT_HANDLES)
    assert our_count == hf_count
    qk = queries * 256 * sum((img // s) ** 2 for s in (32, 16, 8)) * 3  # 9 layers = 3 rounds of the 3 levels
    assert hf_count - hf_plain == qk  # what plain fvcore misses in HF's module: exactly the QK^T products
