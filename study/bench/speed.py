"""Speed under a written protocol (docs/speed.md): the rows of one measurement timed in interleaved rounds,
robust to a busy machine, with a per-component time breakdown taken in the same timed iterations.

This module builds the rows (:func:`build_entry`: the model on the protocol's device, its runtime's runner and
its input) and times them together (:func:`time_interleaved`); :func:`measure_fps` is the one way to time a
single model. The parts of the protocol live beside it, one job each:

- study/bench/protocol.py: the settings (:class:`SpeedProtocol`);
- study/bench/runtimes.py: eager, compiled, frozen and ONNX Runtime runners, ``bench.modes`` words;
- study/bench/timing.py: the interleaved loop, the timer and the component spans;
- study/bench/stats.py: median statistics, ratios with their bootstrap interval, the ranking warning;
- study/bench/environment.py: versions, device, host, commit, load and the SDPA kernels taken;
- study/bench/limit.py: the matmul limit ("x limit").
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from study.bench import runtimes
from study.bench.environment import environment, format_kernels, sdpa_enabled, sdpa_kernels_taken
from study.bench.limit import SQUARE, MatmulProbe, limit_fields, probe_shapes
from study.bench.protocol import SpeedProtocol
from study.bench.stats import BOOTSTRAP_RESAMPLES, CI_LEVEL, bootstrap_medians, mean_breakdown, rank_warning, \
    speed_ratios, summarize, unrankable
from study.bench.timing import Entry, cudnn_benchmark, device_context, time_once, time_rounds
from study.device import cpu_threads
from study.errors import UserError


def _end_to_end(run_model: Callable[[torch.Tensor], Any], model: nn.Module, img_size: int, device: torch.device, precision: str,
                batch: int):
    """``batch`` raw images through pre-processing, forward and panoptic post-processing (study/eval).

    Random weights rarely score a query above the merge's 0.8 threshold, which would make the merge free;
    the benchmark therefore merges with threshold 0, so every query enters it: an upper bound of a trained
    model's post-processing cost.
    """
    from study.eval import inference, postprocess
    from study.eval.config import EvalConfig

    paper = EvalConfig()  # the merge's thresholds (docs/paper.md section 7), but for the score threshold
    raw = torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    is_thing = [True] * model.num_classes

    def run(images):
        out = []
        for masks, classes in inference.run_padded(run_model, images, img_size, device=device,
                                                   precision=precision):
            out.append(postprocess.panoptic_merge(masks, classes, is_thing, score_threshold=0.0,
                                                  overlap_threshold=paper.overlap_threshold,
                                                  mask_threshold=paper.mask_threshold))
        return out

    return run, [raw] * batch


def build_entry(label: str, model: nn.Module, img_size: int, protocol: SpeedProtocol,
                gflops: Optional[float] = None) -> Entry:
    """The model on the protocol's device, its runner (the protocol's runtime) and its input; ``gflops`` (per
    image) gives the row its matmul limit in :func:`time_interleaved` (``limit=True``)."""
    p = protocol.resolved()
    device = torch.device(p.device)
    model = model.to(device).eval()
    build = runtimes.runtime_builder(p.runtime)
    if p.scope == "end_to_end":
        if p.runtime != "pytorch":
            raise UserError(f"bench.scope=end_to_end times the PyTorch model inside study/eval's pre- and "
                            f"post-processing; runtime '{p.runtime}' supports bench.scope=model only")
        # run_padded autocasts; compiled as the model scope is (freezing included)
        run_model = runtimes.compiled(model, p.compile_mode, p.freezing) if p.compile else model
        run, inputs = _end_to_end(run_model, model, img_size, device, p.precision, p.batch)
    else:  # the model alone on a batch of random images (the end-to-end scope makes its own raw images)
        images = torch.rand(p.batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
        run, inputs = build(model, images, p), images
    if p.runtime != "pytorch":
        why = f"runtime {p.runtime}: no module hooks"
    elif p.compile:
        why = "compiled: hooks cannot see inside a compiled graph (the eager rows of the same rounds have one)"
    else:
        why = ""
    components = model.components() if not why and hasattr(model, "components") else None
    # no matmul limit for an end-to-end row: its timed region holds pre- and post-processing, which the
    # limit (the forward's multiply-adds) does not count, so a ratio would read as the forward's
    return Entry(label, run, inputs, p, components, why or ("" if components else "the model names no components"),
                 gflops if p.scope == "model" else None, probe_shapes(model, img_size, p.batch, p.device))


def _matmul_probes(entries: list[Entry], device: torch.device) -> dict[str, list[MatmulProbe]]:
    """The matmul probes of each precision among the entries with a GFLOPs count (study/bench/limit.py), at
    the first such entry's product shapes, calibrated so that one iteration of all of a precision's probes
    lasts about as long as the median forward of its entries (one untimed forward each, after the warm-up)."""
    single = {i: time_once(lambda e=e: e.run(e.inputs), device)
              for i, e in enumerate(entries) if e.gflops}
    probes: dict[str, list[MatmulProbe]] = {}
    for i in single:
        prec = entries[i].protocol.precision
        if prec not in probes:
            shapes = entries[i].limit_shapes or [(SQUARE, SQUARE, SQUARE)]
            probes[prec] = [MatmulProbe(prec, shape, device) for shape in shapes]
            window = float(np.median([single[j] for j in single if entries[j].protocol.precision == prec]))
            for pr in probes[prec]:
                pr.calibrate(window / len(shapes), lambda f: time_once(f, device))
    return probes


def time_interleaved(entries: list[Entry], breakdown: bool = False, reference: int = 0, limit: bool = False
                     ) -> tuple[list[dict], Optional[str]]:
    """Time ``entries`` in interleaved rounds (the first entry's protocol gives device, threads, warm-up,
    rounds and min_time; all must share the device). Returns one result per entry (statistics, ratio to
    entry ``reference`` with its interval, breakdown, kernels, protocol, environment) and the ranking
    warning (None when every pair can be ranked). With ``limit``, every entry with ``gflops`` also gets its
    matmul limit and its ratio to it (``limit_*``, study/bench/limit.py): two matmul probes per precision
    are extra entries of the same rounds (not rows of the result)."""
    if not entries:
        return [], None
    p = entries[0].protocol
    device = torch.device(p.device)
    if any(torch.device(e.protocol.device) != device for e in entries):
        raise UserError("rows timed in the same rounds must share one device (bench.device)")
    if p.warmup < 1 and any(e.protocol.compile for e in entries):
        raise UserError("bench.warmup=0 with torch.compile: the first timed iteration would include the "
                        "compilation; set bench.warmup to 1 or more")
    with (cpu_threads(p.threads) as threads, device_context(device), cudnn_benchmark(device), torch.no_grad()):
        probes: dict[str, list[MatmulProbe]] = {}
        warmup = p.warmup
        if limit and any(e.gflops for e in entries):
            time_rounds(entries, device, p.warmup, 0)  # the warm-up alone, then the probes' calibration
            probes, warmup = _matmul_probes(entries, device), 0
        extra = [Entry(pr.label, pr.run, None, replace(p, precision=prec), None, "matmul probe")
                 for prec, group in probes.items() for pr in group]
        times, parts = time_rounds(entries + extra, device, warmup, p.iters, p.min_time, breakdown,
                                   rows=len(entries))
        kernels = [sdpa_kernels_taken(lambda e=e: e.run(e.inputs)) for e in entries]
    boot = bootstrap_medians(times, BOOTSTRAP_RESAMPLES, 0) if probes else None
    all_times = times
    flat = [pr for group in probes.values() for pr in group]  # in the order of ``extra``
    times, parts = times[:len(entries)], parts[:len(entries)]
    ratios = speed_ratios(times, reference)
    env = environment(device)
    results = []
    for e, t, part, k, ratio in zip(entries, times, parts, kernels, ratios):
        ep = e.protocol
        r = summarize(t, ep.batch)
        r.update({"mode": e.label, "ratio": ratio["ratio"], "ratio_ci": [ratio["ci_low"], ratio["ci_high"]],
                  "ratio_to": entries[reference].label, "attention_kernels": format_kernels(k),
                  "sdpa_kernels": k, "sdpa_enabled": sdpa_enabled(device), "protocol": ep.describe()})
        if breakdown:
            if e.components:
                r["breakdown_ms"] = mean_breakdown(part, t, list(e.components))
                r["breakdown_of"] = (f"mean ms per forward over the same {len(t)} timed iterations; 'other' = "
                                     "the measured forward minus the parts")
            else:
                r["breakdown_ms"] = None
                r["breakdown_of"] = f"none ({e.no_breakdown})"
        if limit and ep.scope != "model":
            r["limit_skipped"] = "scope end_to_end: pre- and post-processing are not in the matmul limit"
        if e.gflops and ep.precision in probes:
            mine = [(pr, all_times[j], j) for j, pr in enumerate(flat, start=len(entries)) if pr.precision == ep.precision]
            r.update(limit_fields(t, mine, e.gflops, ep.batch, boot, row=len(results), ci_level=CI_LEVEL))
        compile_desc = (ep.compile_mode + ("+freezing" if ep.freezing else "")) if ep.compile else "off"
        r["env"] = {**env, "precision": ep.precision, "compile_mode": compile_desc,
                    "runtime": ep.runtime, "sdpa_kernel_taken": format_kernels(k), "threads": threads,
                    "batch": ep.batch}
        results.append(r)
    return results, rank_warning(unrankable(times, [e.label for e in entries]))


def measure_fps(model: nn.Module, img_size: int, protocol: SpeedProtocol, breakdown: bool = False) -> dict:
    """Frames per second of one model under ``protocol`` (one entry of :func:`time_interleaved`): the
    statistics, the kernels, the protocol and the environment; with ``breakdown``, the milliseconds per
    component of the same timed iterations (``breakdown_ms``) when the row can give them (eager PyTorch, a
    model with ``components()``; otherwise the row has no breakdown keys)."""
    entry = build_entry("model", model, img_size, protocol)
    (row,), _ = time_interleaved([entry], breakdown=breakdown and not entry.no_breakdown)
    for key in ("mode", "ratio", "ratio_ci", "ratio_to"):
        row.pop(key)
    return row
