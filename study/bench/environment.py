"""What a speed figure depends on beyond the protocol (docs/speed.md): versions, the device and host, the code's
commit and the load, and the SDPA kernels one profiled forward actually ran beside the ones enabled."""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch


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


def sdpa_enabled(device: torch.device) -> str:
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


def format_kernels(calls: dict[str, int]) -> str:
    if not calls:
        return "no SDPA kernel seen"
    return ", ".join(f"{name.removeprefix('aten::')} x{n}" for name, n in calls.items())
