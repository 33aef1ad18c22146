"""Parameters and GFLOPs of the baseline chain against the paper (Table 1 at ViT-L 640, Table 3 and the 1280 row).

Counted with the suite's counter (study/bench/flops.py: fvcore's convention, one multiply-add = one FLOP, SDPA
counted, the model's own handles for the deformable sampling; the fast counter on a meta-parameter model, equal to
fvcore's trace per module, tests/test_flop_counters.py), eval mode, batch 1, masked attention at inference (rows
0-3 default; Mask2Former always masks). Full sizes are slow tests: seconds each with the fast counter, but the
row-1 explanation traces a real ViT-L with fvcore (minutes on 2 CPU cores).

Measured (parameters exact; GFLOPs) vs the paper:
    row 0 vit_adapter_m2f      L 640   348,672,006  831.8    paper 349M  830
    row 1 sfp_m2f              L 640   342,263,622  741.2    paper 342M  700  (+5.9%, see below)
    row 2 sfp_no_pixel_decoder L 640   337,211,782  686.6    paper 337M  685
    row 3 single_scale         L 640   328,273,286  673.8    paper 328M  673
    row 0                      S 640    46,558,422  166.0    paper  47M  165  (deform_ratio 0.5; 1.0: 48.0M, 173.7)
    row 0                      B 640   120,960,294  348.1    paper 121M  347
    row 0                      g 640 1,208,643,014 2512.0    paper 1209M 2510
    row 0                      L 1280  353,587,206 4823.0    paper 354M 4817
Where the GFLOPs go at L 640 (``FlopCount.by_component``, also printed by ``study bench``):
    row 0  backbone 613.0  adapter 133.0  pixel decoder 63.4  decoder 22.3
    row 1  backbone 613.0  pyramid  42.5  pixel decoder 63.4  decoder 22.3
    row 2  backbone 613.0  pyramid  42.5  projection     8.9  decoder 22.3
    row 3  backbone 613.0  pyramid  34.0  projection     7.1  decoder 19.7
The pixel decoder's 63.4 (63.3 without our handler for the deformable sampling) is what fvcore gives for
Hugging Face's own Mask2FormerPixelDecoder (the paper's implementation) on the same maps, and our decoder's count equals HF's once HF's masked cross-attention QK^T
(``aten::baddbmm``, which plain fvcore skips: 1.3 GFLOPs here) is counted (tests/test_baselines_hf.py).
Without that QK^T, rows 0, 2 and 3 come to 830.5, 685.3 and 673.1: the paper's 830, 685 and 673.

Row 1 (the open gap): the paper's 700 is our row 1 minus exactly the six deformable encoder layers of the pixel
decoder (741.2 - 37.5 - 1.3 = 702.4), yet its parameter column (342M) holds those layers (without them row 1
has 337.9M). Row 0 counts them (830), and rows 0 and 1 keep the same pixel decoder (docs/paper.md section 2), so
the most likely reading is a counting slip in the paper's row 1. A configuration that meets every target of
this file within its tolerance does exist, 2 encoder layers and ``conv_inplane`` 128 (measured: row 0 L 640
349.56M / 836.2, row 1 339.33M / 716.1, S 47.00M / 168.5, B 121.67M / 351.7, g 1209.90M / 2517.9, L 1280
354.48M / 4840.4; rows 2 and 3 do not change), but it is no longer
Mask2Former's pixel decoder (6 layers in the HF config the authors used), it misses the parameter column at
its printed precision (349.56 -> 350, 339.33 vs 342, 121.67 -> 122), and a 2-layer pixel decoder would make
the baseline weaker in training. We keep the faithful model; its 741.2 is pinned below, and reports print it
beside the paper's 700 with a footnote.
"""
from __future__ import annotations

import pytest
import torch

from study.bench.count_fake import build_meta_model
from study.bench.flops import count_flops, count_params
from study.models.build import build_model
from study.models.config import ModelConfig

# (variant, size, img_size, exact params, our GFLOPs, paper params in M, paper GFLOPs, tolerance)
CASES = [
    ("vit_adapter_m2f", "L", 640, 348_672_006, 831.8, 349, 830, 0.03),  # Table 1 row 0
    # row 1: the paper prints 700 (+5.9%); the GFLOPs target here is our own pinned 741.2, and
    # test_row1_checkpointed_encoder_reproduces_the_paper holds the paper's 700 (see the module docstring)
    ("sfp_m2f", "L", 640, 342_263_622, 741.2, 342, 741.2, 0.03),
    ("sfp_no_pixel_decoder", "L", 640, 337_211_782, 686.6, 337, 685, 0.03),  # row 2
    ("single_scale", "L", 640, 328_273_286, 673.8, 328, 673, 0.03),  # row 3
    ("vit_adapter_m2f", "S", 640, 46_558_422, 166.0, 47, 165, 0.05),  # Table 3
    ("vit_adapter_m2f", "B", 640, 120_960_294, 348.1, 121, 347, 0.05),  # Table 3
    ("vit_adapter_m2f", "g", 640, 1_208_643_014, 2512.0, 1209, 2510, 0.05),  # Table 3
    ("vit_adapter_m2f", "L", 1280, 353_587_206, 4823.0, 354, 4817, 0.05),  # docs/paper.md section 3, 1280
]


def _slow_unless_small(case):
    """The S row runs in the default test set (a few seconds); the others are slow tests."""
    values = case.values if hasattr(case, "values") else case
    marks = list(getattr(case, "marks", ()))
    if values[1] != "S":
        marks.append(pytest.mark.slow)
    return pytest.param(*values, marks=marks)


@pytest.mark.parametrize("variant,size,img,params,ours,paper_m,paper_g,tol", [_slow_unless_small(c) for c in CASES])
def test_params_and_gflops(variant, size, img, params, ours, paper_m, paper_g, tol):
    torch.set_num_threads(2)
    model = build_meta_model(lambda: build_model(ModelConfig(variant=variant, size=size, img_size=img)))
    n = count_params(model)
    assert n == params  # pinned: a change of the architecture shows here first
    assert abs(n / 1e6 - paper_m) <= tol * paper_m
    flops = count_flops(model, img)
    print(f"{variant} {size} {img}: {n / 1e6:.2f}M {flops.gflops:.1f} GFLOPs (paper {paper_m}M {paper_g})")
    assert not flops.uncounted.keys() - {"aten::unflatten", "aten::any"}  # only shape/boolean ops uncounted
    assert flops.gflops == pytest.approx(ours, abs=0.2)
    assert abs(flops.gflops - paper_g) <= tol * paper_g


# (variant, {component: GFLOPs}) at L 640, as in the module docstring
COMPONENTS_L640 = [
    ("vit_adapter_m2f", {"backbone": 613.0, "adapter": 133.0, "pixel_decoder": 63.4, "decoder": 22.3}),
    ("sfp_m2f", {"backbone": 613.0, "pyramid": 42.5, "pixel_decoder": 63.4, "decoder": 22.3}),
    ("sfp_no_pixel_decoder", {"backbone": 613.0, "pyramid": 42.5, "projection": 8.9, "decoder": 22.3}),
    ("single_scale", {"backbone": 613.0, "pyramid": 34.0, "projection": 7.1, "decoder": 19.7}),
]


@pytest.mark.slow
@pytest.mark.parametrize("variant,expected", COMPONENTS_L640)
def test_gflops_by_component_L640(variant, expected):
    torch.set_num_threads(2)
    model = build_meta_model(lambda: build_model(ModelConfig(variant=variant, size="L", img_size=640)))
    split = count_flops(model, 640).by_component
    assert {k: round(v / 1e9, 1) for k, v in split.items() if k != "other"} == expected
    assert split["other"] < 0.2e9


@pytest.mark.slow
def test_row1_checkpointed_encoder_reproduces_the_paper():
    """Row 1 counted as fvcore sees it when the pixel decoder's six deformable encoder layers run under
    re-entrant activation checkpointing: about the paper's 700 (analysis/row1_flops.py)."""
    from analysis.row1_flops import count_checkpointed
    from study.paper_numbers import paper_numbers

    torch.set_num_threads(2)
    r = count_checkpointed("sfp_m2f", "L", 640)
    assert r["gflops"] == pytest.approx(741.2, abs=0.2) and r["encoder_layers"] == 6
    assert r["encoder_layers_gflops"] == pytest.approx(37.6, abs=0.1)
    assert r["gflops_opaque"] == pytest.approx(703.5, abs=0.2)
    assert abs(r["gflops_opaque"] - 1.3 - paper_numbers("sfp_m2f", "L", 640)["GFLOPs"]) < 0.005 * 700
    assert r["gflops_traced"] is None and "unordered_map::at" in r["trace_error"]  # torch 2.14's tracer


def test_an_autograd_function_is_invisible_to_fvcore():
    """The premise of the row-1 explanation, at tiny size: the encoder layers' FLOPs vanish from fvcore's
    count once they run inside an autograd Function (here one that takes only tensors, which the tracer
    records as prim::PythonOp), and the rest of the model's count is unchanged."""
    from analysis.row1_flops import count_traced_with_grad
    from study.bench.flops import count_flops

    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="sfp_m2f", size="tiny", img_size=64))
    plain = count_flops(model, 64)
    layer_flops = plain.by_module["pixel_decoder.layers"]
    assert layer_flops > 0

    class Opaque(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, *params):
            return x.clone()  # stands for a layer fvcore cannot see (the FFN's relu breaks 2.14's tracer)

        @staticmethod
        def backward(ctx, grad):
            return (grad, *(None for _ in ctx.needs_input_grad[1:]))

    for layer in model.pixel_decoder.layers:
        layer.forward = lambda x, pos, ref, shapes, _l=layer: Opaque.apply(x, *_l.parameters())
    hidden, skipped = count_traced_with_grad(model, 64)
    assert skipped.get("prim::PythonOp.Opaque") == len(model.pixel_decoder.layers)
    assert hidden * 1e9 == pytest.approx(plain.total - layer_flops, rel=1e-6)
