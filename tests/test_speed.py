"""The speed protocol's device handling (issue 17 item 6), checked on the CPU.

- the SDPA kernel that really ran is recorded (here the CPU kernels: flash for unmasked attention, math for a
  boolean mask);
- on ``cuda:N`` the timing runs inside ``torch.cuda.device(cuda:N)`` and every CUDA event is recorded on that
  device's current stream: checked with a stand-in ``torch.cuda`` that records what it is asked;
- cuDNN autotuning is on during a CUDA measurement and restored afterwards.
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F

from study.bench import speed
from study.models.build import build_model
from study.models.config import ModelConfig


def _eomt(variant: str):
    return build_model(ModelConfig(variant=variant, size="tiny", img_size=64, num_classes=3, num_queries=5))


def test_kernel_taken_is_recorded():
    q = torch.rand(1, 2, 8, 16)
    mask = torch.rand(1, 1, 8, 8) > 0.3
    with torch.no_grad():
        plain = speed.sdpa_kernels_taken(lambda: F.scaled_dot_product_attention(q, q, q))
        masked = speed.sdpa_kernels_taken(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=mask))
        none = speed.sdpa_kernels_taken(lambda: q @ q.transpose(-1, -2))
    assert plain == {"aten::_scaled_dot_product_flash_attention_for_cpu": 1}
    assert set(masked) <= set(speed.SDPA_KERNELS) and sum(masked.values()) == 1
    assert none == {}


def test_fps_rows_name_the_kernels_of_the_model():
    """tiny masked EoMT: one SDPA call in each of its 4 blocks (the 2 query blocks with a boolean mask)."""
    row = speed.measure_fps(_eomt("eomt_masked"), 64, speed.SpeedProtocol(device="cpu", warmup=1, iters=2))
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
    monkeypatch.setattr(speed, "synchronize", lambda d: fake.synchronize(d))
    device = torch.device("cuda", 1)
    seen = []
    with speed.device_context(device):
        times = speed.time_iterations(lambda: seen.append(fake.current), device, 3)
    assert times == [0.005] * 3
    assert seen == [1, 1, 1]  # the step ran with GPU 1 current
    records = [entry for entry in fake.log if entry[0] == "record"]
    assert len(records) == 6 and all(stream == ("stream", 1) for _, stream in records)
    assert ("enter", 1) in fake.log and fake.current == 0  # restored afterwards


def test_cudnn_benchmark_is_on_for_cuda_and_restored():
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with speed.cudnn_benchmark(torch.device("cuda", 1)):
            assert torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.benchmark is False
        with speed.cudnn_benchmark(torch.device("cpu")):
            assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved
