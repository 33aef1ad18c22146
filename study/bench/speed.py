"""Speed with a written protocol (docs/paper.md section 8), robust to a busy machine, and a per-component time
breakdown taken in the same timed iterations.

The protocol, stated in every result row (``protocol`` and ``env``):
- batch ``batch`` (1 by default; Table 9 uses 32), one fixed random input of the padded square size, model in
  eval mode under ``torch.no_grad``;
- device and precision from study/device.py (CUDA: bf16 autocast; CPU: fp32), ``torch.compile`` off or on
  with a stated mode (``default`` or ``max-autotune``), CPU threads ``threads`` (None: every core this
  process may use; study/device.py ``cpu_threads``);
- **interleaved rounds**: every row of one group (the rows of one size in ``study bench``) is timed in the
  same loop, one iteration of each in turn, round after round, so that a noisy spell on a shared machine
  hits all of them alike; the starting row rotates from round to round (no row always runs right after
  the same neighbour). ``warmup`` untimed rounds come first (compilation, allocator and cuDNN autotuning
  settle there; on CUDA ``torch.backends.cudnn.benchmark`` is on during the measurement, restored after);
  then at least ``iters`` timed rounds, and more until every row has ``min_time`` seconds of timed
  iterations;
- timer: CUDA events around each timed iteration, recorded on the current stream of the measured GPU (the
  whole measurement runs inside ``torch.cuda.device(device)``), with a synchronisation after each;
  ``time.perf_counter`` on the CPU (its ops are synchronous);
- timed region: the model forward only (scope "model"), or pre-processing (uint8 image of COCO's typical
  640x480 size -> float, resize of the longer side, zero pad), forward and post-processing (mask logits
  upsampled, padding cropped, resized to the image, panoptic merge with every query, see ``_end_to_end``)
  with scope "end_to_end";
- statistics per row: median, mean, p5, p95 and standard deviation of the per-iteration times and their
  number; FPS = batch / median seconds (the median, not the mean: one preempted iteration does not move it);
- ratios (:func:`speed_ratios`): FPS of each row over the reference row's, with a 95% bootstrap interval
  that resamples whole rounds (the rows of one round are paired); rows whose pairwise interval contains 1
  are named in a warning (:func:`unrankable`): their spread is too wide to rank them;
- breakdown: with ``breakdown`` on, hooks on each of ``model.components()`` time the parts *of the same
  timed iterations* (eager PyTorch rows only: hooks cannot see inside a compiled graph or another runtime);
  each part is its mean per forward, "total" is the mean measured forward, and "other" the rest, so the
  parts add up to the measured forward. A component called inside another one counts for the outer one
  only. The hooks cost two clock reads per component call (a few dozen per forward);
- matmul limit (``limit=True``, ``study bench``'s "x limit" column): each row's median forward over
  2 x GFLOPs x batch / the rate of a matmul probe of its precision, the probes timed as entries of the same
  rounds, a precision's probes together about as long as one of its forwards (study/bench/limit.py);
  ``min_time`` counts the rows' iterations only;
- attention kernels: the SDPA kernels one profiled forward (after the timed loop) actually ran, by aten op
  name and calls per forward (``attention_kernels``), beside the backends that were enabled
  (``sdpa_enabled``): a silent fallback to the math kernel shows there.

Runtimes: a row is timed through a callable ``run(inputs)`` built per row by the runtime's builder,
``build(model, example_inputs, protocol) -> run`` (:data:`RUNTIMES`; ``pytorch`` is built in, with
``torch.compile`` and autocast as the protocol says). Another runtime (ONNX Runtime, ...) registers its
builder with :func:`register_runtime` and is then timed in the same rounds as the PyTorch rows.

The paper's H100 figures used FlashAttention-2 through SDPA, default ``torch.compile`` and mixed precision;
the paper is silent on warm-up, timer, timed region and statistic, which is why each row records ours.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from study.device import autocast, available_cores, cpu_threads, resolve_device, resolve_precision, synchronize
from study.bench.limit import SQUARE, MatmulProbe, limit_fields, probe_shapes
from study.errors import UserError

_clock = time.perf_counter  # the CPU timer (a module name, so that a test can see what the timed region holds)

COMPILE_MODES = ("default", "max-autotune")
CI_LEVEL = 0.95  # the ratios' bootstrap interval (our choice; the paper reports no interval)
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class SpeedProtocol:
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    warmup: int = 3
    iters: int = 10  # timed rounds at least
    scope: str = "model"
    batch: int = 1
    threads: Optional[int] = None  # CPU threads; None = every available core
    min_time: float = 0.0  # seconds of timed iterations per row at least
    compile_mode: str = "default"
    runtime: str = "pytorch"
    freezing: bool = False  # compiled rows: inductor's freezing (parameters folded in as constants; inference only)

    def resolved(self) -> "SpeedProtocol":
        device = resolve_device(self.device)
        if self.compile_mode not in COMPILE_MODES:
            raise UserError(f"unknown compile mode '{self.compile_mode}' (bench.compile_mode); choose "
                            f"{' or '.join(COMPILE_MODES)}")
        if self.freezing and not self.compile:
            raise UserError("bench.freezing applies to compiled rows: set bench.compile (or a 'compile' or "
                            "'freeze' word in bench.modes)")
        if self.scope not in ("model", "end_to_end"):
            raise UserError(f"unknown timing scope '{self.scope}' (bench.scope); choose model or end_to_end")
        return replace(self, device=str(device), precision=resolve_precision(self.precision, device),
                       threads=available_cores() if self.threads is None else self.threads)

    def describe(self) -> dict:
        d = asdict(self)
        dev = torch.device(self.device)
        d["timer"] = "cuda_events" if dev.type == "cuda" else "perf_counter"
        d["sync"] = "cuda.synchronize after each iteration" if dev.type == "cuda" else "none (CPU)"
        d["cudnn_benchmark"] = dev.type == "cuda"
        d["rounds"] = "interleaved (one iteration of each row in turn, rotating start)"
        d["statistic"] = "median (FPS = batch / median seconds)"
        return d


# ------------------------------------------------------------------------------------------- environment


@functools.lru_cache(maxsize=1)
def _git_commit() -> tuple[Optional[str], Optional[bool]]:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None, None


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What the figures depend on beyond the protocol: versions, the device, the host and the code."""
    commit, dirty = _git_commit()
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "host": platform.node(), "python": platform.python_version(),
        "git_commit": commit, "git_dirty": dirty,
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


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


def _profiler_notice(line: str) -> bool:
    if line.startswith("USDT:") and ("profiler_start" in line or "profiler_stop" in line):
        return True
    # a CUDA build of torch on a machine without a GPU driver: Kineto's device query fails, harmlessly
    return "gpuGetDeviceCount failed" in line and not torch.cuda.is_available()


@contextlib.contextmanager
def without_profiler_notices():
    """Kineto (torch's profiler) writes two lines, ``USDT:... profiler_start`` and ``... profiler_stop``, to
    file descriptor 2 from C++ at every profile (KINETO_LOG_LEVEL does not silence them), and, with a CUDA
    build of torch on a machine without a GPU, an "ERROR ... gpuGetDeviceCount failed" line. Inside, fd 2
    goes to a temporary file; afterwards every line of it except those notices is written to the real
    stderr (other warnings and errors are kept, in order)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not _profiler_notice(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def sdpa_kernels_taken(step: Callable[[], object]) -> dict[str, int]:
    """Run ``step`` once under the profiler; SDPA kernel op name -> calls. Empty when none was seen (no
    attention, or a compiler that decomposed it into plain matmuls)."""
    from torch.profiler import ProfilerActivity, profile

    with without_profiler_notices(), profile(activities=[ProfilerActivity.CPU]) as prof:
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
    return [_time_once(step, device) for _ in range(iters)]


def _time_once(step: Callable[[], object], device: torch.device) -> float:
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


# ------------------------------------------------------------------------------------------------ runtimes

# build(model, example_inputs, protocol) -> run(inputs); model on the protocol's device, in eval mode
RunnerBuilder = Callable[[nn.Module, Any, SpeedProtocol], Callable[[Any], object]]


def pytorch_runner(model: nn.Module, example: Any, protocol: SpeedProtocol) -> Callable[[Any], object]:
    """The PyTorch runtime: the model, compiled if the protocol says so, under the protocol's autocast."""
    device = torch.device(protocol.device)
    net = compiled(model, protocol.compile_mode, protocol.freezing) if protocol.compile else model

    def run(inputs):
        with autocast(device, protocol.precision):
            return net(inputs)

    return run


def compiled(model: nn.Module, mode: str = "default", freezing: bool = False) -> Callable[..., Any]:
    """``torch.compile(model)`` in ``mode``; with ``freezing``, inductor's freezing: the parameters become
    constants of the graph, so that autocast's weight casts and the weights' layouts are done once, at compile
    time (on the CPU the linear layers' weights are pre-packed for oneDNN); no-grad inference only, which is
    what the benchmark times.

    Freezing needs inductor's ``freezing`` config while dynamo traces (at the first call), so the returned
    callable sets it around every call; and it compiles through its own backend (:func:`_frozen_inductor`):
    dynamo reuses a compiled graph of the same code whose guards pass, and a graph of the same model compiled
    without freezing (another row in the same process) passes them, so with the config alone a frozen row
    silently ran the unfrozen graph (tests/test_compile_parity.py). A different backend gets its own graphs."""
    if not freezing:
        return torch.compile(model, mode=mode)
    import torch._inductor.config as inductor_config

    net = torch.compile(model, backend=functools.partial(_frozen_inductor, mode=mode))

    def run(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return net(*args, **kwargs)
    return run


def _frozen_inductor(gm, example_inputs, mode: str = "default"):
    """Inductor with ``mode``'s options and freezing (the backend of :func:`compiled` with freezing)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches={**list_mode_options(mode), "freezing": True})


def _onnxruntime_runner(model, example, protocol):
    """ONNX Runtime (study/export/onnx.py): the model exported at the example's size, one session call a
    forward; imported on first use so that onnx and onnxruntime stay optional for everything else."""
    from study.export.onnx import onnxruntime_runner

    return onnxruntime_runner(model, example, protocol)


RUNTIMES: dict[str, RunnerBuilder] = {"pytorch": pytorch_runner, "onnxruntime": _onnxruntime_runner}


def register_runtime(name: str, build: RunnerBuilder) -> None:
    """Make ``bench.runtime=<name>`` (and a ``bench.modes`` entry naming it) time rows through ``build``."""
    RUNTIMES[name] = build


def runtime_builder(name: str) -> RunnerBuilder:
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime '{name}' (bench.runtime or bench.modes); available: "
                        f"{', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def apply_mode(mode: str, protocol: SpeedProtocol) -> SpeedProtocol:
    """``protocol`` changed by one ``bench.modes`` entry: '+'-joined words among eager, compile, fp32, bf16,
    fp16, auto and a runtime name (e.g. ``compile+bf16``, ``onnxruntime``); unnamed settings stay."""
    p = protocol
    for word in (w.strip() for w in mode.split("+")):
        if word == "eager":
            p = replace(p, compile=False, freezing=False)
        elif word == "compile":
            p = replace(p, compile=True)
        elif word == "freeze":
            p = replace(p, compile=True, freezing=True)
        elif word in ("fp32", "bf16", "fp16", "auto"):
            p = replace(p, precision=word)
        elif word in RUNTIMES:
            # ONNX Runtime runs the fp32 export: a mode naming it alone is an fp32 row (a later word may
            # still ask for another precision, which the runner then refuses by name)
            p = replace(p, runtime=word, precision="fp32" if word == "onnxruntime" else p.precision)
        else:
            raise UserError(f"bench.modes entry '{mode}': unknown word '{word}'; use eager, compile, freeze, fp32, "
                            f"bf16, fp16, auto or a runtime ({', '.join(RUNTIMES)}), joined by '+'")
    if p.compile and p.runtime != "pytorch":
        raise UserError(f"bench.modes entry '{mode}': compile applies to the pytorch runtime only")
    if not p.compile:  # freezing (bench.freezing or a 'freeze' word) belongs to the compiled rows only
        p = replace(p, freezing=False)
    return p


# --------------------------------------------------------------------------------------------------- entries


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
    build = runtime_builder(p.runtime)
    if p.scope == "end_to_end":
        if p.runtime != "pytorch":
            raise UserError(f"bench.scope=end_to_end times the PyTorch model inside study/eval's pre- and "
                            f"post-processing; runtime '{p.runtime}' supports bench.scope=model only")
        # run_padded autocasts; compiled as the model scope is (freezing included)
        run_model = compiled(model, p.compile_mode, p.freezing) if p.compile else model
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


# ---------------------------------------------------------------------------------------------------- timing


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
    thread contexts (:func:`time_interleaved` does)."""
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
                times[i].append(_time_once(lambda: e.run(e.inputs), device))
            parts[i].append(s.take() if s is not None else {})
        rounds += 1
    return times, parts


def summarize(times: list[float], batch: int) -> dict:
    """Per-iteration seconds -> the row's statistics (ms) and FPS from the median."""
    ms = 1000 * np.asarray(times, dtype=np.float64)
    median = float(np.median(ms))
    return {"fps": 1000 * batch / median, "ms_median": median, "ms_mean": float(ms.mean()),
            "ms_p5": float(np.percentile(ms, 5)), "ms_p95": float(np.percentile(ms, 95)),
            "ms_std": float(ms.std()), "n_iters": len(ms), "seconds_timed": float(ms.sum() / 1000)}


def _bootstrap_medians(times: list[list[float]], resamples: int, seed: int) -> np.ndarray:
    """(resamples, rows) medians of rounds drawn with replacement (the same rounds for every row)."""
    t = np.asarray(times, dtype=np.float64)  # (rows, rounds)
    idx = np.random.default_rng(seed).integers(0, t.shape[1], size=(resamples, t.shape[1]))
    return np.median(t[:, idx], axis=2).T


def speed_ratios(times: list[list[float]], reference: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> list[dict]:
    """Per row: FPS relative to row ``reference`` (= its median time over the row's) and a bootstrap
    interval (:data:`CI_LEVEL`) from resampled rounds."""
    med = np.median(np.asarray(times, dtype=np.float64), axis=1)
    boot = _bootstrap_medians(times, resamples, seed)
    out = []
    for i in range(len(times)):
        lo, hi = _ratio_interval(boot, i, reference)
        out.append({"ratio": float(med[reference] / med[i]), "ci_low": lo, "ci_high": hi})
    return out


def _ratio_interval(boot: np.ndarray, row: int, over: int) -> tuple[float, float]:
    """The :data:`CI_LEVEL` interval of row ``over``'s median time over row ``row``'s (the speed of ``row``
    relative to ``over``) across the bootstrap resamples."""
    r = boot[:, over] / boot[:, row]
    return (float(np.percentile(r, 100 * (1 - CI_LEVEL) / 2)), float(np.percentile(r, 100 * (1 + CI_LEVEL) / 2)))


def unrankable(times: list[list[float]], labels: list[str], resamples: int = BOOTSTRAP_RESAMPLES,
               seed: int = 0) -> list[tuple[str, str, float, float]]:
    """Pairs of rows whose speed-ratio interval contains 1: (faster-looking, slower-looking, low, high)."""
    boot = _bootstrap_medians(times, resamples, seed)
    med = np.median(np.asarray(times, dtype=np.float64), axis=1)
    pairs = []
    for i in range(len(times)):
        for j in range(i + 1, len(times)):
            a, b = (i, j) if med[i] <= med[j] else (j, i)
            lo, hi = _ratio_interval(boot, a, b)  # > 1 where a is faster
            if lo <= 1.0 <= hi:
                pairs.append((labels[a], labels[b], lo, hi))
    return pairs


def rank_warning(pairs: list[tuple[str, str, float, float]]) -> Optional[str]:
    if not pairs:
        return None
    names = "; ".join(f"{a} vs {b} (ratio interval {lo:.2f}-{hi:.2f})" for a, b, lo, hi in pairs)
    return (f"warning: spread too wide to rank these rows, their {CI_LEVEL:.0%} speed-ratio interval contains "
            f"1: {names}. Time longer (bench.min_time / --min-time) or on a quieter machine.")


def _mean_breakdown(parts: list[dict[str, float]], times: list[float], names: list[str]) -> dict[str, float]:
    n = len(times)
    out = {name: 1000 * sum(p.get(name, 0.0) for p in parts) / n for name in names}
    total = 1000 * sum(times) / n
    out["other"] = total - sum(out.values())
    out["total"] = total
    return out


def _matmul_probes(entries: list[Entry], device: torch.device) -> dict[str, list[MatmulProbe]]:
    """The matmul probes of each precision among the entries with a GFLOPs count (study/bench/limit.py), at
    the first such entry's product shapes, calibrated so that one iteration of all of a precision's probes
    lasts about as long as the median forward of its entries (one untimed forward each, after the warm-up)."""
    single = {i: _time_once(lambda e=e: e.run(e.inputs), device)
              for i, e in enumerate(entries) if e.gflops}
    probes: dict[str, list[MatmulProbe]] = {}
    for i in single:
        prec = entries[i].protocol.precision
        if prec not in probes:
            shapes = entries[i].limit_shapes or [(SQUARE, SQUARE, SQUARE)]
            probes[prec] = [MatmulProbe(prec, shape, device) for shape in shapes]
            window = float(np.median([single[j] for j in single if entries[j].protocol.precision == prec]))
            for pr in probes[prec]:
                pr.calibrate(window / len(shapes), lambda f: _time_once(f, device))
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
    boot = _bootstrap_medians(times, BOOTSTRAP_RESAMPLES, 0) if probes else None
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
                  "ratio_to": entries[reference].label, "attention_kernels": _format_kernels(k),
                  "sdpa_kernels": k, "sdpa_enabled": _sdpa_enabled(device), "protocol": ep.describe()})
        if breakdown:
            if e.components:
                r["breakdown_ms"] = _mean_breakdown(part, t, list(e.components))
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
                    "runtime": ep.runtime, "sdpa_kernel_taken": _format_kernels(k), "threads": threads,
                    "batch": ep.batch}
        results.append(r)
    return results, rank_warning(unrankable(times, [e.label for e in entries]))


def measure_fps(model: nn.Module, img_size: int, protocol: SpeedProtocol) -> dict:
    """Frames per second of one model under ``protocol`` (one entry of :func:`time_interleaved`, no
    breakdown): the statistics, the kernels, the protocol and the environment."""
    (row,), _ = time_interleaved([build_entry("model", model, img_size, protocol)])
    for key in ("mode", "ratio", "ratio_ci", "ratio_to"):
        row.pop(key)
    return row


def component_breakdown(model: nn.Module, img_size: int, protocol: SpeedProtocol) -> dict[str, float]:
    """Milliseconds per forward in each of ``model.components()``, "other" and "total" (the measured
    forward), from the timed iterations themselves (eager: the protocol's compile is not applied)."""
    entry = build_entry("model", model, img_size, replace(protocol, compile=False))
    (row,), _ = time_interleaved([entry], breakdown=True)
    if row["breakdown_ms"] is None:
        raise UserError(f"no time breakdown: {entry.no_breakdown}")
    return row["breakdown_ms"]
