"""Prediction parts shared by EoMT and the simple feature pyramid: the upscaling block and the mask MLP."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ScaleBlock(nn.Module):
    """[2x2 (transposed) conv stride 2 -> GELU -> depthwise 3x3 conv (no bias) -> LayerNorm2d]
    (docs/paper.md section 5). ``down=True`` uses a strided conv instead (the pyramid's 1/32 level)."""

    def __init__(self, dim: int, down: bool = False):
        super().__init__()
        conv = nn.Conv2d if down else nn.ConvTranspose2d
        self.conv1 = conv(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.act(self.conv1(x))))


def num_upscale_blocks(patch_size: int) -> int:
    """Blocks needed to go from 1/patch to 1/4: 2 for patch 16 (docs/paper.md section 5)."""
    return max(1, int(math.log2(patch_size)) - 2)


def mask_mlp(dim: int) -> nn.Sequential:
    """The 3-layer mask MLP: Linear -> GELU -> Linear -> GELU -> Linear (docs/paper.md section 5)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
