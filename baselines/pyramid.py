"""The ViTDet-style simple feature pyramid that replaces ViT-Adapter from Table 1 row 1 on.

From the last ViT map F16 (after the ViT's final LayerNorm), each scale is built on its own with EoMT's
upscaling block (docs/paper.md section 2, step 1; docs/baseline.md "ViTDet-style simple feature pyramid"):
F4 = two [ConvTranspose2d 2x2 s2 -> GELU -> depthwise 3x3 -> LayerNorm2d] blocks, F8 = one, F16 = the ViT map as
is, F32 = one strided [Conv2d 2x2 s2 -> GELU -> depthwise 3x3 -> LayerNorm2d] block. Row 3 keeps only F4 (for the
mask logits) and F16.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from study.models.heads import ScaleBlock


class SimpleFeaturePyramid(nn.Module):
    """Maps at the requested strides (a subset of 4, 8, 16, 32 containing 4 and the patch size) from F16.

    Args:
        dim: ViT width D (every level keeps it).
        patch_size: the ViT's patch size: the stride of the map the pyramid starts from.
        strides: output strides, finest first (e.g. (4, 8, 16, 32), or (4, 16) for row 3).
    """

    def __init__(self, dim: int, patch_size: int, strides: Sequence[int]):
        super().__init__()
        self.strides = tuple(strides)
        self.levels = nn.ModuleDict()
        for s in self.strides:
            steps = math.log2(patch_size / s)
            if steps != int(steps):
                raise ValueError(f"pyramid stride {s} cannot be reached from patch size {patch_size} by 2x steps")
            steps = int(steps)
            # steps > 0: upscale that many times; 0: identity; < 0: strided blocks
            blocks = [ScaleBlock(dim) for _ in range(steps)] + [ScaleBlock(dim, down=True) for _ in range(-steps)]
            self.levels[str(s)] = nn.Sequential(*blocks)

    def forward(self, f16: torch.Tensor) -> list[torch.Tensor]:
        """The ViT's normalised patch map (B, D, H/p, W/p) -> [(B, D, H/s, W/s) for s in strides]."""
        return [self.levels[str(s)](f16) for s in self.strides]
