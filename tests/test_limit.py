"""The matrix-multiply limit of every timed row (study/bench/limit.py, issue 11 item 4).

- the limit is 2 x GFLOPs x batch over the faster probe's rate, and the ratio the median forward over it; a
  ratio below 1 is flagged (the limit is then overstated), never printed as if it were a result;
- the probes are entries of the same interleaved rounds, two per precision, each row measured against its own
  precision's probes, and a probe iteration is sized so that a precision's probes together last about one
  forward (checked with a stand-in clock);
- ``study bench`` prints the "x limit" column for every row and ``bench.limit=false`` drops the probes.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from study.bench import limit, speed, stats, timing
from study.bench.protocol import SpeedProtocol
from study.bench.limit import MatmulProbe, limit_fields, probe_shapes
from study.models.build import build_model
from study.models.config import ModelConfig
from test_speed import FakeClock


def _probe(shape=(4, 8, 16), repeats=10, precision="fp32") -> MatmulProbe:
    return MatmulProbe(precision, shape, torch.device("cpu"), repeats)


def test_limit_is_twice_the_gflops_over_the_faster_probe():
    slow, fast = _probe((4, 8, 16), 10), _probe((8, 8, 8), 20)  # 1024 and 1024 FLOPs per call
    # slow: 10 calls in 1 ms -> 10.24 MFLOP/s; fast: 20 calls in 1 ms -> 20.48 MFLOP/s (the faster is taken)
    out = limit_fields([0.5, 0.6, 0.7], [(slow, [1e-3] * 3, 1), (fast, [1e-3, 1e-3, 2e-3], 2)], gflops=2e-6,
                       batch=3)
    rate = 20 * 1024 / 1e-3
    limit_s = 2 * 2e-6 * 1e9 * 3 / rate
    assert out["limit_rate_gflops"] == pytest.approx(rate / 1e9)
    assert out["limit_ms"] == pytest.approx(1000 * limit_s)
    assert out["limit_ratio"] == pytest.approx(0.6 / limit_s)
    assert "8x8x8, 20 calls per iteration" in out["limit_probe"]
    assert "limit_note" not in out and "limit_ratio_ci" not in out  # no bootstrap given


def test_ratio_below_one_is_flagged_and_marked_in_the_table():
    from study.bench.run import _limit

    probe = _probe((4, 8, 16), 1)
    row, probe_times = [1e-6, 2e-6, 3e-6], [1e-3, 1e-3, 1e-3]  # the "forward" is faster than its limit
    out = limit_fields(row, [(probe, probe_times, 1)], gflops=1e-6, batch=1)
    assert out["limit_ratio"] < 1 and "overstated" in out["limit_note"]
    assert _limit(out).endswith("!") and not _limit({"limit_ratio": 1.5}).endswith("!")


def test_the_interval_resamples_rounds_with_row_and_probe_paired():
    """A noise common to a round (the same factor on the row's and the probe's time) cancels in the ratio:
    with the rounds paired every resample gives the same ratio, so the interval is a point; unpaired resampling
    would spread it over the noise (here 1-4x)."""
    probe = _probe((4, 8, 16), 1)
    factor = np.random.default_rng(0).uniform(1, 4, size=15)
    row, probe_times = list(2e-3 * factor), list(1e-3 * factor)
    boot = stats.bootstrap_medians([row, probe_times], 500, 0)
    out = limit_fields(row, [(probe, probe_times, 1)], gflops=1e-6, batch=1, boot=boot, row=0)
    lo, hi = out["limit_ratio_ci"]
    assert lo == pytest.approx(out["limit_ratio"]) and hi == pytest.approx(out["limit_ratio"])
    # the ratio itself: median row time over the limit, 2 x 1e-6 x 1e9 FLOPs at 1024 FLOPs per median probe time
    rate = 1024 / float(np.median(probe_times))
    assert out["limit_ratio"] == pytest.approx(float(np.median(row)) / (2e3 / rate))


def test_probe_shapes_are_the_models_mlp_product_and_a_square_one():
    for variant in ("eomt", "vit_adapter_m2f"):  # both on the tiny ViT: 64 wide, CLS + 4 registers, 16 px patches
        model = build_model(ModelConfig(variant=variant, size="tiny", img_size=64, num_classes=3, num_queries=5))
        tokens = 5 + (64 // 16) ** 2
        assert probe_shapes(model, 64) == [(tokens, 64, 256), (limit.SQUARE,) * 3]
        assert probe_shapes(model, 64, batch=32)[0] == (32 * tokens, 64, 256)
    assert probe_shapes(torch.nn.Linear(2, 2), 64) == [(limit.SQUARE,) * 3]
    assert probe_shapes(torch.nn.Linear(2, 2), 64, device="cuda:1") == [(limit.SQUARE_CUDA,) * 3]


def test_probes_run_in_the_same_rounds_sized_to_the_forward(monkeypatch):
    """Two rows, fp32 50 ms and bf16 80 ms a forward; a probe call takes 1 ms (fp32) or 0.5 ms (bf16) on the
    stand-in clock. Each precision has two probes, each sized to half its rows' forward: 25 and 80 calls."""
    clock, log = FakeClock(), []
    monkeypatch.setattr(timing, "_clock", clock)
    cost = {"fp32": 1e-3, "bf16": 5e-4}
    forward = {"fp32": 0.05, "bf16": 0.08}

    def call(self):
        log.append(f"probe {self.precision}")
        clock.now += cost[self.precision]

    monkeypatch.setattr(MatmulProbe, "call", call)
    base = SpeedProtocol(device="cpu", warmup=1, iters=3).resolved()
    entries = []
    for prec in ("fp32", "bf16"):
        def run(_inputs, prec=prec):
            log.append(f"row {prec}")
            clock.now += forward[prec]
        entries.append(timing.Entry(f"row {prec}", run, None, replace(base, precision=prec), gflops=1e-3,
                                   limit_shapes=[(2, 3, 4), (5, 5, 5)]))
    rows, _ = speed.time_interleaved(entries, limit=True)
    assert [r["mode"] for r in rows] == ["row fp32", "row bf16"]  # the probes are not rows
    for r, prec, calls in zip(rows, ("fp32", "bf16"), (25, 80)):
        assert f"matmul probe {prec}" in r["limit_probe"] and f"{calls} calls per iteration" in r["limit_probe"]
        assert set(r["limit_probes_gflops"]) == {f"matmul probe {prec} 2x3x4", f"matmul probe {prec} 5x5x5"}
        # the faster probe is the 5x5x5 one (250 FLOPs a call against 48), at 250 / cost FLOP/s
        assert r["limit_rate_gflops"] == pytest.approx(250 / cost[prec] / 1e9)
        assert r["limit_ms"] == pytest.approx(1000 * 2 * 1e-3 * 1e9 / (250 / cost[prec]))
        assert r["limit_ratio"] == pytest.approx(1000 * forward[prec] / r["limit_ms"])  # this row's own time
        assert r["limit_ratio_ci"][0] <= r["limit_ratio"] <= r["limit_ratio_ci"][1]
    # per row: one warm-up, one calibration forward, 3 timed rounds and the kernel-recording call; per probe:
    # 5 single calibration calls and 3 timed iterations of its repeats
    assert log.count("row fp32") == log.count("row bf16") == 1 + 1 + 3 + 1
    assert log.count("probe fp32") == 2 * (limit.CALIBRATION_CALLS + 3 * 25)
    assert log.count("probe bf16") == 2 * (limit.CALIBRATION_CALLS + 3 * 80)
    # ... and in the same rounds: between two timed row iterations come probe iterations
    rows_at = [i for i, x in enumerate(log) if x.startswith("row")]
    timed = rows_at[2 * 2:2 * 2 + 6]  # after the warm-up and calibration forwards of both rows
    assert all(any(x.startswith("probe") for x in log[a:b]) for a, b in zip(timed[1::2], timed[2::2]))


def test_min_time_counts_the_rows_not_the_probes(monkeypatch):
    """min_time 0.19 s: the 50 ms row needs 4 rounds; its probes (25 ms an iteration) would need 8."""
    clock, log = FakeClock(), []
    monkeypatch.setattr(timing, "_clock", clock)

    def call(self):
        clock.now += 1e-3

    monkeypatch.setattr(MatmulProbe, "call", call)

    def run(_inputs):
        log.append("row")
        clock.now += 0.05
    p = SpeedProtocol(device="cpu", warmup=1, iters=1, min_time=0.19).resolved()
    (row,), _ = speed.time_interleaved([timing.Entry("r", run, None, p, gflops=1e-3,
                                                    limit_shapes=[(2, 3, 4), (5, 5, 5)])], limit=True)
    assert row["n_iters"] == 4 and "limit_ratio" in row


def test_study_bench_prints_the_limit_of_every_row_and_can_drop_it(capsys):
    from study.bench.run import bench_rows, format_table
    from study.config import load_config

    cfg = load_config(None, ["bench.variants=[eomt]", "bench.sizes=[tiny]", "bench.img_size=64",
                             "bench.modes=[fp32,bf16]", "bench.iters=2", "bench.warmup=1", "bench.threads=1",
                             "bench.breakdown=false"])
    rows = bench_rows(cfg, progress=lambda _line: None)
    table = format_table(rows)
    assert "x limit" in table.splitlines()[0]
    for r in rows:
        assert r["limit_ratio"] > 0 and np.isfinite(r["limit_ms"])
        assert f"matmul probe {r['protocol']['precision']}" in r["limit_probe"]
        assert f"{r['limit_ratio']:.2f}x" in table
    off = bench_rows(replace(cfg, bench=replace(cfg.bench, limit=False)), progress=lambda _line: None)
    assert all("limit_ratio" not in r for r in off)


def test_an_end_to_end_row_gets_no_limit():
    """Its timed region holds pre- and post-processing, which a forward's matmul limit does not count."""
    model = build_model(ModelConfig(variant="eomt", size="tiny", img_size=64, num_classes=3, num_queries=5))
    p = SpeedProtocol(device="cpu", warmup=1, iters=1, scope="end_to_end", threads=1)
    (row,), _ = speed.time_interleaved([speed.build_entry("e2e", model, 64, p, gflops=1.0)], limit=True)
    assert "limit_ratio" not in row and "end_to_end" in row["limit_skipped"]
