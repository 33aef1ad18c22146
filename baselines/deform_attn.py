"""Multi-scale deformable attention (Deformable DETR), used by ViT-Adapter and the Mask2Former pixel decoder.

Each query predicts, per head, level and point, a sampling offset and an attention weight; the value maps are
sampled bilinearly at reference point + offset / (W, H) and summed with the weights (docs/baseline.md
"Multi-scale deformable attention"). Two kernels compute the same thing:

- the PyTorch form (default): one ``F.grid_sample`` per level (zeros padding, align_corners False). Exact,
  differentiable, runs on every device;
- the compiled op of the optional ``torch-ms-deform-attn`` package (``use_compiled_deform_attn``). Asked for
  and not installed = an ImportError saying how to install it; there is no silent fallback.

Both run in float32 even under autocast, as the reference kernel does (it casts its inputs to float32).

FLOPs (fvcore convention, one multiply-add = one FLOP; see :func:`flop_handles`): the linear projections
are counted by fvcore itself. The sampling is counted per sampled value (one channel of one head at one
point of one level for one query): 4 multiply-adds for the bilinear interpolation of the 4 neighbours plus
1 for the attention-weighted sum, 5 in all.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def compiled_op():
    """The compiled kernel, or an ImportError that says what to install."""
    try:
        from torch_ms_deform_attn import ms_deform_attn
    except ImportError as e:
        raise ImportError(
            "model.baseline.use_compiled_deform_attn is true but the compiled deformable attention is not "
            "installed: pip install torch-ms-deform-attn (or eomt-study[deform]), or set it to false to use "
            f"the PyTorch form ({e})") from None
    return ms_deform_attn


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def shape_constant(kind: str, shapes: Sequence[tuple[int, int]], dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """A per-shape constant, built from Python values once per (kind, shapes, dtype, device) and cached, so a
    forward never copies host data to the device: ``"wh"`` (L, 2) the levels' (W, H) that normalise the
    offsets, ``"shapes"`` (L, 2) long (H, W) and ``"starts"`` (L,) long, the compiled kernel's level table.
    Under ``torch.compile`` the tensor is built in the graph (a constant there) instead of read from the cache.
    """
    if torch.compiler.is_compiling():
        return _shape_tensor(kind, shapes, dtype, device)
    key = (kind, tuple(map(tuple, shapes)), dtype, torch.device(device))
    t = _CONSTANTS.get(key)
    if t is None:
        with torch.inference_mode(False):  # a normal tensor, usable by autograd even if first built in eval
            t = _CONSTANTS[key] = _shape_tensor(kind, shapes, dtype, device)
    return t


def _shape_tensor(kind: str, shapes, dtype, device) -> torch.Tensor:
    if kind == "wh":
        return torch.tensor([(w, h) for h, w in shapes], dtype=dtype, device=device)
    if kind == "shapes":
        return torch.tensor([(h, w) for h, w in shapes], dtype=torch.long, device=device)
    if kind == "starts":
        sizes = [h * w for h, w in shapes]
        return torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.long, device=device)
    raise KeyError(kind)


def deform_attn_core(value: torch.Tensor, shapes: Sequence[tuple[int, int]], locations: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """The sampling and weighted sum in plain PyTorch.

    value (N, S, M, d) over the levels' flattened maps; shapes [(H_l, W_l)]; locations (N, Lq, M, L, P, 2)
    as (x, y) in [0, 1]; weights (N, Lq, M, L, P). Returns (N, Lq, M * d).
    """
    n, _, heads, d = value.shape
    _, lq, _, levels, points, _ = locations.shape
    grids = 2 * locations - 1  # grid_sample's [-1, 1] (align_corners False)
    out = None
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        # (N, h*w, M, d) -> (N*M, d, h, w)
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(n * heads, d, h, w)
        start += h * w
        # all samples of a head in one row of the output grid: (N*M, 1, Lq*P, 2). Same numbers as an (Lq, P) grid,
        # about 20% faster on the CPU (the kernel vectorises along the output width).
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(n * heads, 1, lq * points, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled = sampled.view(n * heads, d, lq, points)
        wl = weights[:, :, :, lvl].transpose(1, 2).reshape(n * heads, 1, lq, points)
        term = (sampled * wl).sum(-1)  # (N*M, d, Lq)
        out = term if out is None else out + term
    return out.view(n, heads * d, lq).transpose(1, 2)


def deform_attn(value: torch.Tensor, shapes: Sequence[tuple[int, int]], locations: torch.Tensor,
                weights: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """Dispatch to the chosen kernel, in float32 even under autocast (float64 stays float64).
    Returns (N, Lq, M * d)."""
    device = value.device.type
    with torch.autocast(device, enabled=False):
        dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        value, locations, weights = value.to(dtype), locations.to(dtype), weights.to(dtype)
        if not compiled:
            return deform_attn_core(value, shapes, locations, weights)
        shape_t = shape_constant("shapes", shapes, torch.long, value.device)
        starts = shape_constant("starts", shapes, torch.long, value.device)
        return compiled_op()(value, shape_t, starts, locations, weights, 64)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the reference initialisation.

    Args:
        dim: query and value width.
        heads: attention heads.
        levels: value levels.
        points: sampling points per head and level.
        ratio: the value width is ``int(dim * ratio)`` (ViT-Adapter's ``deform_ratio``; 1 in the pixel decoder).
        compiled: use the compiled kernel (see :func:`compiled_op`).
    """

    def __init__(self, dim: int, heads: int, levels: int, points: int, ratio: float = 1.0, compiled: bool = False):
        super().__init__()
        inner = int(dim * ratio)
        if inner % heads:
            raise ValueError(f"deformable attention width {inner} is not divisible by {heads} heads")
        self.heads, self.levels, self.points, self.compiled = heads, levels, points, compiled
        if compiled:
            compiled_op()  # fail at construction, not at the first forward
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, inner)
        self.output_proj = nn.Linear(inner, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Offsets start as a ring of head directions (largest coordinate 1) scaled by point index 1..P;
        attention weights at zero (uniform softmax); value and output projections xavier (docs/baseline.md)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        ring = torch.stack([theta.cos(), theta.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True).values  # (M, 2)
        scale = torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = ring.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1) * scale
        self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor,
                shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """query (N, Lq, D); reference (N or 1, Lq, 1 or L, 2) as (x, y) in [0, 1]; value (N, S, D) over the
        levels of ``shapes`` [(H, W)], flattened and concatenated. Returns (N, Lq, D)."""
        n, lq, _ = query.shape
        v = self.value_proj(value).view(n, value.shape[1], self.heads, -1)  # (N, S, M, d)
        offsets = self.sampling_offsets(query).view(n, lq, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(n, lq, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).view(n, lq, self.heads, self.levels, self.points)
        normaliser = shape_constant("wh", shapes, query.dtype, query.device)  # (L, 2), cached
        locations = reference[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        out = deform_attn(v, shapes, locations, weights, self.compiled)  # (N, Lq, M*d), float32 or float64
        return self.output_proj(out.to(self.output_proj.weight.dtype))  # autocast (if on) narrows it again


def reference_points(shapes: Sequence[tuple[int, int]], device=None) -> torch.Tensor:
    """Cell centres of every level, normalised to [0, 1]: (1, sum H*W, 1, 2) as (x, y)."""
    refs = []
    for h, w in shapes:
        y, x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=device) / h,
                              torch.linspace(0.5, w - 0.5, w, device=device) / w, indexing="ij")
        refs.append(torch.stack([x.reshape(-1), y.reshape(-1)], -1))
    return torch.cat(refs)[None, :, None]


# ---------------------------------------------------------------------------------------------- FLOP handlers


def grid_sampler_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::grid_sampler`` inside :func:`deform_attn_core`.

    Output (N*M, d, 1, Lq*P): one sampled value per element. Counted: 4 multiply-adds for bilinear
    interpolation (fvcore's own default for this op) + 1 for the attention-weighted sum that follows it
    (an element-wise mul and sum, which fvcore would not count) = 5 per element.
    """
    from fvcore.nn.jit_handles import get_shape

    return 5 * math.prod(get_shape(outputs[0]))


def compiled_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for the compiled op ``torch_ms_deform_attn::forward``: the same count as the PyTorch
    form, 5 multiply-adds per sampled value: N * Lq * M * L * P * d * (4 + 1)."""
    from fvcore.nn.jit_handles import get_shape

    n, _, heads, d = get_shape(inputs[0])
    _, lq, _, levels, points, _ = get_shape(inputs[3])
    return 5 * n * lq * heads * levels * points * d


def flop_handles() -> dict:
    """Handles for fvcore's ``set_op_handle``: both kernels of the deformable attention."""
    return {"aten::grid_sampler": grid_sampler_flop_jit, "torch_ms_deform_attn::forward": compiled_flop_jit}
