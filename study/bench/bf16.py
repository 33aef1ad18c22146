"""bf16 on the CPU against its limit: ``python -m study.bench.bf16 [--size S] [--img-size 640]``.

For each precision mode the forward of one model (EoMT-S at 640 by default, batch 1, no grad) is timed in
interleaved rounds together with the matmul probes of its precision, the protocol of ``study bench``'s "x limit"
column (study/bench/limit.py: two ``F.linear`` probes per precision, the model's MLP product and a square 2048
one, each iteration of a precision's probes about as long as one of its forwards; the limit takes the faster).
Printed per mode: the forward's median (p5-p95 and the count), the matmul limit ``2 x GMACs / rate`` of that
mode's matmul dtype (fvcore's GFLOPs count multiply-adds, study/bench/flops.py; a multiply-add is 2 FLOPs of the
rate) and the ratio forward / limit with its 95% interval over the rounds, and the top operators of one profiled
forward (torch.profiler, self CPU time). The load average is printed beside every figure: the machine is shared.

Modes: ``fp32``; ``bf16`` (``torch.autocast("cpu", bfloat16)``, study/device.py ``autocast``, what training and
``study bench --precision bf16`` use); ``bf16_weights`` (the model's parameters cast to bf16 once,
``model.to(torch.bfloat16)``, and bf16 inputs, no autocast: every op, LayerNorm and softmax included, in bf16,
the way a deployed bf16 model runs); opt-in (``--modes``): ``bf16_compile`` and ``bf16_weights_compile``, the
same two compiled by inductor with freezing (:func:`compiled`). ``--attention`` also times the ways to compute one
block's attention in bf16 (:func:`attention_variants`) against fp32 SDPA. Each profile line gives the rate the
model's own linear layers reached.

Measured with the window probes (1 thread, 2 shared cores, torch 2.14.1), ``python -m study.bench.bf16
--threads 1 --rounds 11 --modes fp32,bf16,bf16_weights,bf16_compile,bf16_weights_compile --top 0``, twice, a few
minutes apart (load average 0.7-1.0); median ms, ratio to the limit [95% interval]:

    mode                   run 1 (bf16 probe 330 GFLOP/s)    run 2 (bf16 probe 439 GFLOP/s)
    fp32                   1890  1.50 [1.43-1.63]            1675  1.45 [1.38-1.58]
    bf16 (autocast)         895  2.17 [2.00-2.47]             814  2.63 [1.88-4.21]
    bf16_weights            859  2.09 [1.84-2.29]             752  2.43 [1.72-3.92]
    bf16_compile            726  1.76 [1.54-1.94]             503  1.63 [1.13-3.05]
    bf16_weights_compile    696  1.69 [1.52-1.74]             501  1.62 [1.01-2.63]

The compiled rows are within 2x of the limit in both runs and eager bf16 is at 2.1-2.6x, but these runs had a
slow probe (330 and 439 GFLOP/s: the matrix unit shared most of the time). In a later run with the unit mostly
to itself (``study bench``, bf16 probe 980 GFLOP/s; README "Speed: the protocol") the matmuls ran twice as fast
and the rest did not: eager bf16 3.8x, compiled with freezing 2.9x. Even with windows of a few hundred ms the
probe's iterations spread (p5-p95 251-373 GFLOP/s in run 1, 309-756 in run 2): spells of the fast mode
sometimes outlast a window, which is what the intervals show.

The earlier protocol timed each probe as one call per round (about 2.5 ms) and took the median: the median bf16
probe came out at 398 GFLOP/s in one run and 688 in another a few minutes later, while the forwards moved far
less, so the same forward read 1.9x or 3.3x. Single calls are bimodal here (about 400 and about 850 GFLOP/s); a
window as long as a forward averages over the mixture the forward itself sees.

Where the bf16 forward's time goes (profiles of one forward in an earlier quiet run, self CPU):
- the attention: 222-238 ms of 491-601 ms (40-54%). torch's CPU flash kernel runs one block (1605 tokens, 6 heads
  of 64) in 21.9 ms, 181 GFLOP/s, relative error 3.8e-3 to fp32 SDPA; every alternative is slower at that shape
  (``--attention``, same rounds): SDPA's math backend 208 ms, ``q @ k^T`` + bf16 softmax + ``@ v`` 51.8 ms (the
  two oneDNN matmuls alone take about 7 ms each; the softmax over the 15.5 M scores about 15-18 ms, its
  exponentials alone 9.5 ms), the same with an fp32 softmax 134 ms, chunked over 256 queries 48.6 ms; compiled by
  inductor the explicit form takes 28 ms against the kernel's 16 ms (a separate quiet run), and compiled
  ``torch.nn.attention.flex_attention`` (inductor's CPU template) 47 ms against the kernel's 21 ms (20
  interleaved rounds, a one-off script, relative error 2.3e-3). So the model keeps
  SDPA, and there is no attention setting: the flash kernel is the best of them on this CPU. At K = 64 the kernel
  is limited by its exponentials and small products; it alone is about 0.7x (probe 398) to 1.1x (probe 688) of
  the limit, which is why eager bf16 cannot reach 2x of a fast probe.
- the linear layers, 112-121 ms (about 630 GFLOP/s, the matrix units' rate);
- copies: 66 ms under autocast (its casts of the residual stream, of LayerNorm's fp32 outputs and of the 48
  weights), 29 ms with bf16 weights. The strided copy of the whole upscaled map (about 60 ms in bf16: the mask
  product ``einsum("bqc,bchw->bqhw")`` made LayerNorm2d's NCHW view of NHWC memory contiguous inside its bmm) is
  gone: study/models/eomt.py ``mask_product`` takes the product as ``"bhwc,bqc->bhwq"`` on that layout, the
  same values and the same FLOP count for fvcore and the fast counter (tests/test_bf16_speed_paths.py);
- GELU (33-54 ms), LayerNorm (24 ms) and the upscaler's convolutions (45-55 ms), which inductor fuses or folds
  (compiled: 39 ms of fused kernels, 36 ms of convolutions). Run one by one, GELU and LayerNorm over a
  channels-last map were 3-5x slower than over the same memory viewed as contiguous NHWC; an upscaler that kept
  every step on contiguous NHWC memory gave no measurable gain in the whole forward (old / new per round: 0.96-1.01
  median over 9 interleaved rounds in fp32, autocast and bf16 weights), so it was not kept.
With 2 threads on a loaded 2-core machine the forwards slow down 3-4x more than the matmul probe (OpenMP
threads wait at every operator's barrier for a descheduled sibling), so time on a busy machine with 1 thread.
"""
from __future__ import annotations

import argparse
import copy
import os
from dataclasses import replace
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


def load() -> float:
    return os.getloadavg()[0]


def compiled(model: torch.nn.Module, autocast: bool) -> Callable[[torch.Tensor], object]:
    """``model`` compiled for no-grad inference by inductor with freezing (study/bench/runtimes.py ``compiled``, what
    ``study bench`` runs for a ``freeze`` mode), under bf16 autocast or not. Compilation happens at the first
    call."""
    from study.bench.runtimes import compiled as compile_model

    fn = compile_model(model, freezing=True)

    def run(images: torch.Tensor):
        with torch.no_grad():
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
    """Seconds per call of every step in interleaved rounds (study/bench/timing.py ``time_rounds``: one call of
    each in turn per round, the start rotating)."""
    from study.bench.protocol import SpeedProtocol
    from study.bench.timing import Entry, time_rounds

    proto = SpeedProtocol(device="cpu", threads=torch.get_num_threads()).resolved()
    entries = [Entry(name, lambda _inputs, fn=fn: fn(), None, proto) for name, fn in steps.items()]
    with torch.no_grad():
        times, _ = time_rounds(entries, torch.device("cpu"), warmup, rounds)
    return dict(zip(steps, times))


def attention_variants(tokens: int, heads: int, head_dim: int, chunk: int = 256
                       ) -> tuple[dict[str, Callable[[], torch.Tensor]], torch.Tensor]:
    """The ways to compute one block's attention in bf16 on the CPU, at the model's shape (batch 1), and the fp32
    SDPA reference: ``sdpa`` (what the model runs: torch's CPU flash kernel), ``sdpa_math`` (SDPA restricted to
    the math backend), ``matmul_softmax_bf16`` (q @ k^T by oneDNN, softmax in bf16, @ v), ``matmul_softmax_fp32``
    (the same with the softmax in fp32) and ``chunked_<n>`` (the bf16 one over n queries at a time, which bounds
    the score matrix's memory)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    g = torch.Generator().manual_seed(0)
    q32, k32, v32 = (torch.randn(1, heads, tokens, head_dim, generator=g) for _ in range(3))
    q, k, v = (t.to(torch.bfloat16) for t in (q32, k32, v32))
    scale = head_dim ** -0.5

    def math():
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa(q, k, v)

    def explicit(q=q, softmax_dtype=torch.bfloat16):
        return torch.softmax((q * scale) @ k.transpose(-2, -1), -1, dtype=softmax_dtype).to(v.dtype) @ v

    def chunked():
        return torch.cat([explicit(q[:, :, i:i + chunk]) for i in range(0, tokens, chunk)], dim=2)

    steps = {"sdpa": lambda: sdpa(q, k, v), "sdpa_math": math, "matmul_softmax_bf16": explicit,
             "matmul_softmax_fp32": lambda: explicit(softmax_dtype=torch.float32), f"chunked_{chunk}": chunked}
    return steps, sdpa(q32, k32, v32)


LINEAR_OPS = ("aten::addmm", "aten::mm", "mkldnn::_linear_pointwise")  # eager and inductor's linear layers


def top_ops(step: Callable[[], object], k: int = 8) -> tuple[list[tuple[str, float, int]], float, float]:
    """(operator, self CPU ms, calls) of one profiled call, the k largest by self CPU time, the call's total
    self CPU ms (the sum over every operator of that same call) and the ms of its linear layers (LINEAR_OPS)."""
    from torch.profiler import ProfilerActivity, profile

    from study.bench.environment import without_profiler_notices

    with torch.no_grad(), without_profiler_notices(), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) / 1e3
    linear = sum(e.self_cpu_time_total for e in rows if e.key in LINEAR_OPS) / 1e3
    return [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in rows[:k]], total, linear


def main(argv: list[str] | None = None) -> int:
    from study.device import cpu_threads

    p = argparse.ArgumentParser(prog="python -m study.bench.bf16", description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="eomt")
    p.add_argument("--size", default="S")
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median over them)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated, from {', '.join(ALL_MODES)} (default: the uncompiled ones)")
    p.add_argument("--attention", action="store_true",
                   help="also time the bf16 attention alternatives at one block's shape (attention_variants)")
    p.add_argument("--top", type=int, default=8, help="operators shown per profile (0: no profile)")
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown or not modes:
        raise UserError(f"unknown mode(s) {', '.join(unknown) or '(none given)'} (--modes); choose from "
                        f"{', '.join(ALL_MODES)}")
    with cpu_threads(a.threads):  # every core by default, torch's own setting restored afterwards
        return _measure(a, modes)


def _measure(a: argparse.Namespace, modes: list[str]) -> int:
    from study.bench.flops import count_flops
    from study.bench.limit import probe_shapes, vit_tokens
    from study.bench.protocol import SpeedProtocol
    from study.bench.speed import time_interleaved
    from study.bench.timing import Entry
    from study.config import load_config
    from study.models.build import build_model

    cfg = load_config(None, [f"model.variant={a.variant}", f"model.size={a.size}", f"model.img_size={a.img_size}"])
    model = build_model(cfg.model).eval()
    flops = count_flops(model, a.img_size)
    gmacs = flops.total / 1e9
    linear_gmacs = flops.by_operator.get("linear", 0) / 1e9
    steps = forwards(model, a.img_size, modes)
    # The rows and their matmul probes (study/bench/limit.py) in the same interleaved rounds; the precision
    # names the probes' dtype (the autocast itself is inside each step).
    proto = SpeedProtocol(device="cpu", warmup=2, iters=a.rounds, threads=torch.get_num_threads()).resolved()
    shapes = probe_shapes(model, a.img_size)
    entries = [Entry(mode, lambda _inputs, fn=steps[mode]: fn(), None,
                     replace(proto, precision="fp32" if mode == "fp32" else "bf16",
                             compile=mode in COMPILED_MODES, freezing=mode in COMPILED_MODES),
                     gflops=gmacs, limit_shapes=shapes) for mode in modes]
    print(f"{a.variant} {a.size} at {a.img_size}px: {gmacs:.2f} GFLOPs (fvcore, multiply-adds), batch 1, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {a.rounds} interleaved rounds with the "
          f"matmul probes (study/bench/limit.py); load average {load():.2f} before")
    rows, _ = time_interleaved(entries, limit=True)
    after = load()
    for prec in dict.fromkeys(r["protocol"]["precision"] for r in rows):
        r = next(r for r in rows if r["protocol"]["precision"] == prec)
        rates = ", ".join(f"{name} {rate:.0f}" for name, rate in r["limit_probes_gflops"].items())
        print(f"  {prec} probes (GFLOP/s, median iteration): {rates}; the limit takes {r['limit_rate_gflops']:.0f} "
              f"(p5-p95 of its iterations {r['limit_rate_p5_p95'][0]:.0f}-{r['limit_rate_p5_p95'][1]:.0f})")
    print(f"  {'mode':<22}{'median ms':>10}{'p5-p95 ms':>18}{'n':>4}{'limit ms':>10}{'ratio [95% CI]':>20}   load")
    for r in rows:
        lo, hi = r["limit_ratio_ci"]
        print(f"  {r['mode']:<22}{r['ms_median']:>10.1f}{r['ms_p5']:>9.1f}-{r['ms_p95']:<8.1f}{r['n_iters']:>4}"
              f"{r['limit_ms']:>10.1f}{r['limit_ratio']:>8.2f} [{lo:.2f}-{hi:.2f}]   {after:.2f}"
              + (f"  ({r['limit_note']})" if r.get("limit_note") else ""))
    if a.attention:
        blk = model.backbone.blocks[0].attn
        n = vit_tokens(model, a.img_size)
        att, ref = attention_variants(n, blk.num_heads, blk.head_dim)
        att_times = interleaved(att, a.rounds)
        flops = 4.0 * blk.num_heads * n * n * blk.head_dim  # q @ k^T and @ v, 2 FLOPs per multiply-add
        print(f"  attention, one block: {n} tokens, {blk.num_heads} heads of {blk.head_dim}, bf16, "
              f"{a.rounds} interleaved rounds, load {load():.2f}")
        print(f"    {'way':<22}{'median ms':>10}{'p5-p95 ms':>18}{'GFLOP/s':>9}{'rel err':>10}")
        for name, fn in att.items():
            t = np.array(att_times[name]) * 1e3
            med = float(np.median(t))
            with torch.no_grad():
                err = float((fn().float() - ref).norm() / ref.norm())
            print(f"    {name:<22}{med:>10.2f}{np.percentile(t, 5):>9.2f}-{np.percentile(t, 95):<8.2f}"
                  f"{flops / med / 1e6:>9.0f}{err:>10.1e}")
    if a.top:
        for mode in modes:
            ops, total, linear = top_ops(steps[mode], a.top)
            rate_note = ""
            if linear and mode != "fp32":  # the matrix rate the model's own linear layers reached in this call
                rate_note = f"; its linear layers {2 * linear_gmacs / (linear / 1e3):.0f} GFLOP/s"
            print(f"  profile {mode} (one forward, self CPU {total:.0f} ms{rate_note}, load {load():.2f}):")
            for name, ms, calls in ops:
                print(f"    {ms:8.1f} ms {100 * ms / total:5.1f}%  {calls:4d}x  {name}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
