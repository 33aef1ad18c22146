"""baselines/bench_speed.py part 2: our Mask2Former parts against Hugging Face's, timed with the suite's
protocol (the same interleaved rounds, medians, a ratio with its interval), not a timer of its own."""
from __future__ import annotations

import pytest

from conftest import require
from study.bench.protocol import SpeedProtocol


def test_a_pair_is_timed_in_the_same_rounds_with_hf_as_the_reference(monkeypatch):
    """With a stand-in clock, ours takes 10 ms and HF's 30 ms in every round but the third, where both are 5x
    slower (a noisy spell): HF/ours is 3 from the medians and 3 in every resample of whole rounds."""
    from baselines.bench_speed import time_pair
    from study.bench import timing
    from test_speed import FakeClock

    clock, log = FakeClock(), []
    monkeypatch.setattr(timing, "_clock", clock)

    def step(name, ms):
        def run():
            log.append(name)
            slow = 5.0 if len(log) in (5, 6) else 1.0  # after 1 warm-up round: the 2nd timed round's two calls
            clock.now += slow * ms / 1000
        return run

    mine, hf = time_pair(step("ours", 10), step("hf", 30), SpeedProtocol(device="cpu", warmup=1, iters=4, batch=8))
    assert log[:2] == ["ours", "hf"] and log[2:4] == ["ours", "hf"] and log[4:6] == ["hf", "ours"]  # rotating
    assert mine["n_iters"] == hf["n_iters"] == 4 and mine["protocol"]["batch"] == 1
    assert mine["ratio_to"] == "hf" and mine["ratio"] == pytest.approx(3.0)
    assert mine["ratio_ci"] == pytest.approx([3.0, 3.0])  # the slow round is slow for both: paired
    assert mine["ms_median"] == pytest.approx(10.0) and hf["ms_median"] == pytest.approx(30.0)


@pytest.mark.slow
def test_parts_against_hf_are_timed_in_the_same_rounds_and_agree():
    """The real parts (about 11 s of CPU, more on a busy machine: slow)."""
    require("transformers")
    from baselines.bench_speed import bench_against_hf

    rows = bench_against_hf(in_dim=32, img=64, protocol=SpeedProtocol(device="cpu", warmup=1, iters=3, threads=1,
                                                                       batch=4))
    assert [r["part"] for r in rows] == ["pixel_decoder", "decoder"]
    for r in rows:
        assert r["n_iters"] == 3 and r["protocol"]["iters"] == 3 and r["protocol"]["batch"] == 1
        assert r["protocol"]["rounds"].startswith("interleaved") and r["protocol"]["precision"] == "fp32"
        # HF/ours from the two medians of the same rounds: the same quotient, computed in seconds rather than ms
        # (two roundings apart at most, so 1e-12 relative)
        assert r["speedup"] == pytest.approx(r["ms_hf"] / r["ms_ours"], rel=1e-12)
        assert r["speedup_ci"][0] <= r["speedup_ci"][1]
        # same weights, same inputs: tests/test_baselines_hf.py's parity tolerance (1e-4)
        assert r["max_abs_diff"] <= 1e-4
