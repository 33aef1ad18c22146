"""Benchmark section of the configuration (docs/paper.md section 8: how the paper measured).

``bench.img_size`` replaces ``model.img_size`` for ``study bench`` only; how the input sizes relate is said
once, in study/config.py. ``bench.variants`` is checked against the variant registry when the config is
loaded (study/config.py), the rest here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Literal, Optional, get_args

from study.models.config import SizeName

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


@dataclass
class BenchConfig:
    # Table rows to measure; every name must be in the variant registry (`study bench --list`).
    variants: list[str] = field(default_factory=lambda: ["eomt", "eomt_masked"])
    sizes: list[str] = field(default_factory=lambda: ["S", "B", "L", "g"])
    img_size: int = 640  # docs/paper.md section 6: COCO 640
    fps: bool = True  # measure speed (off: parameters and GFLOPs only)
    # GFLOPs counter (study/bench/flops.py): "fast" runs the forward on FakeTensors (seconds, no arithmetic),
    # "fvcore" traces a real forward with fvcore (the reference, minutes at ViT-g 1280); the same numbers.
    counter: Literal["fast", "fvcore"] = "fast"
    device: str = "auto"  # auto = cuda if available, else cpu; or cpu, cuda, cuda:1, ...
    # The paper: mixed precision on the H100. "auto" = bf16 on CUDA, fp32 on the CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # the paper used default torch.compile on the GPU
    compile_mode: Literal["default", "max-autotune"] = "default"  # torch.compile's mode (paper: default)
    # Compiled rows with inductor's freezing (parameters folded into the graph as constants, inference only; the
    # CPU deployment setting: weights pre-packed once). The paper is silent; off by default. Mode word "freeze".
    freezing: bool = False
    # The protocol (docs/speed.md; study/bench/protocol.py), where the paper is silent: the rows of one size are timed in
    # interleaved rounds; FPS from the median iteration.
    warmup: int = 3  # untimed rounds first
    iters: int = 10  # timed rounds at least
    min_time: float = 0.0  # and more rounds until each row has this many seconds of timed iterations
    batch: int = 1  # images per forward (the paper: 1 in Table 1; Table 9 also reports 32)
    threads: Optional[int] = None  # CPU threads for the measurement; None = every core this process may use
    scope: Literal["model", "end_to_end"] = "model"  # what the timed region holds
    breakdown: bool = True  # per-component time breakdown, from the same timed iterations (eager rows)
    # Each timed row's ratio to its matrix-multiply limit (study/bench/limit.py): two matmul probes per
    # precision are timed in the same rounds (issue 11's "x limit" column; our protocol, the paper reports no such figure)
    limit: bool = True
    # How the model runs: "pytorch" (eager or compiled), or a runtime registered in study/bench/runtimes.py
    runtime: str = "pytorch"
    # Several settings of each row timed side by side in the same rounds: '+'-joined words among eager,
    # compile, freeze (compile with freezing), fp32, bf16, fp16, auto and a runtime name (e.g. [eager, compile,
    # bf16, freeze+bf16]); empty = one row per variant with the settings above.
    modes: list[str] = field(default_factory=list)
    # The row the speed ratios are relative to: a variant name (its first mode), or "variant:mode";
    # None = the first row of each size (Table 1 compares to row 0).
    reference: Optional[str] = None

    def validate(self) -> None:
        # Messages start with the field at fault (study/config.py names its key and source from that).
        if not self.variants:
            raise ValueError("variants is empty: name at least one variant (`study bench --list`)")
        if not self.sizes:
            raise ValueError("sizes is empty: name at least one of tiny, S, B, L, g")
        bad = [s for s in self.sizes if s not in get_args(SizeName)]
        if bad:
            raise ValueError(f"sizes: unknown model size '{bad[0]}'; choose from {', '.join(get_args(SizeName))}")
        for name in ("variants", "sizes"):
            seen = getattr(self, name)
            if len(set(seen)) != len(seen):
                raise ValueError(f"{name} {seen} names an entry twice")
        if self.img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {self.img_size}")
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device '{self.device}' is not auto, cpu, cuda or cuda:N")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        if self.min_time < 0:
            raise ValueError(f"min_time must be >= 0 seconds, got {self.min_time}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or null for every core), got {self.threads}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes {self.modes} names an entry twice")
        if self.reference is not None:
            variant = self.reference.split(":", 1)[0]
            if variant not in self.variants:
                raise ValueError(f"reference '{self.reference}' names no variant of bench.variants {self.variants}")


# Keys of the bench section that only `study bench` reads (which rows, at what size, which modes beside each
# other, the ratios' reference row, the matmul limit column); every other key is a timing setting of the
# launcher's bench step (it measures the run's own model at model.img_size, one mode, no limit column).
STUDY_BENCH_ONLY = ("variants", "sizes", "img_size", "modes", "reference", "limit")


def timing_settings() -> tuple[str, ...]:
    """The settings a run's recorded benchmark depends on: every field of :class:`BenchConfig` but
    ``STUDY_BENCH_ONLY``, so that a setting added here is part of it with no other file touched
    (study/runs.py compares them to decide whether a relaunch re-runs the bench step)."""
    return tuple(f.name for f in fields(BenchConfig) if f.name not in STUDY_BENCH_ONLY)
