"""Parameters and GFLOPs of the baseline chain against the paper (Table 1 at ViT-L 640, Table 3 and the 1280 row).

Counted with the suite's counter (study/bench/flops.py: fvcore, one multiply-add = one FLOP, SDPA counted, the
model's own handles for the deformable sampling), eval mode, batch 1, masked attention at inference (rows 0-3
default; Mask2Former always masks). Full-size counting takes 10 s to 5 min per model on 2 CPU cores: slow tests.

Measured (parameters exact; GFLOPs) vs the paper:
    row 0 vit_adapter_m2f      L 640   348,672,006  831.8    paper 349M  830
    row 1 sfp_m2f              L 640   342,263,622  741.2    paper 342M  700  (+5.9%, see below)
    row 2 sfp_no_pixel_decoder L 640   337,211,782  686.6    paper 337M  685
    row 3 single_scale         L 640   328,273,286  673.8    paper 328M  673
    row 0                      S 640    46,558,422  166.0    paper  47M  165  (deform_ratio 0.5; 1.0: 48.0M, 173.7)
    row 0                      B 640   120,960,294  348.1    paper 121M  347
    row 0                      g 640 1,208,643,014 2512.0    paper 1209M 2510
    row 0                      L 1280  353,587,206 4823.0    paper 354M 4817
Row 1: rows 0, 2 and 3 pin the pixel decoder + adapter (196.6 vs 194.7 implied), the pyramid and the decoder;
with those, the paper's 700 for row 1 would leave 22 GFLOPs for the pixel decoder, less than its 1/4-level
convolutions alone (23.5). No configuration of the public defaults meets both rows 0 and 1; we keep the
faithful one, and the test below records the gap (xfail, strict) instead of hiding it.
"""
from __future__ import annotations

import pytest
import torch

from study.bench.flops import count_flops, count_params
from study.models.build import build_model
from study.models.config import ModelConfig

ROW1_GAP = pytest.mark.xfail(strict=True, reason="row 1 counts 741 GFLOPs vs the paper's 700 (+5.9%); see the "
                                                 "module docstring")

# (variant, size, img_size, exact params, our GFLOPs, paper params in M, paper GFLOPs, tolerance)
CASES = [
    ("vit_adapter_m2f", "L", 640, 348_672_006, 831.8, 349, 830, 0.03),  # Table 1 row 0
    pytest.param("sfp_m2f", "L", 640, 342_263_622, 741.2, 342, 700, 0.03, marks=ROW1_GAP),  # row 1
    ("sfp_no_pixel_decoder", "L", 640, 337_211_782, 686.6, 337, 685, 0.03),  # row 2
    ("single_scale", "L", 640, 328_273_286, 673.8, 328, 673, 0.03),  # row 3
    ("vit_adapter_m2f", "S", 640, 46_558_422, 166.0, 47, 165, 0.05),  # Table 3
    ("vit_adapter_m2f", "B", 640, 120_960_294, 348.1, 121, 347, 0.05),  # Table 3
    ("vit_adapter_m2f", "g", 640, 1_208_643_014, 2512.0, 1209, 2510, 0.05),  # Table 3
    ("vit_adapter_m2f", "L", 1280, 353_587_206, 4823.0, 354, 4817, 0.05),  # paper.md section 3, 1280
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
    model = build_model(ModelConfig(variant=variant, size=size, img_size=img))
    n = count_params(model)
    assert n == params  # pinned: a change of the architecture shows here first
    assert abs(n / 1e6 - paper_m) <= tol * paper_m
    flops = count_flops(model, img)
    print(f"{variant} {size} {img}: {n / 1e6:.2f}M {flops.gflops:.1f} GFLOPs (paper {paper_m}M {paper_g})")
    assert not flops.uncounted.keys() - {"aten::unflatten", "aten::any"}  # only shape/boolean ops uncounted
    assert flops.gflops == pytest.approx(ours, abs=0.2)
    assert abs(flops.gflops - paper_g) <= tol * paper_g
