"""Benchmark section of the configuration (docs/paper.md section 8: how the paper measured)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class BenchConfig:
    # Table rows to measure; every name must be in the variant registry.
    variants: list[str] = field(default_factory=lambda: ["eomt", "eomt_masked"])
    sizes: list[str] = field(default_factory=lambda: ["S", "B", "L", "g"])
    img_size: int = 640
    fps: bool = True  # measure speed (off: parameters and GFLOPs only)
    device: str = "auto"  # auto = cuda if available, else cpu
    # The paper: mixed precision on the H100. "auto" = bf16 on CUDA, fp32 on the CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # the paper used default torch.compile on the GPU
    warmup: int = 3  # paper silent; our protocol: untimed iterations first (more on GPU, see speed.py)
    iters: int = 10  # timed iterations; FPS = iters / total time
    scope: Literal["model", "end_to_end"] = "model"  # what the timed region holds
    breakdown: bool = True  # per-component time breakdown
