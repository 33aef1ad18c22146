"""The ViT backbone: a thin wrapper over timm, and the one module that touches timm's internals.

Every model of the suite (EoMT and the baseline chain) reaches the ViT through :class:`ViTBackbone`:
``normalize`` -> ``embed`` -> ``run_block(i, x, attn_mask)`` for each block -> ``norm``. ``norm`` is always the
final LayerNorm that the heads read (:attr:`ViTBackbone.final_norm`), whatever timm's pooling made of it. The backbone is
created with patch size 16 at the target input size (docs/paper.md section 5: timm resamples the 14x14 DINOv2
kernel and interpolates the position embedding once, when the weights are loaded). No network access is
ever attempted: weights come from a local file or not at all.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm
import torch
from torch import nn

from study.errors import UserError
from study.models.weights import read_weights, state_dict_mismatch

# ImageNet statistics (docs/paper.md section 5: images in [0, 1], normalised with these).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SizeSpec:
    backbone: Optional[str]  # timm name; None = the built-in tiny ViT
    query_blocks: int  # L2, docs/paper.md section 5: 3 (S), 3 (B), 4 (L), 5 (g)
    adapter_split: str  # key of the ViT-Adapter table in baselines/ (S, B, L, g, tiny)


# The paper's sizes (docs/paper.md sections 3 and 5) and a tiny size for tests and demos.
SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(None, 2, "tiny"),
    "S": SizeSpec("vit_small_patch14_reg4_dinov2", 3, "S"),
    "B": SizeSpec("vit_base_patch14_reg4_dinov2", 3, "B"),
    "L": SizeSpec("vit_large_patch14_reg4_dinov2", 4, "L"),
    "g": SizeSpec("vit_giant_patch14_reg4_dinov2", 5, "g"),
}

# Backbones the study uses: DINOv2 at every size, and the Table 2 pre-trainings at ViT-L.
BACKBONES: tuple[str, ...] = (
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg4_dinov2",
    "vit_large_patch14_reg4_dinov2",
    "vit_giant_patch14_reg4_dinov2",
    "eva02_large_patch14_224.mim.m38m",
    "deit3_large_patch16_384.fb.in22k.ft.in1k",
    "deit3_large_patch16_384.fb.in1k",
    "vit_small_patch16_dinov3",
    "vit_base_patch16_dinov3",
    "vit_large_patch16_dinov3",
    "tiny",
    "tiny_eva02",
    "tiny_deit3",
    "tiny_dinov3",
)

# The tiny ViT: DINOv2's layout (4 registers, layer scale, no position embedding on prefix tokens) at a
# width and depth that run in milliseconds. Our choice, not the paper's.
TINY_ARGS = dict(embed_dim=64, depth=4, num_heads=4, init_values=1e-5, reg_tokens=4, no_embed_class=True)

# Tiny widths of the other pre-trainings (Table 2's EVA-02 and DeiT-III, and DINOv3): timm's own architecture
# (rotary embeddings, SwiGLU, registers, norms exactly as the full model) at TINY_ARGS' width and depth, so that
# tests exercise every code path of the wrapper in milliseconds. Our choice, not the paper's.
TINY_WIDTH = dict(embed_dim=64, depth=4, num_heads=4)
TINY_OF: dict[str, str] = {
    "tiny_eva02": "eva02_large_patch14_224",
    "tiny_deit3": "deit3_large_patch16_384",
    "tiny_dinov3": "vit_large_patch16_dinov3",
}


def is_dinov3(name: str) -> bool:
    return "dinov3" in name


def dinov3_args(rope_rescale: float | None) -> dict:
    """timm arguments that make its DINOv3 the model the official EoMT code trains (Hugging Face's
    ``DINOv3ViTModel``, loaded from ``facebook/dinov3-vit*16-pretrain-lvd1689m``; see study/models/dinov3.py):

    - a trainable bias on the query and value projections and none on the key (Hugging Face's ``query_bias``,
      ``value_bias``, ``key_bias=False``); timm's EVA attention has exactly these (``q_bias``, ``v_bias``, and a
      zero ``k_bias`` buffer). timm's plain ``vit_*_patch16_dinov3`` leaves them out because the released
      weights hold zeros there; its files still load (zeros are filled in, the same function).
    - the train-time RoPE augmentation: the patch coordinates are scaled by one log-uniform factor in
      [1/r, r] per forward in training mode (Hugging Face's ``pos_embed_rescale``, 2.0 in every released
      DINOv3 config; the official code trains that module in training mode, so it applies). ``None`` = off.
    """
    return dict(qkv_bias=True, rope_rescale_coords=rope_rescale)


# DINOv3's RoPE coordinate rescaling in training (Hugging Face DINOv3ViTConfig.pos_embed_rescale); the EoMT
# paper predates DINOv3 and is silent: we follow the official code (see dinov3_args). Configurable per backbone.
DINOV3_ROPE_RESCALE = 2.0


def timm_name(name: str) -> str:
    """The paper writes pretrained tags with dots (``eva02_large_patch14_224.mim.m38m``); current timm
    writes them with underscores (``.mim_m38m``). Accept both."""
    arch, dot, tag = name.partition(".")
    return arch + dot + tag.replace(".", "_")


def check_size(size: str) -> SizeSpec:
    if size not in SIZES:
        raise UserError(f"unknown model size '{size}' (model.size); choose one of: {', '.join(SIZES)}")
    return SIZES[size]


class ViTBackbone(nn.Module):
    """A timm ViT with patch size ``patch_size`` at ``img_size``, plus pixel normalisation.

    Args:
        name: a timm model name (see :data:`BACKBONES`) or ``"tiny"``.
        img_size: square input size, divisible by ``patch_size``.
        patch_size: the patch size the ViT is re-created with (16 in the paper).
        pretrained: a local weights file (original DINOv2 layout or timm's; for DINOv3 also Hugging Face's and
            the original one); ``None`` = random init.
        drop_path: stochastic depth rate.
        rope_rescale: DINOv3 only: the train-time RoPE coordinate rescaling factor (see :func:`dinov3_args`).
    """

    def __init__(self, name: str, img_size: int, patch_size: int = 16, pretrained: str | None = None,
                 drop_path: float = 0.0, rope_rescale: float | None = DINOV3_ROPE_RESCALE):
        super().__init__()
        if img_size % patch_size:
            raise UserError(f"input size {img_size} is not divisible by the patch size {patch_size} "
                            "(model.img_size, model.patch_size)")
        kwargs = dict(img_size=img_size, patch_size=patch_size, num_classes=0, drop_path_rate=drop_path)
        if is_dinov3(name):
            kwargs.update(dinov3_args(rope_rescale))
        if name == "tiny":
            from timm.models.vision_transformer import VisionTransformer

            self.vit = VisionTransformer(**TINY_ARGS, **kwargs)
        elif name in TINY_OF:
            self.vit = timm.create_model(TINY_OF[name], pretrained=False, **TINY_WIDTH, **kwargs)
        else:
            if not timm.is_model(name.split(".")[0]):
                raise UserError(f"unknown backbone '{name}' (model.backbone); known: {', '.join(BACKBONES)}")
            # pretrained=False always: timm would otherwise try the model hub. Local weights load below.
            try:
                self.vit = timm.create_model(timm_name(name), pretrained=False, **kwargs)
            except RuntimeError as e:  # an unknown pretrained tag
                raise UserError(f"backbone '{name}' (model.backbone): {e}") from None
        self.name = name
        self.pretrained = None if pretrained is None else str(pretrained)  # the base of delta checkpoints
        self._moved_fc_norm = self._make_norm_final()
        self.is_eva = hasattr(self.vit, "rope")  # EVA-02 and DINOv3 use rotary embeddings on the patch tokens
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self._rope = None
        if pretrained is not None:
            self.load_pretrained(pretrained)

    def _make_norm_final(self) -> bool:
        """Make ``vit.norm`` the final LayerNorm of the tokens, the one every head reads.

        timm builds average-pooling ViTs (EVA-02 among them) with ``norm = Identity`` and the LayerNorm as
        ``fc_norm``, applied after pooling. We never pool: that LayerNorm is moved to ``norm`` (and ``fc_norm``
        becomes Identity), so the heads see normalised tokens and no parameter is left without a gradient (DDP
        with ``find_unused_parameters=False``). Weights in timm's layout keep loading: see
        :meth:`load_pretrained`. Returns whether the norm was moved.
        """
        vit = self.vit
        fc_norm = getattr(vit, "fc_norm", None)
        has_fc_norm = fc_norm is not None and not isinstance(fc_norm, nn.Identity)
        moved = False
        if isinstance(vit.norm, nn.Identity) and has_fc_norm:
            vit.norm, vit.fc_norm = fc_norm, nn.Identity()
            moved = True
        elif has_fc_norm:  # both a token norm and a pooled norm: the pooled one is never used here
            raise UserError(f"backbone '{self.name}' has both a final norm and a pooled norm (fc_norm); "
                            "create it without pooling (global_pool='token' or '')")
        if isinstance(vit.norm, nn.Identity):
            raise UserError(f"backbone '{self.name}' has no final LayerNorm; EoMT's head needs one")
        if getattr(vit, "attn_pool", None) is not None:  # attention pooling ('map'): unused, never trained
            vit.attn_pool = None
        return moved

    # ---- shape facts used by every head
    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def num_heads(self) -> int:
        return self.vit.blocks[0].attn.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens  # CLS + registers (1 + 4 for DINOv2 reg4)

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    # ---- the forward pieces
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W) -> ImageNet-normalised."""
        return (images - self.pixel_mean) / self.pixel_std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> tokens (B, prefix + H/p * W/p, D), prefix tokens first."""
        x = self.vit.patch_embed(x)
        if self.is_eva:
            x, self._rope = self.vit._pos_embed(x)
        else:
            x = self.vit._pos_embed(x)
        if not self.is_eva:  # EVA's patch dropout returns indices too; it is off (rate 0) here anyway
            x = self.vit.patch_drop(x)
        return self.vit.norm_pre(x)

    def run_block(self, i: int, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  extra_prefix: int = 0) -> torch.Tensor:
        """Block ``i`` on tokens x (B, N, D). ``attn_mask``: bool (B, N, N), True = may attend.

        ``extra_prefix`` counts tokens put in front of the ViT's own prefix (EoMT's queries); only the rotary
        embeddings (EVA-02, DINOv3) need to know it. timm's RoPE attention rotates every token after its first
        ``num_prefix_tokens``; for these calls that count includes the queries, so the queries, like CLS and the
        registers, are not rotated and the patch tokens get exactly the rotation of the plain ViT. This is what
        the official EoMT code does (it prepends the queries and calls Hugging Face's DINOv3 attention, whose
        ``apply_rotary_pos_emb`` rotates only the last grid-size tokens) and what Hugging Face's
        EomtDinov3ForUniversalSegmentation does; tests/test_dinov3.py checks the logits against the latter.
        """
        block = self.vit.blocks[i]
        if attn_mask is not None:
            attn_mask = attn_mask[:, None]  # (B, 1, N, N): broadcast over heads
        if self.is_eva:
            attn = block.attn
            saved = attn.num_prefix_tokens
            attn.num_prefix_tokens = saved + extra_prefix
            try:
                return block(x, rope=self._rope, attn_mask=attn_mask)
            finally:
                attn.num_prefix_tokens = saved
        return block(x, attn_mask=attn_mask)

    @property
    def final_norm(self) -> nn.Module:
        """The final LayerNorm every head applies to the tokens (see :meth:`_make_norm_final`)."""
        return self.vit.norm

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> final normalised tokens (B, prefix + patches, D)."""
        x = self.embed(self.normalize(images))
        for i in range(self.depth):
            x = self.run_block(i, x)
        return self.norm(x)

    def patch_map(self, tokens: torch.Tensor, skip: int = 0) -> torch.Tensor:
        """Tokens (B, skip + prefix + h*w, D) -> patch feature map (B, D, h, w)."""
        x = tokens[:, skip + self.num_prefix_tokens:]
        h, w = self.grid_size
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    # ---- layer-wise lr decay (docs/paper.md section 6)
    def layer_ids(self) -> dict[str, int]:
        """Parameter name (relative to ``vit.``) -> block index used for layer-wise decay.

        Blocks get their index; patch and position embeddings, CLS and register tokens get block 0's;
        the final norm gets ``depth`` (no decay) as in the official code.
        """
        ids = {}
        for n, _ in self.vit.named_parameters():
            if n.startswith("blocks."):
                ids[n] = int(n.split(".")[1])
            elif n.startswith(("norm.", "fc_norm.", "head")):
                ids[n] = self.depth
            else:
                ids[n] = 0
        return ids

    # ---- weights
    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load backbone weights from a local file in the original DINOv2 layout or timm's layout (DINOv3: also
        Hugging Face's, see study/models/dinov3.py).

        timm's own converter maps the DINOv2 (and original DINOv3) names, resamples the 14x14 patch kernel to
        the patch size and interpolates the position embedding to the grid.
        """
        self.vit.load_state_dict(self.pretrained_state_dict(path))

    def pretrained_state_dict(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """The tensors of a backbone weights file in ``self.vit``'s names and shapes (see
        :meth:`load_pretrained`); a file that does not fit is a UserError naming it."""
        sd = read_weights(path, "model.pretrained")
        if is_dinov3(self.name):
            from study.models.dinov3 import dinov3_backbone_to_timm

            sd = dinov3_backbone_to_timm(sd, self.vit, path)
        module = sys.modules[type(self.vit).__module__]
        filter_fn = getattr(module, "checkpoint_filter_fn", None)
        if filter_fn is not None:
            sd = filter_fn(sd, self.vit)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        if self._moved_fc_norm and not any(k.startswith("norm.") for k in sd):
            # timm's layout of an average-pooling ViT (and timm's EVA-02 MIM converter) names the final norm
            # fc_norm; here it is norm (see _make_norm_final)
            sd = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in sd.items()}
        problem = state_dict_mismatch(self.vit.state_dict(), sd)
        if problem:
            raise UserError(f"backbone weights {path} do not fit '{self.name}': {problem}")
        return sd


def build_backbone(size: str, name: str | None, img_size: int, patch_size: int = 16,
                   pretrained: str | None = None, drop_path: float = 0.0,
                   rope_rescale: float | None = DINOV3_ROPE_RESCALE) -> ViTBackbone:
    """The backbone for a size (S, B, L, g, tiny), or an explicit timm name."""
    spec = check_size(size)
    name = name or spec.backbone or "tiny"
    return ViTBackbone(name, img_size, patch_size, pretrained, drop_path, rope_rescale)
