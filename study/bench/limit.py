"""The matrix-multiply limit of a timed row: how far a forward is from what the machine's matrix units allow.

For a row of ``G`` GFLOPs (fvcore's count: multiply-adds, study/bench/flops.py) at batch ``B``, the limit is
``2 x G x B / rate`` seconds, ``rate`` being the FLOP/s of one matrix multiply in the row's precision (a
multiply-add is 2 FLOPs of the rate), and the row's ratio is its median forward over that limit: 1.0 would be
a forward that does nothing but multiply-adds at the probe's rate (attention's exponentials, normalisations,
copies and element-wise ops cost time the limit does not count).

How the rate is measured (our protocol; issue 11 asks for the rate "measured in the same run"):
- a probe is one ``F.linear`` (weight transposed, bias added: what the models' linear layers run); two per
  precision among the rows: at the shape of the model's commonest product, its MLP's first layer ((batch x
  tokens) x dim -> 4 dim), and a square 2048 one (8192 on a GPU; a model without a ViT backbone has only
  that one). The limit takes the faster (the stricter limit): at tiny sizes the MLP's product is too small
  for the matrix units' steady rate, at real sizes it was the faster one here;
- the probes are entries of the same interleaved rounds as the rows (study/bench/timing.py ``time_rounds``),
  so that a noisy spell hits them like the rows;
- **one iteration of all the probes of a precision lasts about as long as one forward of its rows**: each
  probe's call is repeated ``repeats`` times, calibrated after the warm-up from the median forward (an equal
  share each: half with two probes, the whole of it for a model with only the square one). ``min_time``
  counts the rows' iterations only. On this shared 2-core VM single calls of a probe are bimodal (about 400
  and about 850 GFLOP/s in bf16 on one thread, in spells of 25-250 ms; most likely the matrix unit shared
  with a co-tenant's sibling thread): a median over single 2.5 ms calls lands in one mode or the other from
  run to run, while a 700 ms forward averages over both. A window a few hundred ms long averages over the
  same mixture; what it cannot remove is a run spent mostly in one mode (the README's runs: bf16 probe 330
  to 980 GFLOP/s), which moves every bf16 ratio with it;
- the ratio's interval resamples whole rounds (the row's and the probe's iteration of one round stay
  paired), as the speed ratios do (``stats.CI_LEVEL``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from study.device import dtype_of

SQUARE = 2048  # the square probe on the CPU: (n x n) @ (n x n), 8 MiB per operand in bf16
# On a GPU a 2048 product lasts about 20 us, near the launch overhead: the square probe there is 8192 (about
# 1.1 TFLOP a call), long enough for the tensor cores' steady rate (our choice; not yet run on a GPU).
SQUARE_CUDA = 8192
CALIBRATION_CALLS = 5  # single probe calls timed to size the window (their median)


def vit_tokens(model: nn.Module, img_size: int) -> Optional[int]:
    """Tokens of the first blocks of the model's ViT at this input: prefix (CLS, registers) and patch tokens
    (EoMT adds its queries later); None for a model without a ViT backbone (``backbone.embed_dim``,
    ``patch_size``, ``num_prefix_tokens``)."""
    bb = getattr(model, "backbone", None)
    if bb is None or not all(hasattr(bb, k) for k in ("embed_dim", "patch_size", "num_prefix_tokens")):
        return None
    return bb.num_prefix_tokens + (img_size // bb.patch_size) ** 2


def probe_shapes(model: nn.Module, img_size: int, batch: int = 1, device: str = "cpu"
                 ) -> list[tuple[int, int, int]]:
    """(rows, inner, out) of the probes: the model's MLP first layer at this input, (batch x tokens) x dim x 4 dim,
    where the model has a ViT backbone (:func:`vit_tokens`), and the square product (:data:`SQUARE`,
    :data:`SQUARE_CUDA` on a GPU)."""
    n = SQUARE_CUDA if torch.device(device).type == "cuda" else SQUARE
    tokens = vit_tokens(model, img_size)
    if tokens is None:
        return [(n, n, n)]
    dim = model.backbone.embed_dim
    return [(batch * tokens, dim, 4 * dim), (n, n, n)]


@dataclass
class MatmulProbe:
    """One linear layer's product in one precision on one device; ``run`` is one timed iteration of the
    interleaved rounds (``repeats`` calls)."""
    precision: str  # resolved: fp32, bf16 or fp16
    shape: tuple[int, int, int]
    device: torch.device
    repeats: int = 1

    def __post_init__(self):
        n, k, m = self.shape
        g = torch.Generator().manual_seed(0)
        dtype = dtype_of(self.precision)
        self._x = torch.randn(n, k, generator=g).to(self.device, dtype)
        self._w = torch.randn(m, k, generator=g).to(self.device, dtype)
        self._b = torch.randn(m, generator=g).to(self.device, dtype)

    @property
    def label(self) -> str:
        n, k, m = self.shape
        return f"matmul probe {self.precision} {n}x{k}x{m}"

    @property
    def flops_per_call(self) -> float:
        n, k, m = self.shape
        return 2.0 * n * k * m

    def call(self) -> torch.Tensor:
        return F.linear(self._x, self._w, self._b)

    def run(self, _inputs=None) -> None:
        for _ in range(self.repeats):
            self.call()

    def calibrate(self, seconds: float, time_once) -> int:
        """Set ``repeats`` so that one iteration lasts about ``seconds`` (``time_once(step)`` times one call of
        ``step``, with the device's synchronisation); returns it."""
        single = float(np.median([time_once(self.call) for _ in range(CALIBRATION_CALLS)]))
        self.repeats = max(1, int(round(seconds / max(single, 1e-9))))
        return self.repeats


def limit_fields(row_times: list[float], probes: list[tuple["MatmulProbe", list[float], int]], gflops: float,
                 batch: int, boot: Optional[np.ndarray] = None, row: int = 0, ci_level: float = 0.95) -> dict:
    """A row's limit figures from its per-iteration seconds and its precision's probes (the same rounds):
    ``probes`` holds (probe, its per-iteration seconds, its row in ``boot``). The limit takes the faster probe
    (the stricter limit): its rate (GFLOP/s, from its median iteration; p5-p95 of its iterations), the limit
    (ms) and the ratio median forward / limit, with its interval from ``boot`` (bootstrap medians, (resamples,
    rows); ``row`` is the row's) when given. A ratio below 1 means the row's own products ran faster than both
    probes: the limit is then overstated, and ``limit_note`` says so."""
    def rate_of(item):
        probe, times, _ = item
        return probe.flops_per_call * probe.repeats / float(np.median(times))

    probe, probe_times, probe_row = max(probes, key=rate_of)
    per_iter = probe.flops_per_call * probe.repeats
    probe_s = np.asarray(probe_times, dtype=np.float64)
    rate = rate_of((probe, probe_times, probe_row))
    work = 2.0 * gflops * 1e9 * batch  # FLOPs of one forward (fvcore's multiply-adds x 2)
    limit_s = work / rate
    ratio = float(np.median(row_times)) / limit_s
    out = {"limit_ms": 1000 * limit_s, "limit_ratio": ratio,
           "limit_rate_gflops": rate / 1e9,
           "limit_rate_p5_p95": [per_iter / float(np.percentile(probe_s, 95)) / 1e9,
                                 per_iter / float(np.percentile(probe_s, 5)) / 1e9],
           "limit_probe": f"{probe.label}, {probe.repeats} call{'s' if probe.repeats != 1 else ''} per iteration",
           "limit_probes_gflops": {p.label: rate_of((p, t, j)) / 1e9 for p, t, j in probes}}
    if boot is not None:
        r = boot[:, row] / boot[:, probe_row] * per_iter / work  # row time / limit, per resample
        out["limit_ratio_ci"] = [float(np.percentile(r, 100 * (1 - ci_level) / 2)),
                                 float(np.percentile(r, 100 * (1 + ci_level) / 2))]
    if ratio < 1:
        out["limit_note"] = ("below 1: this row's own products ran faster than the probes, so the limit is "
                             "overstated (a probe shape unlike the row's products, or a probe in a slow spell)")
    return out
