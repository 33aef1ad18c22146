"""Key maps from Hugging Face's Mask2Former modules to ours (same weights in, same numbers out).

Used by tests/test_baselines_hf.py (HF as the oracle) and to start our pixel decoder and Transformer decoder
from a Hugging Face Mask2Former checkpoint. Names follow transformers.models.mask2former.modeling_mask2former:
``Mask2FormerPixelDecoder`` -> :class:`baselines.pixel_decoder.PixelDecoder`;
``Mask2FormerTransformerModule`` (+ the ``class_predictor`` of ``Mask2FormerForUniversalSegmentation``) ->
:class:`baselines.m2f_decoder.MaskedAttentionDecoder`.
"""
from __future__ import annotations

import re

import torch

from study.models.weights import rename_key, rename_keys

# HF pixel decoder name -> ours (regular expressions, applied in order; the first match wins).
PIXEL_DECODER_MAP = [
    (r"^input_projections\.(\d+)\.", r"input_proj.\1."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"layers.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"layers.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.", r"layers.\1."),  # self_attn.*, fc1, fc2 keep their names
    (r"^adapter_1\.", "lateral."),
    (r"^layer_1\.", "output."),
    (r"^mask_projection\.", "mask_proj."),
    (r"^level_embed$", "level_embed"),
]

# HF Transformer module name -> ours (the cross-attention's packed in-projection is split separately).
DECODER_MAP = [
    (r"^queries_features\.", "query_feat."),
    (r"^queries_embedder\.", "query_pos."),
    (r"^level_embed\.", "level_embed."),
    (r"^decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"layers.\1.self_norm."),
    (r"^decoder\.layers\.(\d+)\.cross_attn_layer_norm\.", r"layers.\1.cross_norm."),
    (r"^decoder\.layers\.(\d+)\.final_layer_norm\.", r"layers.\1.ffn_norm."),
    (r"^decoder\.layers\.(\d+)\.", r"layers.\1."),  # self_attn.{q,k,v,out}_proj, cross_attn.out_proj, fc1, fc2
    (r"^decoder\.layernorm\.", "norm."),
]


def pixel_decoder_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict of HF ``Mask2FormerPixelDecoder`` -> state dict of our ``PixelDecoder``."""
    return rename_keys(hf_state, PIXEL_DECODER_MAP, where="Hugging Face pixel decoder")


def decoder_from_hf(hf_state: dict[str, torch.Tensor], class_predictor: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """State dicts of HF ``Mask2FormerTransformerModule`` and its ``class_predictor`` Linear -> state dict of our
    ``MaskedAttentionDecoder`` (which must be built with identity input projections, i.e. inputs of width
    ``hidden_dim``: our projections live in the pixel decoder or the ``LevelProjection``)."""
    out = {}
    for k, v in hf_state.items():
        if k.startswith("input_projections."):
            raise KeyError(f"'{k}': HF input projections are not part of our decoder; build the HF module with "
                           f"in_features == hidden_dim")
        m = re.match(r"^decoder\.layers\.(\d+)\.cross_attn\.in_proj_(weight|bias)$", k)
        if m:  # nn.MultiheadAttention packs q, k, v
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"layers.{m.group(1)}.cross_attn.{name}.{m.group(2)}"] = part
            continue
        m = re.match(r"^decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(weight|bias)$", k)
        if m:  # three Linear blocks -> our Sequential(Linear, ReLU, Linear, ReLU, Linear)
            out[f"mask_head.{2 * int(m.group(1))}.{m.group(2)}"] = v
            continue
        out[rename_key(k, DECODER_MAP, "Hugging Face Transformer decoder")] = v
    out.update({f"class_head.{k}": v for k, v in class_predictor.items()})
    return out
