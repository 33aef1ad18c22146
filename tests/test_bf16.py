"""bf16 on the CPU: autocast inference of every Table 1 variant and a bf16 weights-only EoMT stay close to fp32;
a bf16 autocast training step of tiny EoMT gives fp32's loss and update closely.

Tolerances, as relative L2 errors ||bf16 - fp32|| / ||fp32|| of the final mask and class logits. bf16 keeps
8 significant bits: each rounding errs by at most u = 2^-8 (0.39%) relative. A forward of tiny EoMT rounds
the activations at about 20 ops in sequence (every matmul output under autocast); independent errors add up
to about sqrt(20) u = 1.7e-2, measured 0.3e-2 to 1.3e-2. EoMT is held to 8u = 3.1e-2. The baselines' 9-layer
Mask2Former decoder thresholds mask logits at 0 before every layer: a rounding that flips a pixel's sign
changes which pixels a query attends to, an error that is not proportional to u; measured up to 4.6e-2 with
1-1.5% of the mask signs flipped, they are held to 16u = 6.3e-2 and 97.5% of signs kept. Each test also checks
that the error is not zero, i.e. that bf16 arithmetic actually ran.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch

from test_export_onnx import ROWS, _shuffle_weights, tiny

U = 2.0 ** -8  # bf16's unit roundoff (8 significant bits)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _compare(model, low_forward) -> tuple[float, float, float]:
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(images)[-1]
        got = low_forward(images)[-1]
    assert got.mask_logits.dtype == torch.bfloat16  # the head ran in bf16
    signs = float(((got.mask_logits > 0) == (ref.mask_logits > 0)).float().mean())
    return rel(got.mask_logits, ref.mask_logits), rel(got.class_logits, ref.class_logits), signs


@pytest.mark.parametrize("variant", ROWS)
def test_autocast_inference_close_to_fp32(variant, one_thread):
    model = tiny(variant)
    eomt = variant.startswith("eomt")
    if eomt:  # random masks that matter (at its own init EoMT's masks are all open)
        _shuffle_weights(model)

    def bf16(images):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(images)

    masks, classes, signs = _compare(model, bf16)
    tol, kept = (8 * U, 0.99) if eomt else (16 * U, 0.975)
    assert 1e-4 < masks <= tol and 1e-4 < classes <= tol, (masks, classes)
    assert signs >= kept


@pytest.mark.parametrize("variant", ["eomt", "eomt_masked"])
def test_bf16_weights_inference_close_to_fp32(variant, one_thread):
    """The model cast to bf16 (no autocast: LayerNorm, softmax and the residual stream in bf16 too), as the
    bf16 benchmark's ``bf16_weights`` mode runs it; measured 1.0e-2 / 2.0e-2, held to 12u = 4.7e-2."""
    model = tiny(variant)
    _shuffle_weights(model)
    low = copy.deepcopy(model).to(torch.bfloat16)
    masks, classes, signs = _compare(model, lambda images: low(images.to(torch.bfloat16)))
    assert 1e-4 < masks <= 12 * U and 1e-4 < classes <= 12 * U, (masks, classes)
    assert signs >= 0.99


def test_autocast_training_step_close_to_fp32(tmp_path):
    """One optimiser step of tiny EoMT through the trainer (study/train/loop.py run_step) with
    train.precision=bf16 and fp32 from the same weights, batch and random draws: the losses agree within 16u
    relative (the matcher and the sampled points see bf16 logits), and the parameter updates point the same way:
    cosine > 0.95, measured 0.976. AdamW's first update is lr * g / |g| per element, so every element moves by
    the same lr in both runs except those whose gradient is so near zero that bf16 flips its sign; unrelated
    updates would give a cosine near 0."""
    from study.device import ProcessEnv
    from study.runs import RunDir
    from study.train.loop import batches, log_values, run_step, setup
    from test_train_loop import TINY

    root = str(tmp_path / "synthetic")
    results = {}
    for precision in ("fp32", "bf16"):
        from study.config import load_config

        cfg = load_config(None, TINY + [f"data.root={root}", "train.max_steps=2", "train.warmup_steps=0",
                                        "train.backbone_warmup_steps=0", f"train.precision={precision}"])
        torch.manual_seed(0)
        tr = setup(cfg, RunDir(tmp_path / precision), ProcessEnv(), torch.device("cpu"))
        tr.model.train()
        before = torch.cat([p.detach().flatten().clone() for p in tr.model.parameters()])
        _, micro = next(batches(tr, 0))
        torch.manual_seed(1)
        logged = log_values(tr, run_step(tr, micro))
        after = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
        assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # autocast leaves the weights fp32
        results[precision] = (before, after - before, logged["loss"])
    (b32, d32, l32), (b16, d16, l16) = results["fp32"], results["bf16"]
    assert torch.equal(b32, b16)  # the same start
    assert l16 != l32 and abs(l16 - l32) <= 16 * U * abs(l32), (l16, l32)
    assert float(torch.nn.functional.cosine_similarity(d32, d16, dim=0)) > 0.95


def test_bf16_benchmark_prints_every_mode(capsys):
    """The benchmark runs end to end on tiny EoMT (its figures are printed, never asserted)."""
    from study.bench.bf16 import MODES, main

    assert main(["--size", "tiny", "--img-size", "32", "--rounds", "1", "--threads", "1", "--top", "2"]) == 0
    out = capsys.readouterr().out
    # both probes of each precision (tiny at 32 px: 9 tokens of 64 channels; study/bench/limit.py), the limit
    # from the faster, and each mode's ratio with its interval
    for prec in ("fp32", "bf16"):
        assert f"matmul probe {prec} 2048x2048x2048" in out and f"matmul probe {prec} 9x64x256" in out
        assert any(line.strip().startswith(f"{prec} probes") and "the limit takes" in line for line in out.splitlines())
    for mode in MODES:
        assert f"profile {mode}" in out
        line = next(line for line in out.splitlines() if line.split()[:1] == [mode] and "probes" not in line)
        assert "[" in line and "-" in line.split("[")[1]  # ratio [low-high]
    rates = re.findall(r"its linear layers (\d+) GFLOP/s", out)  # the bf16 modes' own linear-layer rate
    assert len(rates) == len(MODES) - 1 and all(int(r) >= 1 for r in rates), rates
