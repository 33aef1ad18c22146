"""Mask2Former's multi-scale deformable-attention pixel decoder (Table 1 rows 0-1), and what replaces it (rows 2-3).

Pixel decoder (docs/baseline.md "Mask2Former pixel decoder"; numerically the same as Hugging Face's
``Mask2FormerPixelDecoder``, see tests/test_baselines_hf.py): the 1/8, 1/16, 1/32 maps are projected to 256
(1x1 conv + GroupNorm(32)), given a sine position embedding plus a learned level embedding, and refined by 6
post-norm deformable encoder layers; the 1/4 level is a lateral 1x1 conv + GN of the 1/4 input plus the
encoder's 1/8 output upsampled, then 3x3 conv + GN + ReLU; mask features = 1x1 conv of it.

Without the pixel decoder (row 2 on), the decoder reads the neck's maps through 1x1 convs to 256 (the input
projections of Mask2Former's Transformer module) and the mask features are F4 through a 1x1 conv.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from baselines.deform_attn import MSDeformAttn, reference_points


def sine_position_embedding(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """DETR's normalised sine embedding, (1, h*w, dim): dim/2 channels for y then dim/2 for x, each pair
    (sin, cos) of position * 2pi / 10000^(2i/(dim/2)) with positions 1..n divided by n."""
    half = dim // 2
    y = torch.arange(1, h + 1, device=device, dtype=dtype) / (h + 1e-6) * 2 * math.pi
    x = torch.arange(1, w + 1, device=device, dtype=dtype) / (w + 1e-6) * 2 * math.pi
    freq = 10000 ** (2 * torch.div(torch.arange(half, device=device), 2, rounding_mode="floor").to(dtype) / half)

    def encode(p):  # (n,) -> (n, half): sin on even channels, cos on odd
        a = p[:, None] / freq
        return torch.stack([a[:, 0::2].sin(), a[:, 1::2].cos()], dim=2).flatten(1)

    pos_y = encode(y)[:, None].expand(h, w, half)
    pos_x = encode(x)[None].expand(h, w, half)
    return torch.cat([pos_y, pos_x], dim=2).reshape(1, h * w, dim)


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """Detectron2's init of Mask2Former's convolutions: kaiming-uniform (a=1), zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class EncoderLayer(nn.Module):
    """Post-norm: x = LN(x + MSDeformAttn(x + pos, values x)); x = LN(x + FFN_relu(x))."""

    def __init__(self, dim: int, heads: int, points: int, ffn: int, levels: int, compiled: bool):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, heads, levels, points, 1.0, compiled)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x, pos, ref, shapes):
        x = self.norm1(x + self.self_attn(x + pos, ref, x, shapes))
        return self.norm2(x + self.fc2(F.relu(self.fc1(x))))


class PixelDecoder(nn.Module):
    """Args: in_dim (width of the neck's maps), dim (256), layers/heads/points/ffn of the deformable encoder."""

    def __init__(self, in_dim: int, dim: int, layers: int, heads: int, points: int, ffn: int, compiled: bool = False):
        super().__init__()
        self.strides = (32, 16, 8)  # the encoder's levels, coarse to fine (as Mask2Former orders them)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_dim, dim, 1), nn.GroupNorm(32, dim)) for _ in self.strides)
        self.level_embed = nn.Parameter(torch.zeros(len(self.strides), dim))
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, points, ffn, len(self.strides), compiled)
                                    for _ in range(layers))
        self.lateral = nn.Sequential(nn.Conv2d(in_dim, dim, 1, bias=False), nn.GroupNorm(32, dim))
        self.output = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.GroupNorm(32, dim), nn.ReLU())
        self.mask_proj = nn.Conv2d(dim, dim, 1)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Mask2Former's: input projections xavier, encoder matrices xavier then the deformable attention's
        own init, level embedding normal, FPN and mask convolutions c2_xavier_fill."""
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.layers.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        for conv in (self.lateral[0], self.output[0], self.mask_proj):
            c2_xavier_fill(conv)

    def forward(self, feats: dict[int, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """feats {stride: (B, in_dim, H/s, W/s)} with strides 4, 8, 16, 32 ->
        mask features (B, dim, H/4, W/4) and the refined maps [1/32, 1/16, 1/8], each (B, dim, h, w)."""
        maps = [proj(feats[s]) for proj, s in zip(self.input_proj, self.strides)]
        shapes = [tuple(m.shape[-2:]) for m in maps]
        x = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)  # (B, S, dim)
        pos = torch.cat([sine_position_embedding(h, w, x.shape[-1], x.device, x.dtype) + e
                         for (h, w), e in zip(shapes, self.level_embed)], dim=1)  # (1, S, dim)
        ref = reference_points(shapes, x.device).to(x.dtype)  # (1, S, 1, 2)
        for layer in self.layers:
            x = layer(x, pos, ref, shapes)
        b, _, d = x.shape
        outs = [t.transpose(1, 2).reshape(b, d, h, w)
                for t, (h, w) in zip(x.split([h * w for h, w in shapes], dim=1), shapes)]
        f4 = self.lateral(feats[4])
        f4 = self.output(f4 + F.interpolate(outs[-1], size=f4.shape[-2:], mode="bilinear", align_corners=False))
        return self.mask_proj(f4), outs


class LevelProjection(nn.Module):
    """Rows 2-3: no pixel decoder. 1x1 convs take the neck's maps to the decoder width.

    Args:
        in_dim: the neck's width D.
        dim: decoder width (256).
        strides: the levels the decoder attends to, in round-robin order ((32, 16, 8), or (16,) for row 3).
    """

    def __init__(self, in_dim: int, dim: int, strides: Sequence[int]):
        super().__init__()
        self.strides = tuple(strides)
        self.input_proj = nn.ModuleList(nn.Conv2d(in_dim, dim, 1) for _ in self.strides)
        self.mask_proj = nn.Conv2d(in_dim, dim, 1)
        with torch.no_grad():
            for conv in self.input_proj:
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)
            c2_xavier_fill(self.mask_proj)

    def forward(self, feats: dict[int, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """feats {stride: (B, in_dim, H/s, W/s)} -> mask features (B, dim, H/4, W/4), [maps to attend]."""
        return self.mask_proj(feats[4]), [proj(feats[s]) for proj, s in zip(self.input_proj, self.strides)]
