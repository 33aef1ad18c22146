"""Device and precision choices, in one place for training, evaluation and benchmarks.

The paper trains and measures in mixed precision on GPUs (docs/paper.md sections 6 and 8). Here: "auto" picks
CUDA when present, else the CPU; on CUDA "auto" precision is bf16 autocast, on the CPU fp32 (bf16 autocast
on the CPU is possible but slower than fp32 on most CPUs, and no number of the paper was measured there).
"""
from __future__ import annotations

import contextlib

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' was asked for, but CUDA is not available on this machine")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision '{precision}'; choose auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs CUDA; use bf16 or fp32 on the CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision ("fp32" = no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
