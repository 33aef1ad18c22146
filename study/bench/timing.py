"""The timed loop of the speed protocol (docs/speed.md): interleaved rounds of entries, the timer (CUDA events
on the measured device's stream, ``time.perf_counter`` on the CPU) and the per-component spans of the same
timed iterations."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from study.bench.protocol import SpeedProtocol
from study.device import synchronize

_clock = time.perf_counter  # the CPU timer (a module name, so that a test can see what the timed region holds)


@dataclass
class Entry:
    """One row of an interleaved measurement: ``run(inputs)`` is one timed iteration."""
    label: str
    run: Callable[[Any], object]
    inputs: Any
    protocol: SpeedProtocol  # resolved
    components: Optional[dict[str, list[nn.Module]]] = None  # hooked for the breakdown (eager PyTorch only)
    no_breakdown: str = ""  # why there is none
    gflops: Optional[float] = None  # per image (fvcore's multiply-adds): the matmul limit needs it
    limit_shapes: Optional[list[tuple[int, int, int]]] = None  # the matmul probes' products (study/bench/limit.py)


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
    return [time_once(step, device) for _ in range(iters)]


def time_once(step: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``step`` (the timer of :func:`time_iterations`)."""
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        step()
        end.record(stream)
        synchronize(device)
        return start.elapsed_time(end) / 1000
    t0 = _clock()
    step()
    return _clock() - t0


class _Spans:
    """Forward hooks that time the outermost component call in progress (a component called inside another
    one counts for the outer one only)."""

    def __init__(self, components: dict[str, list[nn.Module]], device: torch.device):
        self.components, self.device = components, device
        self.active: Optional[tuple] = None
        self.spans: list[tuple[str, Any, Any]] = []

    def _mark(self):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        return _clock()

    @contextlib.contextmanager
    def hooked(self):
        def pre(name):
            def hook(module, _inputs):
                if self.active is None:
                    self.active = (name, module, self._mark())
            return hook

        def post(module, _inputs, _output):
            if self.active is not None and self.active[1] is module:
                name, _, start = self.active
                self.spans.append((name, start, self._mark()))
                self.active = None

        handles = []
        try:
            for name, modules in self.components.items():
                for m in modules:
                    handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post)]
            yield
        finally:
            for h in handles:
                h.remove()
            self.active = None

    def take(self) -> dict[str, float]:
        """Seconds per component of the spans recorded so far (after a synchronisation), and forget them."""
        out: dict[str, float] = defaultdict(float)
        for name, a, b in self.spans:
            out[name] += a.elapsed_time(b) / 1000 if self.device.type == "cuda" else b - a
        self.spans = []
        return dict(out)


def time_rounds(entries: list[Entry], device: torch.device, warmup: int, iters: int, min_time: float = 0.0,
                breakdown: bool = False, rows: Optional[int] = None
                ) -> tuple[list[list[float]], list[list[dict[str, float]]]]:
    """The interleaved loop: ``warmup`` untimed rounds, then timed rounds (one iteration of each entry in
    turn, the start rotating) until there are ``iters`` rounds and every entry has ``min_time`` seconds (with
    ``rows``: the first ``rows`` entries; the others, the matmul probes, come along in the same rounds).
    Returns per entry the seconds of each timed iteration and, with ``breakdown``, the seconds per component
    of the same iterations (empty dicts for entries without components). Call inside the device, no_grad and
    thread contexts (study/bench/speed.py ``time_interleaved`` does)."""
    for _ in range(warmup):
        for e in entries:
            e.run(e.inputs)
    synchronize(device)
    spans = [(_Spans(e.components, device) if breakdown and e.components else None) for e in entries]
    times: list[list[float]] = [[] for _ in entries]
    parts: list[list[dict[str, float]]] = [[] for _ in entries]
    rounds = 0
    counted = times if rows is None else times[:rows]
    while rounds < iters or any(sum(t) < min_time for t in counted):
        for k in range(len(entries)):
            i = (k + rounds) % len(entries)
            e, s = entries[i], spans[i]
            with s.hooked() if s is not None else contextlib.nullcontext():
                times[i].append(time_once(lambda: e.run(e.inputs), device))
            parts[i].append(s.take() if s is not None else {})
        rounds += 1
    return times, parts
