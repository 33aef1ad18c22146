"""study/bench/merging.py: per-image GFLOPs with ALGM token merging, and the interleaved FPS protocol."""
from __future__ import annotations

import pytest
import torch

from study.bench import merging
from study.bench.flops import count_flops
from study.models.build import build_model
from study.models.config import ModelConfig, TokenMergingConfig


def tiny():
    torch.manual_seed(0)
    return build_model(ModelConfig(size="tiny", img_size=64, num_classes=5, num_queries=7)).eval()


def crops():
    flat = torch.zeros(3, 64, 64)
    flat[0, :, 32:] = 1.0
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    return [flat, noise, flat.clone()]


def test_cost_counts_each_crop_with_its_own_token_counts():
    model = tiny()
    plain = count_flops(model, 64, counter="fvcore").total / 1e9
    none = merging.cost(model, crops(), TokenMergingConfig(enabled=True, threshold=1.01,
                                                           global_threshold=1.01).resolve("tiny"))
    assert abs(none["gflops_plain"] - round(plain, 4)) < 1e-4
    assert none["gflops_merged_mean"] == none["gflops_plain"] and none["gflops_merged_std"] == 0
    some = merging.cost(model, crops(), TokenMergingConfig(enabled=True).resolve("tiny"))
    assert some["gflops_merged_min"] < some["gflops_plain"]
    assert some["tokens_after_merges"][0]["min"] < some["patch_tokens"] == 16
    assert model.token_merging is None  # left as found


def test_interleaved_fps_reports_both_arms():
    model = tiny()
    out = merging.interleaved_fps(model, crops(), TokenMergingConfig(enabled=True).resolve("tiny"), batch=2,
                                  rounds=2, iters=1, device="cpu")
    for arm in ("plain", "merged"):
        assert out[f"fps_{arm}_min"] <= out[f"fps_{arm}"] <= out[f"fps_{arm}_max"]
    assert out["batch"] == 2 and model.token_merging is None


def test_interleaved_fps_times_each_arm_with_its_setting_in_alternating_rounds(monkeypatch):
    """With a clock that makes the merged forward take half the plain one: FPS = iters x batch / seconds for
    each arm, speedup 2, and the rounds alternate plain, merged / merged, plain."""
    import study.bench.timing as timing

    model, seen = tiny(), []

    def fake(step, device, iters):
        seen.append("plain" if model.token_merging is None else "merged")
        return [0.1 if model.token_merging is None else 0.05] * iters

    monkeypatch.setattr(timing, "time_iterations", fake)
    out = merging.interleaved_fps(model, crops(), TokenMergingConfig(enabled=True).resolve("tiny"), batch=2,
                                  rounds=4, iters=3, device="cpu", warmup=0)
    assert seen == ["plain", "merged", "merged", "plain"] * 2
    assert out["fps_plain"] == pytest.approx(20.0) and out["fps_merged"] == pytest.approx(40.0)
    assert out["speedup"] == pytest.approx(2.0) and model.token_merging is None
    assert out["speedup_ci"] == pytest.approx([2.0, 2.0])  # every round gives 2


def test_speedup_interval_pairs_the_rounds(monkeypatch):
    """A slowdown common to a round (both arms 3x slower in rounds 2 and 3) leaves the paired speedup at 2 in
    every resample: the interval is a point (resampling each arm by itself would spread it)."""
    import study.bench.timing as timing

    model, calls = tiny(), []

    def fake(step, device, iters):
        calls.append(None)
        slow = 3.0 if (len(calls) - 1) // 2 in (2, 3) else 1.0
        return [slow * (0.1 if model.token_merging is None else 0.05)] * iters

    monkeypatch.setattr(timing, "time_iterations", fake)
    out = merging.interleaved_fps(model, crops(), TokenMergingConfig(enabled=True).resolve("tiny"), batch=1,
                                  rounds=7, iters=1, device="cpu", warmup=0)
    assert out["speedup_ci"] == pytest.approx([2.0, 2.0]) and out["fps_plain_min"] < out["fps_plain_max"]
    result = {"cost": {"gflops_plain": 1.0, "gflops_merged_mean": 0.5, "gflops_merged_std": 0.1}, "fps": [out]}
    assert "batch 1 2.00x [2.00-2.00]" in merging.table(result)
