"""ViT-Adapter (Chen et al., ICLR 2023) around a plain ViT: Table 1 row 0's multi-scale features.

In the order of the figure (docs/baseline.md "ViT-Adapter"): a spatial prior module (a small CNN on the image) gives
maps at 1/4, 1/8, 1/16, 1/32; the 1/8-1/32 maps are flattened into the adapter tokens c. For each interaction
[a, b] the injector writes c into the ViT tokens x with deformable attention, ViT blocks a..b run, and the
extractor reads x back into c (deformable attention + ConvFFN); the last interaction has extra extractors.
Finally c is split back into maps, the 1/4 map is rebuilt, the ViT outputs of the four interactions are added
at 4x, 2x, 1x and 0.5x, and each level is normalised.

The ViT is used only through :class:`study.models.backbone.ViTBackbone`. Its prefix tokens (CLS, registers)
run through the blocks untouched by the adapter; only patch tokens are injected into and read.

Norm (our choice, configurable): the reference's SyncBatchNorm fails on one device. ``"batch"`` builds
BatchNorm2d, which behaves as the reference on one device; under DDP convert it with
:func:`convert_sync_batchnorm` (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``) so that the statistics are
synchronised as in the reference. ``"group"`` builds GroupNorm(32), batch-independent everywhere.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from baselines.deform_attn import MSDeformAttn, reference_points
from study.models.backbone import ViTBackbone


def make_norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(32, channels)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """For DDP training: the adapter's BatchNorm2d become SyncBatchNorm (the reference's norm)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _conv_bn_relu(cin: int, cout: int, stride: int, norm: str) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), make_norm(norm, cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Stem (3 convs, max-pool) to 1/4 with ``inplane`` channels, then strided convs to 1/8 (2x), 1/16 (4x),
    1/32 (4x); 1x1 convs project each map to the ViT width D."""

    def __init__(self, inplane: int, dim: int, norm: str):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, inplane, 2, norm), *_conv_bn_relu(inplane, inplane, 1, norm),
                                  *_conv_bn_relu(inplane, inplane, 1, norm), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplane, 2 * inplane, 2, norm))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplane, 4 * inplane, 2, norm))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplane, 4 * inplane, 2, norm))
        self.fc = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in (inplane, 2 * inplane, 4 * inplane, 4 * inplane))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images (B, 3, H, W) -> [(B, D, H/4, W/4), (B, D, H/8, W/8), (.., H/16), (.., H/32)]."""
        c1 = self.stem(images)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [fc(c) for fc, c in zip(self.fc, (c1, c2, c3, c4))]


class ConvFFN(nn.Module):
    """Linear(D, D * ratio) -> depthwise 3x3 conv on each level's map -> GELU -> Linear back to D."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, c: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        h = self.fc1(c)  # (B, N, hidden), N = sum of the levels' h*w
        maps = h.split([a * b for a, b in shapes], dim=1)
        h = torch.cat([self.dwconv(m.transpose(1, 2).unflatten(2, s)).flatten(2) for m, s in zip(maps, shapes)],
                      dim=2).transpose(1, 2)
        return self.fc2(self.act(h))


class Injector(nn.Module):
    """x = x + gamma * MSDeformAttn(LN(x) as queries, LN(c) as values over the 3 adapter levels)."""

    def __init__(self, dim: int, heads: int, points: int, ratio: float, init_values: float, compiled: bool):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, heads, 3, points, ratio, compiled)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x, ref, c, c_shapes):
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), c_shapes)


class Extractor(nn.Module):
    """c = c + MSDeformAttn(LN(c) as queries, LN(x) as one value level at 1/16); c = c + ConvFFN(LN(c))."""

    def __init__(self, dim: int, heads: int, points: int, ratio: float, cffn_ratio: float, compiled: bool):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, heads, 1, points, ratio, compiled)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ConvFFN(dim, cffn_ratio)

    def forward(self, c, ref, x, x_shape, c_shapes):
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), [x_shape])
        return c + self.ffn(self.ffn_norm(c), c_shapes)


class Interaction(nn.Module):
    """One injector and one extractor (plus ``extra`` extractors in the last interaction)."""

    def __init__(self, dim, heads, points, ratio, cffn_ratio, init_values, extra: int, compiled: bool):
        super().__init__()
        self.injector = Injector(dim, heads, points, ratio, init_values, compiled)
        self.extractor = Extractor(dim, heads, points, ratio, cffn_ratio, compiled)
        self.extra_extractors = nn.ModuleList(
            Extractor(dim, heads, points, ratio, cffn_ratio, compiled) for _ in range(extra))


class ViTAdapter(nn.Module):
    """The ViT plus the adapter; returns four maps of width D at 1/4, 1/8, 1/16, 1/32.

    Args:
        backbone: the ViT (patch 16 lines up with the spatial prior grid; other patch sizes are resized).
        interaction_indexes: [first, last] block of each interaction, covering all blocks in order.
        heads, ratio, points: the deformable attention's heads, value-width ratio and points.
        cffn_ratio: ConvFFN hidden width / D.
        conv_inplane: spatial prior module width.
        extra_extractors: extractors added to the last interaction.
        init_values: the injectors' initial gamma.
        norm: "batch" or "group" (see the module docstring).
        compiled: use the compiled deformable attention.
    """

    def __init__(self, backbone: ViTBackbone, interaction_indexes, heads: int, ratio: float, points: int,
                 cffn_ratio: float, conv_inplane: int, extra_extractors: int, init_values: float, norm: str,
                 compiled: bool = False):
        super().__init__()
        dim = backbone.embed_dim
        self.interaction_indexes = [tuple(p) for p in interaction_indexes]
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPriorModule(conv_inplane, dim, norm)
        n = len(self.interaction_indexes)
        self.interactions = nn.ModuleList(
            Interaction(dim, heads, points, ratio, cffn_ratio, init_values, extra_extractors if i == n - 1 else 0,
                        compiled) for i in range(n))
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norms = nn.ModuleList(make_norm(norm, dim) for _ in range(4))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """ViT-Adapter's initialisation: linears trunc-normal 0.02, convs He-normal on fan-out, norms (1, 0),
        level embedding normal; the deformable attentions keep their own reference initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, (2.0 / fan_out) ** 0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, backbone: ViTBackbone, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [0, 1] (B, 3, H, W) -> [F4, F8, F16, F32], each (B, D, H/s, W/s)."""
        images = backbone.normalize(images)
        c1, *cs = self.spm(images)
        c_shapes = [tuple(c.shape[-2:]) for c in cs]  # 1/8, 1/16, 1/32
        c = torch.cat([m.flatten(2).transpose(1, 2) + e for m, e in zip(cs, self.level_embed)], dim=1)  # (B, N, D)
        x = backbone.embed(images)  # (B, prefix + h*w, D)
        p = backbone.num_prefix_tokens
        x_shape = backbone.grid_size
        ref_x = reference_points([x_shape], images.device)  # injector queries: the ViT's patches
        ref_c = reference_points(c_shapes, images.device)  # extractor queries: the adapter tokens
        outs = []
        for (first, last), inter in zip(self.interaction_indexes, self.interactions):
            patches = inter.injector(x[:, p:], ref_x, c, c_shapes)
            x = torch.cat([x[:, :p], patches], dim=1)
            for i in range(first, last + 1):
                x = backbone.run_block(i, x)
            patches = x[:, p:]
            c = inter.extractor(c, ref_c, patches, x_shape, c_shapes)
            for extractor in inter.extra_extractors:
                c = extractor(c, ref_c, patches, x_shape, c_shapes)
            outs.append(backbone.patch_map(x))  # (B, D, h, w)
        b, _, d = c.shape
        c2, c3, c4 = (t.transpose(1, 2).reshape(b, d, *s) for t, s in zip(c.split([h * w for h, w in c_shapes], 1),
                                                                          c_shapes))
        c1 = self.up(c2) + c1
        feats = []
        for level, (f, o) in enumerate(zip((c1, c2, c3, c4), outs)):  # ViT outputs at 4x, 2x, 1x, 0.5x
            if o.shape[-2:] != f.shape[-2:]:
                o = F.interpolate(o, size=f.shape[-2:], mode="bilinear", align_corners=False)
            feats.append(self.norms[level](f + o))
        return feats

    def timed_parts(self) -> list[nn.Module]:
        """The adapter's own modules, for the per-component time breakdown (the ViT blocks run between)."""
        parts = [self.spm, self.up, *self.norms]
        for inter in self.interactions:
            parts += [inter.injector, inter.extractor, *inter.extra_extractors]
        return parts
