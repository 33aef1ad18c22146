"""bf16 on the CPU against its limit: ``python -m study.export.bench_bf16 [--size S] [--img-size 640]``.

For each precision mode the forward of one model (EoMT-S at 640 by default, batch 1, no grad) is timed in
interleaved rounds, together with a large square matrix multiply in bf16 and in fp32 (the machine's matrix
rates, measured in the same rounds so that a noisy spell hits them alike). Printed per mode: the forward's
median (p5-p95 and the count), the matmul limit ``2 x GMACs / rate`` of that mode's matmul dtype (fvcore's
GFLOPs count multiply-adds, study/bench/flops.py; a multiply-add is 2 FLOPs of the rate) and the ratio
forward / limit, and the top operators of one profiled forward (torch.profiler, self CPU time). The load
average is printed beside every figure: the machine is shared.

Modes: ``fp32``; ``bf16`` (``torch.autocast("cpu", bfloat16)``, study/device.py ``autocast``, what training and
``study bench --precision bf16`` use); ``bf16_weights`` (the model's parameters cast to bf16 once,
``model.to(torch.bfloat16)``, and bf16 inputs, no autocast: every op, LayerNorm and softmax included, in bf16,
the way a deployed bf16 model runs).

Where bf16 EoMT-S at 640 loses its time (measured here, 1 thread, load average about 4.6 from other work on the
2 cores): fp32 1972 ms (1.44x its fp32 limit), bf16 autocast 795 ms (3.16x its bf16 limit of 252 ms, at
539 GFLOP/s), bf16 weights 761 ms (3.02x). In the bf16 profile the linear layers (addmm) are no longer the
problem: 123 ms for 82 GFLOP, the matrix units' full rate. The time goes to
- the attention: 291 ms, 40% (the CPU flash kernel reaches about 170 GFLOP/s at 1605 tokens and head dim 64,
  a quarter of the matmul rate: its softmax exponentials and K = 64 products; it alone is 1.15x the limit);
- copies, 154 ms: one strided copy of the upscaled map, 80 ms (``einsum("bqc,bchw->bqhw")`` in
  study/models/eomt.py ``EoMTHead`` reads LayerNorm2d's NCHW view of NHWC memory and makes it contiguous;
  a ``bmm`` on the NHWC view gives bit-identical fp32 logits and saves it), autocast's casts of the residual
  stream and of the 48 weights (about 45 ms; gone with bf16 weights), and the upscaler's NCHW/NHWC clones;
- GELU (40 ms), LayerNorm (29 ms) and the upscaler's convolutions (23 ms), which inductor fuses
  (``torch.compile`` with ``torch._inductor.config.freezing = True`` under autocast: 865 ms against 1070 ms eager
  in the same rounds at load 6).
With 2 threads on a loaded 2-core machine the forwards slow down 3-4x more than the matmul probe (OpenMP
threads wait at every operator's barrier for a descheduled sibling), so time on a busy machine with 1 thread.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Callable

import numpy as np
import torch

from study.errors import UserError

MODES = ("fp32", "bf16", "bf16_weights")  # the default rows
# Compiled rows (``--modes``; compiling EoMT-S at 640 takes about a minute here): inductor with freezing, the
# parameters folded into the graph as constants (so autocast's weight casts run once, at compile time) and
# GELU, LayerNorm and the element-wise ops fused into their neighbours.
COMPILED_MODES = ("bf16_compile", "bf16_weights_compile")
ALL_MODES = MODES + COMPILED_MODES
MATMUL_N = 2048  # the probe: (n x n) @ (n x n), large enough for the matrix units' steady rate, 8 MiB in bf16


def load() -> float:
    return os.getloadavg()[0]


def matmul_probe(dtype: torch.dtype, n: int = MATMUL_N) -> tuple[Callable[[], object], float]:
    """A callable doing one (n x n) @ (n x n) matmul in ``dtype``, and its FLOPs (2 n^3)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    return (lambda: torch.mm(a, b)), 2.0 * n ** 3


def compiled(model: torch.nn.Module, autocast: bool) -> Callable[[torch.Tensor], object]:
    """``model`` compiled for no-grad inference by inductor with freezing (``torch._inductor.config.freezing``,
    set only while it runs), under bf16 autocast or not. Compilation happens at the first call."""
    import torch._inductor.config as inductor_config

    fn = torch.compile(model)

    def run(images: torch.Tensor):
        with inductor_config.patch(freezing=True), torch.no_grad():
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return fn(images)
            return fn(images)
    return run


def forwards(model: torch.nn.Module, img_size: int, modes=MODES) -> dict[str, Callable[[], object]]:
    """One no-grad forward per mode (batch 1)."""
    images = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    x16 = images.to(torch.bfloat16)
    out: dict[str, Callable[[], object]] = {}
    for mode in modes:
        if mode == "fp32":
            out[mode] = lambda: model(images)
        elif mode == "bf16":
            def run(model=model):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(images)
            out[mode] = run
        elif mode == "bf16_weights":
            low = copy.deepcopy(model).to(torch.bfloat16)
            out[mode] = lambda low=low: low(x16)
        elif mode == "bf16_compile":
            out[mode] = lambda fn=compiled(copy.deepcopy(model), autocast=True): fn(images)
        elif mode == "bf16_weights_compile":
            out[mode] = lambda fn=compiled(copy.deepcopy(model).to(torch.bfloat16), autocast=False): fn(x16)
        else:
            raise UserError(f"unknown mode '{mode}' (--modes); choose from {', '.join(ALL_MODES)}")
    return out


def interleaved(steps: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of every step, one call of each in turn per round (rotating the start)."""
    names = list(steps)
    with torch.no_grad():
        for _ in range(warmup):
            for n in names:
                steps[n]()
        times = {n: [] for n in names}
        for r in range(rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                steps[n]()
                times[n].append(time.perf_counter() - t0)
    return times


def top_ops(step: Callable[[], object], k: int = 8) -> tuple[list[tuple[str, float, int]], float]:
    """(operator, self CPU ms, calls) of one profiled call, the k largest by self CPU time, and the call's total
    self CPU ms (the sum over every operator of that same call)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) / 1e3
    return [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in rows[:k]], total


def main(argv: list[str] | None = None) -> int:
    from study.bench.flops import count_flops
    from study.config import load_config
    from study.models.build import build_model

    p = argparse.ArgumentParser(prog="python -m study.export.bench_bf16", description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="eomt")
    p.add_argument("--size", default="S")
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median over them)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated, from {', '.join(ALL_MODES)} (default: the uncompiled ones)")
    p.add_argument("--top", type=int, default=8, help="operators shown per profile (0: no profile)")
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown or not modes:
        raise UserError(f"unknown mode(s) {', '.join(unknown) or '(none given)'} (--modes); choose from "
                        f"{', '.join(ALL_MODES)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(None, [f"model.variant={a.variant}", f"model.size={a.size}", f"model.img_size={a.img_size}"])
    model = build_model(cfg.model).eval()
    gmacs = count_flops(model, a.img_size).total / 1e9
    steps = forwards(model, a.img_size, modes)
    mm = {dt: matmul_probe(getattr(torch, dt)) for dt in ("bfloat16", "float32")}
    steps.update({f"matmul_{dt}": fn for dt, (fn, _) in mm.items()})
    print(f"{a.variant} {a.size} at {a.img_size}px: {gmacs:.2f} GFLOPs (fvcore, multiply-adds), batch 1, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {a.rounds} interleaved rounds; "
          f"load average {load():.2f} before")
    times = interleaved(steps, a.rounds)
    rate = {dt: flops / float(np.median(times[f"matmul_{dt}"])) for dt, (_, flops) in mm.items()}
    after = load()
    for dt in mm:
        print(f"  matmul {MATMUL_N}^3 {dt}: {rate[dt] / 1e9:.0f} GFLOP/s (median)   load {after:.2f}")
    print(f"  {'mode':<22}{'median ms':>10}{'p5-p95 ms':>18}{'n':>4}{'limit ms':>10}{'ratio':>9}   load")
    for mode in modes:
        t = np.array(times[mode]) * 1e3
        dt = "float32" if mode == "fp32" else "bfloat16"
        limit = 2 * gmacs * 1e9 / rate[dt] * 1e3
        med = float(np.median(t))
        print(f"  {mode:<22}{med:>10.1f}{np.percentile(t, 5):>9.1f}-{np.percentile(t, 95):<8.1f}{len(t):>4}"
              f"{limit:>10.1f}{med / limit:>9.2f}   {after:.2f}")
    if a.top:
        for mode in modes:
            ops, total = top_ops(steps[mode], a.top)
            print(f"  profile {mode} (one forward, self CPU {total:.0f} ms, load {load():.2f}):")
            for name, ms, calls in ops:
                print(f"    {ms:8.1f} ms {100 * ms / total:5.1f}%  {calls:4d}x  {name}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
