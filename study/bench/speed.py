"""Speed with a written protocol (docs/paper.md section 8), and a per-component time breakdown.

The protocol, stated in every result row:
- batch 1, one fixed random input of the padded square size, model in eval mode under ``torch.no_grad``;
- device and precision from study/device.py (CUDA: bf16 autocast; CPU: fp32), ``torch.compile`` on or off;
- ``warmup`` untimed iterations first (compilation, allocator and cuDNN autotuning settle there; on CUDA
  ``torch.backends.cudnn.benchmark`` is switched on for the measurement and restored afterwards);
- timer: CUDA events around each timed iteration, recorded on the current stream of the measured GPU (the
  whole measurement runs inside ``torch.cuda.device(device)``, so ``cuda:1`` is timed on GPU 1, not on GPU 0's
  stream), with a synchronisation before and after; ``time.perf_counter`` on the CPU (its ops are synchronous);
- timed region: the model forward only (scope "model", the default), or pre-processing (uint8 image of
  COCO's typical 640x480 size -> float, resize of the longer side, zero pad), forward and post-processing
  (mask logits upsampled, padding cropped, resized to the image, panoptic merge with every query, see
  ``_end_to_end``) with scope "end_to_end";
- FPS = timed iterations / elapsed seconds;
- attention kernels: the SDPA kernels one profiled forward (after the timed loop) actually ran, by aten op
  name and calls per forward (``attention_kernels``), beside the backends that were enabled (``sdpa_enabled``):
  a silent fallback to the math kernel shows there.
The paper's H100 figures used FlashAttention-2 through SDPA, default ``torch.compile`` and mixed precision;
the paper is silent on warm-up, timer and timed region, which is why each row records ours.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from study.device import autocast, resolve_device, resolve_precision, synchronize
from study.errors import UserError


@dataclass
class SpeedProtocol:
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    warmup: int = 3
    iters: int = 10
    scope: str = "model"
    batch: int = 1

    def resolved(self) -> "SpeedProtocol":
        device = resolve_device(self.device)
        return SpeedProtocol(str(device), resolve_precision(self.precision, device), self.compile, self.warmup,
                             self.iters, self.scope, self.batch)

    def describe(self) -> dict:
        d = asdict(self)
        dev = torch.device(self.device)
        d["timer"] = "cuda_events" if dev.type == "cuda" else "perf_counter"
        d["sync"] = ("cuda.synchronize before the timed loop and after each iteration" if dev.type == "cuda"
                     else "none (CPU)")
        d["cudnn_benchmark"] = dev.type == "cuda"
        d["threads"] = torch.get_num_threads()
        d["torch"] = torch.__version__
        if dev.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(dev)
        return d


def _sdpa_enabled(device: torch.device) -> str:
    """Which attention kernel families SDPA may take here (the switches, not what ran)."""
    if device.type != "cuda":
        return "cpu (flash-attention CPU kernel or math)"
    flags = torch.backends.cuda
    return ",".join(n for n, on in (("flash", flags.flash_sdp_enabled()), ("mem_efficient",
                    flags.mem_efficient_sdp_enabled()), ("cudnn", flags.cudnn_sdp_enabled()),
                    ("math", flags.math_sdp_enabled())) if on)


# The kernels SDPA dispatches to, by the aten op the profiler records for each.
SDPA_KERNELS = (
    "aten::_scaled_dot_product_flash_attention",  # CUDA FlashAttention-2
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",  # memory-efficient (xformers-style)
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_attention_math_for_mps",
)


def sdpa_kernels_taken(step: Callable[[], object]) -> dict[str, int]:
    """Run ``step`` once under the profiler; SDPA kernel op name -> calls. Empty when none was seen (no
    attention, or a compiler that decomposed it into plain matmuls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    calls = Counter(e.name for e in prof.events() if e.name in SDPA_KERNELS)
    return dict(sorted(calls.items()))


def _format_kernels(calls: dict[str, int]) -> str:
    if not calls:
        return "no SDPA kernel seen"
    return ", ".join(f"{name.removeprefix('aten::')} x{n}" for name, n in calls.items())


def device_context(device: torch.device):
    """Make ``device`` current for the measurement (CUDA), so that events and streams belong to it."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@contextlib.contextmanager
def cudnn_benchmark(device: torch.device):
    """cuDNN autotuning on for a CUDA measurement (it settles during warm-up), restored afterwards."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def time_iterations(step: Callable[[], object], device: torch.device, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``step``: CUDA events on the current stream of ``device`` (call
    inside :func:`device_context`), else ``time.perf_counter``."""
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            step()
            end.record(stream)
            synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def _end_to_end(model: nn.Module, num_classes: int, img_size: int, device: torch.device, precision: str):
    """One raw image through pre-processing, forward and panoptic post-processing (study/eval).

    Random weights rarely score a query above the merge's 0.8 threshold, which would make the merge free;
    the benchmark therefore merges with threshold 0, so every query enters it: an upper bound of a trained
    model's post-processing cost.
    """
    from study.eval.config import EvalConfig
    from study.eval.inference import run_padded
    from study.eval.postprocess import panoptic_merge

    paper = EvalConfig()  # the merge's thresholds (docs/paper.md section 7), but for the score threshold

    raw = torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    is_thing = [True] * num_classes

    def step():
        (masks, classes), = run_padded(model, [raw], img_size, device=device, precision=precision)
        return panoptic_merge(masks, classes, is_thing, score_threshold=0.0,
                              overlap_threshold=paper.overlap_threshold, mask_threshold=paper.mask_threshold)

    return step


def measure_fps(model: nn.Module, img_size: int, protocol: SpeedProtocol) -> dict:
    """Frames per second of ``model`` under ``protocol``; returns the figures and the protocol."""
    p = protocol.resolved()
    device = torch.device(p.device)
    model = model.to(device).eval()
    run_model = torch.compile(model) if p.compile else model
    images = torch.rand(p.batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
    if p.scope == "model":
        step = lambda: run_model(images)  # noqa: E731
    elif p.scope == "end_to_end":
        step = _end_to_end(run_model, model.num_classes, img_size, device, p.precision)
    else:
        raise UserError(f"unknown timing scope '{p.scope}' (bench.scope); choose model or end_to_end")
    with device_context(device), cudnn_benchmark(device), torch.no_grad(), autocast(device, p.precision):
        for _ in range(p.warmup):
            step()
        synchronize(device)
        times = time_iterations(step, device, p.iters)
        kernels = sdpa_kernels_taken(step)
    total = sum(times)
    return {
        "fps": p.iters * p.batch / total,
        "ms_mean": 1000 * total / p.iters,
        "ms_std": 1000 * statistics.pstdev(times) if len(times) > 1 else 0.0,
        "attention_kernels": _format_kernels(kernels),
        "sdpa_kernels": kernels,
        "sdpa_enabled": _sdpa_enabled(device),
        "protocol": p.describe(),
    }


def component_breakdown(model: nn.Module, img_size: int, protocol: SpeedProtocol) -> dict[str, float]:
    """Milliseconds per forward spent in each of ``model.components()``, plus "other" (the rest).

    Runs eagerly (hooks cannot see inside a compiled graph), with the protocol's device, precision and
    warm-up. On CUDA each component call is bracketed by CUDA events.
    """
    p = protocol.resolved()
    device = torch.device(p.device)
    model = model.to(device).eval()
    images = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
    spans: dict[str, list] = defaultdict(list)
    handles = []
    recording = [False]

    def hooks(name: str):
        def pre(_module, _inputs):
            if recording[0]:
                if device.type == "cuda":
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record(torch.cuda.current_stream(device))
                    spans[name].append([ev, None])
                else:
                    spans[name].append([time.perf_counter(), None])

        def post(_module, _inputs, _output):
            if recording[0]:
                if device.type == "cuda":
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record(torch.cuda.current_stream(device))
                    spans[name][-1][1] = ev
                else:
                    spans[name][-1][1] = time.perf_counter()

        return pre, post

    for name, modules in model.components().items():
        pre, post = hooks(name)
        for m in modules:
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        totals = []
        with device_context(device), cudnn_benchmark(device), torch.no_grad(), autocast(device, p.precision):
            for _ in range(p.warmup):
                model(images)
            recording[0] = True
            for _ in range(p.iters):
                synchronize(device)
                t0 = time.perf_counter()
                model(images)
                synchronize(device)
                totals.append(time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()

    def seconds(a, b) -> float:
        return a.elapsed_time(b) / 1000 if device.type == "cuda" else b - a

    out = {name: 1000 * sum(seconds(a, b) for a, b in s) / p.iters for name, s in spans.items()}
    total = 1000 * sum(totals) / p.iters
    out["other"] = max(0.0, total - sum(out.values()))
    out["total"] = total
    return out
