"""Mask2Former's Transformer decoder with masked attention (Table 1 rows 0-3).

K learned queries (features and position embeddings) go through 9 post-norm layers of masked cross-attention
-> self-attention -> FFN; layer i attends to level i mod n of the maps it is given (1/32, 1/16, 1/8 in rows
0-2; F16 only in row 3). A prediction head (shared LayerNorm, class Linear, 3-layer ReLU mask MLP dotted with
the 1/4 mask features) runs before the first layer and after every layer: 10 prediction sets, all supervised
(docs/baseline.md "Mask2Former Transformer decoder"; numerically the same as Hugging Face's
``Mask2FormerTransformerModule``, see tests/test_baselines_hf.py).

Masked attention follows the suite's contract (study/models/contract.py): the model tells the decoder for each
layer whether masking is active (training, or masked inference) and drops query masks with probability
1 - P_mask, so one annealing schedule drives EoMT and this decoder alike (paper Table C). A layer whose mask is
not active needs no prediction before it, so at inference with masking off only the final set is computed.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from baselines.pixel_decoder import sine_position_embedding
from study.models.contract import PredictionSet


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections, computed by ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        """q (B, Lq, C), k and v (B or 1, Lk, C); mask bool (B, 1, Lq, Lk), True = may attend."""
        b, lq, c = q.shape

        def heads(t):  # (B, L, C) -> (B, heads, L, C / heads)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v)),
                                             attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, c))


class DecoderLayer(nn.Module):
    """Post-norm: masked cross-attention -> add -> LN, self-attention -> add -> LN, FFN (ReLU) -> add -> LN."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.cross_attn = Attention(dim, heads)
        self.cross_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.self_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, x, query_pos, feat, feat_pos, mask):
        """x (B, Q, C) queries; feat (B, h*w, C) one level with its position embedding feat_pos (1, h*w, C)."""
        x = self.cross_norm(x + self.cross_attn(x + query_pos, feat + feat_pos, feat, mask))
        q = x + query_pos
        x = self.self_norm(x + self.self_attn(q, q, x))
        return self.ffn_norm(x + self.fc2(F.relu(self.fc1(x))))


class MaskedAttentionDecoder(nn.Module):
    """Args:
        dim: width (256); heads: 8; ffn: 2048; layers: 9 (docs/baseline.md).
        num_levels: maps attended round robin (3, or 1 in row 3); each gets a learned level embedding.
        num_queries: K (200, docs/paper.md section 5); num_classes: C (the class head predicts C + 1, no-object last).
    """

    def __init__(self, dim: int, heads: int, ffn: int, layers: int, num_levels: int, num_queries: int,
                 num_classes: int):
        super().__init__()
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_pos = nn.Embedding(num_queries, dim)
        self.level_embed = nn.Embedding(num_levels, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)  # shared by every prediction
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.mask_head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
                                       nn.Linear(dim, dim))
        with torch.no_grad():  # Mask2Former: xavier on every matrix of the decoder layers
            for p in self.layers.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def predict(self, x: torch.Tensor, mask_features: torch.Tensor) -> PredictionSet:
        """x (B, Q, C), mask_features (B, C, H/4, W/4) -> masks (B, Q, H/4, W/4), classes (B, Q, C+1)."""
        x = self.norm(x)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_head(x), mask_features)
        return PredictionSet(masks, self.class_head(x))

    @staticmethod
    def attention_mask(mask_logits: torch.Tensor, size: tuple[int, int], layer: int,
                       drop: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """Predicted masks -> bool (B, 1, Q, h*w), True = may attend: sigmoid >= 0.5 at the level's size after
        bilinear resizing (masks detached); annealing may open a query's row; a fully closed row is opened."""
        m = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
        allowed = drop(m.sigmoid().flatten(2) >= 0.5, layer)  # (B, Q, h*w)
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        return allowed[:, None]

    def forward(self, levels: list[torch.Tensor], mask_features: torch.Tensor,
                active: Callable[[int], bool], drop: Callable[[torch.Tensor, int], torch.Tensor]
                ) -> list[PredictionSet]:
        """levels [(B, C, h, w)] in round-robin order, mask_features (B, C, H/4, W/4).

        ``active(i)``: whether layer i's cross-attention is masked (then the prediction before it is made and
        returned); ``drop(mask, i)``: the annealing of the contract. Returns the prediction sets, final last.
        """
        b = mask_features.shape[0]
        feats, pos, sizes = [], [], []
        for i, m in enumerate(levels):
            sizes.append(tuple(m.shape[-2:]))
            pos.append(sine_position_embedding(*sizes[-1], m.shape[1], m.device, m.dtype))  # (1, h*w, C)
            feats.append(m.flatten(2).transpose(1, 2) + self.level_embed.weight[i])  # (B, h*w, C)
        x = self.query_feat.weight[None].expand(b, -1, -1)
        query_pos = self.query_pos.weight[None]
        sets: list[PredictionSet] = []
        for i, layer in enumerate(self.layers):
            lvl = i % len(levels)
            mask = None
            if active(i):
                sets.append(self.predict(x, mask_features))
                mask = self.attention_mask(sets[-1].mask_logits, sizes[lvl], i, drop)
            x = layer(x, query_pos, feats[lvl], pos[lvl], mask)
        sets.append(self.predict(x, mask_features))
        return sets
