"""EoMT: the Encoder-only Mask Transformer (docs/paper.md section 5), in the order of the paper's figure.

Tokens flow through the ViT; at block L - L2 the K learnable queries are prepended and processed with the
patch tokens by the last L2 blocks. Before each of those blocks (when masked attention is on) the head
predicts masks from the current tokens, and these masks restrict query -> patch attention in the block.
The head runs once more on the final tokens.

At inference the model may merge patch tokens with ALGM (Table 9; ``model.token_merging``, study/models/algm.py):
the blocks after the merges run on fewer tokens, and every prediction unmerges them back to the grid first.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from study.errors import UserError
from study.models import algm
from study.models.backbone import ViTBackbone
from study.models.config import TokenMerging
from study.models.contract import ParamGroup, PredictionSet, Segmenter, backbone_param_groups
from study.models.heads import ScaleBlock, mask_mlp, num_upscale_blocks


class EoMTHead(nn.Module):
    """Class head, mask MLP and upscaler, run on the backbone's final-LayerNorm output."""

    def __init__(self, dim: int, num_classes: int, patch_size: int):
        super().__init__()
        self.class_head = nn.Linear(dim, num_classes + 1)  # last class = no-object
        self.mask_head = mask_mlp(dim)
        self.upscale = nn.Sequential(*[ScaleBlock(dim) for _ in range(num_upscale_blocks(patch_size))])

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> PredictionSet:
        """queries (B, Q, D), patches (B, D, H/16, W/16) -> masks (B, Q, H/4, W/4), classes (B, Q, C+1)."""
        return PredictionSet(mask_product(self.mask_head(queries), self.upscale(patches)), self.class_head(queries))


def mask_product(queries: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Mask logits (B, Q, H, W): the dot product of every query embedding (B, Q, C) with every pixel's features
    (B, C, H, W).

    The upscaler's last LayerNorm2d leaves the map as an NCHW view of NHWC (channels-last) memory. On that
    layout the product is taken as ``"bhwc,bqc->bhwq"`` and returned as contiguous (B, Q, H, W): ``einsum("bqc,bchw->bqhw")`` on it makes the map contiguous first inside its ``bmm``, a strided
    copy of the whole map that cost more than the product itself in bf16 (about 60 ms for EoMT-S at 640, one
    thread; study/bench/bf16.py). Each logit is the same C-term dot product, but the two layouts reach
    different kernels that may sum in another order: equal within the dot product's rounding bound (bitwise on
    some CPUs, up to 2.4e-6 apart in fp32 on an AMD EPYC; tests/test_bf16_speed_paths.py ``dot_bound``). The
    FLOP count is the same: one ``einsum`` with the same index sizes for fvcore and for the fast counter.
    """
    if pixels.permute(0, 2, 3, 1).is_contiguous():
        # Returned contiguous: downstream kernels pick their code path by memory format (CPU bilinear resizing of
        # a channels-last map rounds differently), and a (B, H, W, Q) view made batched evaluation differ from
        # batch 1 in the last bits (tests/test_eval_run.py). The copy is of the logits (Q planes in the
        # product's dtype), not of the map (C planes, float32 under autocast).
        return torch.einsum("bhwc,bqc->bhwq", pixels.permute(0, 2, 3, 1), queries).permute(0, 3, 1, 2).contiguous()
    return torch.einsum("bqc,bchw->bqhw", queries, pixels)


class EoMT(Segmenter):
    """EoMT on a :class:`ViTBackbone`.

    Args:
        backbone: the ViT.
        num_classes: C (the class head predicts C + 1 with no-object last).
        num_queries: K (200 panoptic and instance, 100 semantic; docs/paper.md section 5).
        num_query_blocks: L2, the last blocks that process the queries.
        masked_attention: train with masked attention (and L2 + 1 supervised prediction sets).
        masked_inference: keep masked attention at inference (Table 1 row 4); off = row 5.
        mask_annealing: the mask setting's annealing in training (None: the trainer's rule; contract.py).
        token_merging: ALGM's settings (study/models/config.py ``TokenMergingConfig.resolve``), applied at
            inference only; None = no merging. Settable later with :meth:`set_token_merging`.
    """

    def __init__(self, backbone: ViTBackbone, num_classes: int, num_queries: int, num_query_blocks: int,
                 masked_attention: bool = True, masked_inference: bool = False,
                 mask_annealing: bool | None = None, token_merging: TokenMerging | None = None):
        if not 1 <= num_query_blocks <= backbone.depth:
            raise UserError(f"model.num_query_blocks (L2) is {num_query_blocks}, but this backbone has "
                            f"{backbone.depth} blocks; give a value in 1..{backbone.depth} (or leave it unset for "
                            "the size's default)")
        super().__init__(num_classes, num_queries, num_query_blocks, masked_attention, masked_inference,
                         mask_annealing)
        self.backbone = backbone
        self.num_query_blocks = num_query_blocks
        self.q = nn.Embedding(num_queries, backbone.embed_dim)  # no positional embedding (docs/paper.md section 5)
        self.head = EoMTHead(backbone.embed_dim, num_classes, backbone.patch_size)
        self.token_merging: TokenMerging | None = None
        # After a forward that merged: (block, patch tokens before, after) per merge, host integers (no sync of
        # their own); the benchmark and the tests read it.
        self.last_merges: list[tuple[int, int, int]] = []
        self.set_token_merging(token_merging)

    def set_token_merging(self, settings: TokenMerging | None) -> None:
        """Turn ALGM token merging at inference on (its settings) or off (None); checked against the model."""
        if settings is not None:
            algm.check_settings(settings, self.backbone.depth, self.first_query_block, self.backbone.is_eva,
                                self.backbone.blocks)
        self.token_merging = settings
        self.last_merges = []

    @property
    def first_query_block(self) -> int:
        return self.backbone.depth - self.num_query_blocks

    def predict(self, x: torch.Tensor, merged: algm.MergeState | None = None) -> PredictionSet:
        """Tokens (B, Q + prefix + patches, D) -> one prediction set, after the final LayerNorm. ``merged``: the
        patch tokens are merged (ALGM) and are first put back on the grid."""
        x = self.backbone.norm(x)
        if merged is None:
            patches = self.backbone.patch_map(x, skip=self.num_queries)
        else:
            grid = algm.unmerge(x[:, self.num_queries + self.backbone.num_prefix_tokens:], merged)
            patches = grid.transpose(1, 2).reshape(x.shape[0], -1, *self.backbone.grid_size)
        return self.head(x[:, : self.num_queries], patches)

    def attention_mask(self, pred: PredictionSet, num_tokens: int, layer: int,
                       merged: algm.MergeState | None = None) -> torch.Tensor:
        """Bool (B, N, N), True = may attend; only query -> patch entries can be closed. ``merged``: the mask
        logits are averaged over each merged token's patches first (study/models/algm.py)."""
        b, q = pred.mask_logits.shape[:2]
        grid = F.interpolate(pred.mask_logits, self.backbone.grid_size, mode="bilinear")  # (B, Q, h, w)
        logits = grid.flatten(2) if merged is None else algm.pool_to_tokens(grid.flatten(2), merged)
        mask = torch.ones(b, num_tokens, num_tokens, dtype=torch.bool, device=grid.device)
        start = q + self.backbone.num_prefix_tokens
        mask[:, :q, start:] = self.drop_query_masks(logits > 0, layer)
        return mask

    def _merge_fn(self, i: int):
        """The merge of block ``i`` (a function of the patch tokens), or None if block ``i`` merges nothing."""
        s = self.token_merging
        if s is None or self.training:  # ALGM is applied at inference only (docs/paper.md section 4, Table 9)
            return None
        if i == s.local_block:
            return lambda p: algm.local_targets(p, self.backbone.grid_size, s.local_threshold, s.window)
        if i == s.global_block:
            return lambda p: algm.global_targets(p, i + 1, s.global_threshold)  # ALGM's i is 1-based
        return None

    def forward(self, images: torch.Tensor) -> list[PredictionSet]:
        x = self.backbone.embed(self.backbone.normalize(images))  # (B, prefix + patches, D)
        sets: list[PredictionSet] = []
        start = self.first_query_block
        merged: algm.MergeState | None = None  # set once a merge has run (ALGM at inference)
        if self.token_merging is not None and not self.training:  # the plain forward stays as it was
            self.last_merges = []
        for i in range(self.backbone.depth):
            attn_mask = None
            if i == start:  # prepend the queries: (B, Q + prefix + patches, D)
                x = torch.cat([self.q.weight[None].expand(x.shape[0], -1, -1), x], dim=1)
            if i >= start and self.masking_active(i - start):
                pred = self.predict(x, merged)
                sets.append(pred)
                attn_mask = self.attention_mask(pred, x.shape[1], i - start, merged)
            merge = self._merge_fn(i)  # only before the queries join (algm.check_settings)
            if merge is not None:
                prefix = self.backbone.num_prefix_tokens
                if merged is None:
                    merged = algm.initial_state(x.shape[0], x.shape[1] - prefix, x.device, x.dtype)
                before = x.shape[1] - prefix
                x, merged = algm.merging_block(self.backbone.blocks[i], x, prefix, merged, merge)
                self.last_merges.append((i, before, x.shape[1] - prefix))
            else:
                x = self.backbone.run_block(i, x, attn_mask, extra_prefix=self.num_queries if i >= start else 0)
        sets.append(self.predict(x, merged))
        return sets

    def param_groups(self, layer_decay: float = 0.8, decay_query_blocks: bool = True) -> list[ParamGroup]:
        """``decay_query_blocks=False``: the L2 query blocks get the full lr, no layer-wise decay (the official
        DINOv3 configs' ``llrd_l2_enabled: False``; the paper's DINOv2 recipe decays every block)."""
        full = () if decay_query_blocks else tuple(range(self.first_query_block, self.backbone.depth))
        return backbone_param_groups(self, self.backbone, layer_decay, prefix="backbone.vit.", full_lr_blocks=full)

    def components(self) -> dict[str, list[nn.Module]]:
        blocks = list(self.backbone.blocks)
        return {
            "patch_embed": [self.backbone.vit.patch_embed],
            "blocks_before_queries": blocks[: self.first_query_block],
            "blocks_with_queries": blocks[self.first_query_block:],
            "mask_module_and_upscaler": [self.head],
        }
