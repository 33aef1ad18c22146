"""The speed protocol's settings: one :class:`SpeedProtocol` per timed row (docs/speed.md states the
protocol in full; every result row records ``SpeedProtocol.describe()`` under ``protocol``).

The paper's H100 figures used FlashAttention-2 through SDPA, default ``torch.compile`` and mixed precision
(docs/paper.md section 8); it is silent on warm-up, timer, timed region and statistic, so the defaults below
are our choices, each a ``bench.*`` key.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch

from study.device import available_cores, resolve_device, resolve_precision
from study.errors import UserError

COMPILE_MODES = ("default", "max-autotune")
SCOPES = ("model", "end_to_end")


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
        if self.scope not in SCOPES:
            raise UserError(f"unknown timing scope '{self.scope}' (bench.scope); choose {' or '.join(SCOPES)}")
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
