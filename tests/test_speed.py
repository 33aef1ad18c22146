"""The speed protocol's device handling (issue 17 item 6), checked on the CPU.

- the SDPA kernel that really ran is recorded (here the CPU kernels: flash for unmasked attention, math for a
  boolean mask);
- on ``cuda:N`` the timing runs inside ``torch.cuda.device(cuda:N)`` and every CUDA event is recorded on that
  device's current stream: checked with a stand-in ``torch.cuda`` that records what it is asked;
- cuDNN autotuning is on during a CUDA measurement and restored afterwards.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch

from conftest import require
from torch import nn
from torch.nn import functional as F

from study.bench import environment, runtimes, speed, stats, timing
from study.bench.protocol import SpeedProtocol
from study.errors import UserError
from study.models.build import build_model
from study.models.config import ModelConfig


def _eomt(variant: str):
    return build_model(ModelConfig(variant=variant, size="tiny", img_size=64, num_classes=3, num_queries=5))


def test_kernel_taken_is_recorded():
    q = torch.rand(1, 2, 8, 16)
    mask = torch.rand(1, 1, 8, 8) > 0.3
    with torch.no_grad():
        plain = environment.sdpa_kernels_taken(lambda: F.scaled_dot_product_attention(q, q, q))
        masked = environment.sdpa_kernels_taken(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=mask))
        none = environment.sdpa_kernels_taken(lambda: q @ q.transpose(-1, -2))
    assert plain == {"aten::_scaled_dot_product_flash_attention_for_cpu": 1}
    assert set(masked) <= set(environment.SDPA_KERNELS) and sum(masked.values()) == 1
    assert none == {}


def test_kernel_recording_drops_the_profilers_notices_and_keeps_other_output(capfd):
    """Kineto prints 'USDT: ... profiler_start/stop' on fd 2 at every profile (they interleaved with the
    progress lines of `make study`); those two go, anything else the step writes to fd 2 stays."""
    import os

    def step():
        os.write(2, b"a line the step writes\n")
        return F.scaled_dot_product_attention(torch.rand(1, 1, 4, 8), torch.rand(1, 1, 4, 8), torch.rand(1, 1, 4, 8))

    with torch.no_grad():
        assert environment.sdpa_kernels_taken(step)
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "profiler_stop" not in err
    assert "a line the step writes" in err


def test_fps_rows_name_the_kernels_of_the_model():
    """tiny masked EoMT: one SDPA call in each of its 4 blocks (the 2 query blocks with a boolean mask)."""
    row = speed.measure_fps(_eomt("eomt_masked"), 64, SpeedProtocol(device="cpu", warmup=1, iters=2))
    assert row["sdpa_kernels"] == {"aten::_scaled_dot_product_flash_attention_for_cpu": 4}
    assert "flash_attention_for_cpu x4" in row["attention_kernels"]
    assert row["protocol"]["cudnn_benchmark"] is False and row["sdpa_enabled"].startswith("cpu")


class FakeCuda:
    """Stands in for ``torch.cuda``: records the current device, the streams events are recorded on and the
    synchronisations; times are 5 ms per event pair."""

    def __init__(self):
        self.current = 0
        self.log: list[tuple] = []

    @contextlib.contextmanager
    def device(self, dev):
        saved, self.current = self.current, torch.device(dev).index
        self.log.append(("enter", self.current))
        try:
            yield
        finally:
            self.current = saved

    def current_stream(self, dev=None):
        index = self.current if dev is None or torch.device(dev).index is None else torch.device(dev).index
        return ("stream", index)

    def synchronize(self, dev=None):
        self.log.append(("sync", torch.device(dev).index if dev is not None else self.current))

    def Event(self, enable_timing=False):  # noqa: N802 - the torch.cuda name
        fake = self

        class Ev:
            def record(self, stream=None):
                # an event recorded without a stream lands on the *current* device's stream
                self.stream = stream if stream is not None else ("stream", fake.current)
                fake.log.append(("record", self.stream))

            def elapsed_time(self, other):
                return 5.0

        return Ev()


def test_cuda_timing_happens_on_the_measured_device(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(speed.torch, "cuda", fake)
    monkeypatch.setattr(timing, "synchronize", lambda d: fake.synchronize(d))
    device = torch.device("cuda", 1)
    seen = []
    with timing.device_context(device):
        times = timing.time_iterations(lambda: seen.append(fake.current), device, 3)
    assert times == [0.005] * 3
    assert seen == [1, 1, 1]  # the step ran with GPU 1 current
    records = [entry for entry in fake.log if entry[0] == "record"]
    assert len(records) == 6 and all(stream == ("stream", 1) for _, stream in records)
    assert ("enter", 1) in fake.log and fake.current == 0  # restored afterwards


def test_cudnn_benchmark_is_on_for_cuda_and_restored():
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with timing.cudnn_benchmark(torch.device("cuda", 1)):
            assert torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.benchmark is False
        with timing.cudnn_benchmark(torch.device("cpu")):
            assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved


# ------------------------------------------------------------------ the interleaved protocol (issue 11 item 1)


class FakeClock:
    """Stands in for timing._clock: time advances only when a stand-in step says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _entries(durations: dict[str, list[float]], clock: FakeClock, log: list, protocol=None):
    """Entries whose run(inputs) logs its label and advances the clock by the next of its durations (s)."""
    protocol = (protocol or SpeedProtocol(device="cpu", warmup=1, iters=4)).resolved()
    out = []
    for label, seq in durations.items():
        it = iter(seq)

        def run(inputs, label=label, it=it, last=seq[-1]):
            log.append(label)
            clock.now += next(it, last)

        out.append(timing.Entry(label, run, None, protocol))
    return out


def test_rounds_interleave_every_row_with_a_rotating_start(monkeypatch):
    clock, log = FakeClock(), []
    monkeypatch.setattr(timing, "_clock", clock)
    entries = _entries({"a": [0.01], "b": [0.01], "c": [0.01]}, clock, log)
    times, _ = timing.time_rounds(entries, torch.device("cpu"), warmup=1, iters=4)
    assert log[:3] == ["a", "b", "c"]  # the warm-up round
    rounds = [log[3 + 3 * r: 6 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert [len(t) for t in times] == [4, 4, 4] and times[0] == pytest.approx([0.01] * 4)


def test_min_time_adds_rounds_until_every_row_has_it(monkeypatch):
    clock, log = FakeClock(), []
    monkeypatch.setattr(timing, "_clock", clock)
    entries = _entries({"fast": [1 / 64], "slow": [1 / 8]}, clock, log)
    times, _ = timing.time_rounds(entries, torch.device("cpu"), warmup=0, iters=2, min_time=0.5)
    # the fast row needs 32 iterations of 1/64 s; the slow one comes along in the same rounds
    assert len(times[0]) == len(times[1]) == 32


def test_median_statistics_ignore_an_outlier_and_fps_counts_the_batch():
    times = [0.010] * 19 + [1.0]
    s = stats.summarize(times, batch=2)
    assert s["ms_median"] == pytest.approx(10.0) and s["fps"] == pytest.approx(200.0)  # 2 images / 10 ms
    assert s["ms_mean"] == pytest.approx((19 * 10 + 1000) / 20) and s["n_iters"] == 20
    assert s["ms_p5"] == pytest.approx(10.0) and 10.0 < s["ms_p95"] < 1000.0


def test_ratios_with_intervals_and_a_warning_naming_rows_that_cannot_be_ranked():
    rng = torch.Generator().manual_seed(0)
    noisy = (0.01 * (1 + 0.5 * torch.rand(40, generator=rng))).tolist()
    times = [[0.01] * 40, [0.02] * 40, noisy]
    ratios = stats.speed_ratios(times, reference=0)
    assert ratios[1] == {"ratio": pytest.approx(0.5), "ci_low": pytest.approx(0.5), "ci_high": pytest.approx(0.5)}
    assert ratios[2]["ci_low"] < ratios[2]["ratio"] < ratios[2]["ci_high"] < 1.0
    assert stats.unrankable(times, ["a", "b", "c"]) == []  # every pair is apart
    same_law = (0.01 * (1 + 0.5 * torch.rand(40, generator=rng))).tolist()  # another draw of noisy's law
    pairs = stats.unrankable([[0.01] * 40, noisy, same_law], ["a", "noisy", "near"])
    assert len(pairs) == 1 and {pairs[0][0], pairs[0][1]} == {"noisy", "near"}
    assert pairs[0][2] <= 1.0 <= pairs[0][3]
    warning = stats.rank_warning(pairs)
    assert "noisy" in warning and "near" in warning and "contains 1" in warning and "a vs" not in warning


class Nested(nn.Module):
    """outer contains inner; both are components: inner's time belongs to outer only."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.inner, self.outer, self.tail = nn.Identity(), nn.Sequential(nn.Identity()), nn.Identity()
        self.outer.append(self.inner)

    def forward(self, x):
        self.clock.now += 0.001  # 1 ms outside any component
        x = self.outer(x)
        self.clock.now += 0.002
        return self.tail(x)

    def components(self):
        return {"outer": [self.outer], "inner": [self.inner], "tail": [self.tail]}


def test_breakdown_comes_from_the_timed_iterations_and_adds_up(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing, "_clock", clock)
    model = Nested(clock)

    def timed_identity(module, inputs, output):  # every Identity call costs 3 ms
        clock.now += 0.003

    for m in (model.inner, model.tail):
        m.register_forward_hook(timed_identity)
    entry = speed.build_entry("nested", model, 8, SpeedProtocol(device="cpu", warmup=1, iters=3))
    (row,), warning = speed.time_interleaved([entry], breakdown=True)
    parts = row["breakdown_ms"]
    assert parts["outer"] == pytest.approx(3.0) and parts["inner"] == 0.0  # nested: counted once, for outer
    assert parts["tail"] == pytest.approx(3.0) and parts["other"] == pytest.approx(3.0)
    assert parts["total"] == pytest.approx(row["ms_mean"]) == pytest.approx(9.0)
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"])
    assert "same 3 timed iterations" in row["breakdown_of"] and warning is None


def test_breakdown_of_a_real_model_adds_up_to_its_measured_forward():
    entry = speed.build_entry("eomt", _eomt("eomt"), 64, SpeedProtocol(device="cpu", warmup=1, iters=2))
    (row,), _ = speed.time_interleaved([entry], breakdown=True)
    parts = row["breakdown_ms"]
    assert set(parts) == {"patch_embed", "blocks_before_queries", "blocks_with_queries",
                          "mask_module_and_upscaler", "other", "total"}
    assert parts["other"] >= 0 and parts["total"] == pytest.approx(row["ms_mean"])
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"])


def test_a_runtime_times_any_runner_with_the_batch_and_threads_recorded(monkeypatch):
    """The seam for other runtimes: a registered builder's run(inputs) is what the rounds time."""
    seen = {}

    def build(model, example, protocol):
        seen["example"] = tuple(example.shape)
        seen["built_for"] = protocol.runtime

        def run(inputs):
            seen.setdefault("threads", torch.get_num_threads())
            return model(inputs)

        return run

    monkeypatch.setitem(runtimes.RUNTIMES, "counting", build)
    before = torch.get_num_threads()
    p = runtimes.apply_mode("counting", SpeedProtocol(device="cpu", warmup=1, iters=2, batch=3, threads=1))
    entry = speed.build_entry("x", _eomt("eomt"), 64, p)
    (row,), _ = speed.time_interleaved([entry], breakdown=True)
    assert seen == {"example": (3, 3, 64, 64), "built_for": "counting", "threads": 1}
    assert torch.get_num_threads() == before  # restored
    env = row["env"]
    assert env["threads"] == 1 and env["batch"] == 3 and env["runtime"] == "counting"
    assert row["breakdown_ms"] is None and "runtime counting" in row["breakdown_of"]
    assert row["fps"] == pytest.approx(3000 / row["ms_median"])


def test_measure_fps_is_one_row_with_the_breakdown_where_the_row_can_give_one(monkeypatch):
    """measure_fps, the one way to time a single model (the pipeline's bench step): an eager row's breakdown
    adds up to its measured forward; a row that cannot give one (another runtime: no module hooks) has no
    breakdown keys rather than an empty breakdown; neither row carries the ratio fields of a group."""
    model = _eomt("eomt")
    eager = speed.measure_fps(model, 64, SpeedProtocol(device="cpu", warmup=1, iters=2, threads=1), breakdown=True)
    parts = eager["breakdown_ms"]
    assert set(parts) == set(model.components()) | {"other", "total"}
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"], rel=1e-9)
    assert parts["total"] == pytest.approx(eager["ms_mean"], rel=1e-9)  # the same timed iterations
    monkeypatch.setitem(runtimes.RUNTIMES, "plain", lambda m, example, p: (lambda inputs: m(inputs)))
    other = speed.measure_fps(model, 64, SpeedProtocol(device="cpu", warmup=1, iters=2, threads=1, runtime="plain"),
                              breakdown=True)
    assert "breakdown_ms" not in other and other["env"]["runtime"] == "plain" and other["n_iters"] == 2
    assert not {"mode", "ratio", "ratio_ci", "ratio_to"} & (set(eager) | set(other))


def test_every_row_records_its_environment():
    import subprocess

    from conftest import REPO

    row = speed.measure_fps(_eomt("eomt"), 64, SpeedProtocol(device="cpu", warmup=1, iters=1))
    env = row["env"]
    for key in ("torch", "cuda", "device_name", "precision", "compile_mode", "sdpa_kernel_taken", "threads",
                "batch", "git_commit"):
        assert key in env, key
    assert env["torch"] == torch.__version__ and env["precision"] == "fp32" and env["compile_mode"] == "off"
    assert env["sdpa_kernel_taken"] == "_scaled_dot_product_flash_attention_for_cpu x4"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert env["git_commit"] == head.stdout.strip()


def test_modes_and_their_mistakes():
    base = SpeedProtocol(device="cpu")
    p = runtimes.apply_mode("compile+bf16", base)
    assert (p.compile, p.precision, p.runtime) == (True, "bf16", "pytorch")
    assert runtimes.apply_mode("eager", p).compile is False
    frozen = runtimes.apply_mode("freeze+bf16", base)
    assert (frozen.compile, frozen.freezing, frozen.precision) == (True, True, "bf16")
    assert runtimes.apply_mode("eager", frozen).resolved().freezing is False  # no freezing without compile
    # bench.freezing with modes: the compiled rows freeze, the others are eager rows as asked
    assert runtimes.apply_mode("bf16", replace(base, freezing=True)).resolved().freezing is False
    assert runtimes.apply_mode("compile", replace(base, freezing=True)).resolved().freezing is True
    with pytest.raises(UserError, match="bench.freezing applies to compiled rows"):
        SpeedProtocol(device="cpu", freezing=True).resolved()
    with pytest.raises(UserError, match="unknown word 'fast'"):
        runtimes.apply_mode("compile+fast", base)
    entry = speed.build_entry("c", _eomt("eomt"), 64, SpeedProtocol(device="cpu", compile=True, warmup=0))
    with pytest.raises(UserError, match="bench.warmup=0 with torch.compile"):
        speed.time_interleaved([entry])
    with pytest.raises(UserError, match="bench.compile_mode"):
        SpeedProtocol(compile_mode="fastest").resolved()


def test_onnxruntime_is_a_runtime_of_the_benchmark_timed_in_the_same_rounds():
    """--modes eager,onnxruntime times ONNX Runtime beside PyTorch (the export is fp32 whatever the
    protocol's precision was; tiny EoMT at 64 px)."""
    require("onnxruntime")
    from study.bench.runtimes import apply_mode
    from study.bench.speed import build_entry, time_interleaved
    from study.config import load_config
    from study.models.build import build_model

    model = build_model(load_config("experiments/quickstart.yaml", ["model.img_size=64"]).model).eval()
    base = SpeedProtocol(device="cpu", precision="auto", warmup=1, iters=2, threads=1)
    assert apply_mode("onnxruntime", base).precision == "fp32"
    entries = [build_entry(m, model, 64, apply_mode(m, base)) for m in ("eager", "onnxruntime")]
    rows, _ = time_interleaved(entries)
    assert [r["protocol"]["runtime"] for r in rows] == ["pytorch", "onnxruntime"]
    assert all(r["n_iters"] >= 2 and r["ms_median"] > 0 for r in rows)


def test_end_to_end_rows_compile_like_model_rows(monkeypatch):
    """Both scopes compile through runtimes.compiled, so a 'freeze' row of bench.scope=end_to_end freezes too
    (it compiled with plain torch.compile, ignoring bench.freezing)."""
    seen = []
    monkeypatch.setattr(runtimes, "compiled", lambda model, mode="default", freezing=False: seen.append(
        (mode, freezing)) or model)
    for scope in ("model", "end_to_end"):
        p = runtimes.apply_mode("freeze", SpeedProtocol(device="cpu", scope=scope))
        speed.build_entry(scope, _eomt("eomt"), 64, p)
    assert seen == [("default", True), ("default", True)]
