"""bf16 on the CPU against its limit: ``python -m study.export.bench_bf16 [--size S] [--img-size 640]``.

For each precision mode the forward of one model (EoMT-S at 640 by default, batch 1, no grad) is timed in
interleaved rounds, together with two matrix multiplies in bf16 and in fp32 (:func:`matmul_probes`: a large
square one and the model's own MLP product; the machine's matrix rates, measured in the same rounds so that a
noisy spell hits them alike; the limit takes the faster probe's rate, the stricter limit). Printed per mode:
the forward's median (p5-p95 and the count), the matmul limit ``2 x GMACs / rate`` of that mode's matmul dtype (fvcore's
GFLOPs count multiply-adds, study/bench/flops.py; a multiply-add is 2 FLOPs of the rate) and the ratio
forward / limit, and the top operators of one profiled forward (torch.profiler, self CPU time). The load
average is printed beside every figure: the machine is shared.

Modes: ``fp32``; ``bf16`` (``torch.autocast("cpu", bfloat16)``, study/device.py ``autocast``, what training and
``study bench --precision bf16`` use); ``bf16_weights`` (the model's parameters cast to bf16 once,
``model.to(torch.bfloat16)``, and bf16 inputs, no autocast: every op, LayerNorm and softmax included, in bf16,
the way a deployed bf16 model runs); opt-in (``--modes``): ``bf16_compile`` and ``bf16_weights_compile``, the
same two compiled by inductor with freezing (:func:`compiled`). ``--attention`` also times the ways to compute one
block's attention in bf16 (:func:`attention_variants`) against fp32 SDPA. Each profile line gives the rate the
model's own linear layers reached: where it is well above the probe's, the probe ran in a slow spell and the
limit is overstated (the ratio flattered).

Measured here with both probes (1 thread, 2 shared cores, torch 2.14.1), ``python -m study.export.bench_bf16
--threads 1 --rounds 11 --modes fp32,bf16,bf16_weights,bf16_compile,bf16_weights_compile --top 0``, load average
0.9-1.0; bf16 probes 365 GFLOP/s (square 2048, p5-p95 346-723) and 405 (the MLP's 1605 x 384 x 1536, p5-p95
387-862), so a bf16 limit of 336 ms: fp32 1697 ms (1.51x its limit), bf16 autocast 728 ms (2.17x), bf16
weights 718 ms (2.14x), bf16_compile 554 ms (1.65x), bf16_weights_compile 588 ms (1.75x). An earlier run the same
hour (probe 399): 2.59x, 2.41x, 2.07x, 1.88x. The compiled rows are within about 2x of the limit; eager bf16
is not. The probes' spread (the fast mode at twice the median) is the weak point of every ratio here.

Measured earlier with the square probe alone (1 thread, 2 shared cores, torch 2.14.1), ``python -m study.export.bench_bf16 --threads 1 --rounds 11
--attention --modes fp32,bf16,bf16_weights,bf16_compile,bf16_weights_compile``, load average 0.72 before, 0.93
after; medians (p5-p95) of 11 rounds; bf16 probe 398 GFLOP/s, bf16 limit 341 ms for 67.96 GMACs:

    fp32                  1609 ms (1332-1828)  1.48x its fp32 limit (probe 125 GFLOP/s)
    bf16 (autocast)        663 ms (492-788)    1.94x
    bf16_weights           629 ms (424-803)    1.84x
    bf16_compile           583 ms (342-671)    1.71x
    bf16_weights_compile   560 ms (391-637)    1.64x

The probe is the weak point of the ratio: its own p5-p95 spans 342-979 GFLOP/s within a run, and its median was
398 in this run and 688 in one a few minutes earlier (load 0.86-0.98), while the forwards moved far less. In that
earlier run (the same rounds, a script that also kept the pre-change head on a copy of the model): bf16 autocast
647 -> 524 ms (3.27x -> 2.65x of a 198 ms limit), bf16 weights 484 -> 483 ms (2.45x -> 2.44x; its own p5 went
466 -> 404), both compiled rows 394 ms (2.00x), fp32 1397 -> 1377 ms. So: within 2x of the limit in every bf16 row
when the probe runs at about 400 GFLOP/s; at a fast probe (about 700) only the compiled rows reach 2.0x, and eager
bf16 stays at 2.4-2.7x. In this run the linear layers of the bf16 forward reached about 630 GFLOP/s
(35.24 GMACs in 112-121 ms), above the probe's 398: read the 1.6-1.9x figures with that in mind.

Where the bf16 forward's time goes (the profiles of the run above, self CPU of one forward):
- the attention: 222-238 ms of 491-601 ms (40-54%). torch's CPU flash kernel runs one block (1605 tokens, 6 heads
  of 64) in 21.9 ms, 181 GFLOP/s, relative error 3.8e-3 to fp32 SDPA; every alternative is slower at that shape
  (``--attention``, same rounds): SDPA's math backend 208 ms, ``q @ k^T`` + bf16 softmax + ``@ v`` 51.8 ms (the
  two oneDNN matmuls alone take about 7 ms each; the softmax over the 15.5 M scores about 15-18 ms, its
  exponentials alone 9.5 ms), the same with an fp32 softmax 134 ms, chunked over 256 queries 48.6 ms; compiled by
  inductor the explicit form takes 28 ms against the kernel's 16 ms (a separate quiet run). So the model keeps
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
  (compiled: 39 ms of fused kernels, 36 ms of convolutions).
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


def matmul_probe(dtype: torch.dtype, n: int = MATMUL_N, k: int | None = None,
                 m: int | None = None) -> tuple[Callable[[], object], float]:
    """A callable doing one (n x k) @ (k x m) matmul in ``dtype`` (square n by default), and its FLOPs
    (2 n k m)."""
    k = n if k is None else k
    m = n if m is None else m
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(k, m, generator=g).to(dtype)
    return (lambda: torch.mm(a, b)), 2.0 * n * k * m


def matmul_probes(dtype: torch.dtype, tokens: int, dim: int) -> dict[str, tuple[Callable[[], object], float]]:
    """The probes of one dtype: the large square matmul and the model's own commonest product, its MLP's
    first layer (tokens x dim) @ (dim x 4 dim). The limit takes the faster probe's rate (the stricter limit):
    the square one alone ran up to 1.7x slower than the model's own linear layers in some runs here."""
    return {f"square {MATMUL_N}": matmul_probe(dtype),
            f"mlp {tokens}x{dim}x{4 * dim}": matmul_probe(dtype, tokens, dim, 4 * dim)}


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

    from study.bench.speed import without_profiler_notices

    with torch.no_grad(), without_profiler_notices(), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) / 1e3
    linear = sum(e.self_cpu_time_total for e in rows if e.key in LINEAR_OPS) / 1e3
    return [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in rows[:k]], total, linear


def count_tokens(model: torch.nn.Module, img_size: int) -> int:
    """Tokens of the first blocks' attention: the ViT's prefix and patch tokens (EoMT adds its queries later)."""
    bb = model.backbone
    return bb.num_prefix_tokens + (img_size // bb.patch_size) ** 2


def main(argv: list[str] | None = None) -> int:
    from study.device import cpu_threads

    p = argparse.ArgumentParser(prog="python -m study.export.bench_bf16", description=__doc__.splitlines()[0])
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
    from study.config import load_config
    from study.models.build import build_model

    cfg = load_config(None, [f"model.variant={a.variant}", f"model.size={a.size}", f"model.img_size={a.img_size}"])
    model = build_model(cfg.model).eval()
    flops = count_flops(model, a.img_size)
    gmacs = flops.total / 1e9
    linear_gmacs = flops.by_operator.get("linear", 0) / 1e9
    steps = forwards(model, a.img_size, modes)
    dim = model.backbone.blocks[0].attn.num_heads * model.backbone.blocks[0].attn.head_dim
    probes = {(dt, name): probe for dt in ("bfloat16", "float32")
              for name, probe in matmul_probes(getattr(torch, dt), count_tokens(model, a.img_size), dim).items()}
    steps.update({f"matmul {dt} {name}": fn for (dt, name), (fn, _) in probes.items()})
    print(f"{a.variant} {a.size} at {a.img_size}px: {gmacs:.2f} GFLOPs (fvcore, multiply-adds), batch 1, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {a.rounds} interleaved rounds; "
          f"load average {load():.2f} before")
    times = interleaved(steps, a.rounds)
    after = load()
    rate: dict[str, float] = {}
    for (dt, name), (_, probe_flops) in probes.items():
        t = np.array(times[f"matmul {dt} {name}"])
        r = probe_flops / float(np.median(t))
        rate[dt] = max(rate.get(dt, 0.0), r)
        print(f"  matmul {dt} {name}: {r / 1e9:.0f} GFLOP/s (median; p5-p95 {probe_flops / np.percentile(t, 95) / 1e9:.0f}"
              f"-{probe_flops / np.percentile(t, 5) / 1e9:.0f})   load {after:.2f}")
    for dt in rate:
        print(f"  {dt} limit rate: {rate[dt] / 1e9:.0f} GFLOP/s (the faster probe)")
    print(f"  {'mode':<22}{'median ms':>10}{'p5-p95 ms':>18}{'n':>4}{'limit ms':>10}{'ratio':>9}   load")
    for mode in modes:
        t = np.array(times[mode]) * 1e3
        dt = "float32" if mode == "fp32" else "bfloat16"
        limit = 2 * gmacs * 1e9 / rate[dt] * 1e3
        med = float(np.median(t))
        print(f"  {mode:<22}{med:>10.1f}{np.percentile(t, 5):>9.1f}-{np.percentile(t, 95):<8.1f}{len(t):>4}"
              f"{limit:>10.1f}{med / limit:>9.2f}   {after:.2f}")
    if a.attention:
        blk = model.backbone.blocks[0].attn
        n = count_tokens(model, a.img_size)
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
                rate_note = f"; its linear layers {2 * linear_gmacs / linear:.0f} GFLOP/s"
            print(f"  profile {mode} (one forward, self CPU {total:.0f} ms{rate_note}, load {load():.2f}):")
            for name, ms, calls in ops:
                print(f"    {ms:8.1f} ms {100 * ms / total:5.1f}%  {calls:4d}x  {name}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
