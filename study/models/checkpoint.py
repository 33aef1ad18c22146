"""Whole-model checkpoints: ours, the official EoMT code's and Hugging Face's ``EomtForUniversalSegmentation``.

The layout is recognised from the keys; each is mapped to our names (the official names are listed in
docs/paper.md section 5), and any key or shape mismatch ends in one message naming the keys.
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from study.errors import UserError
from study.models.weights import HF_HEAD_RULES, OFFICIAL_HEAD_RULES, read_weights, rename_keys, state_dict_mismatch

# Official EoMT (tue-mps/eomt) -> ours. Applied in order, first match wins.
_OFFICIAL = [(r"^network\.encoder\.backbone\.", "backbone.vit."), *OFFICIAL_HEAD_RULES]
_OFFICIAL_DROPPED = (r"^criterion\.",)  # criterion.empty_weight: a loss buffer, not part of the model

# Hugging Face EomtForUniversalSegmentation -> ours (q, k, v projections are fused afterwards).
_HF = [
    (r"^embeddings\.cls_token$", "backbone.vit.cls_token"),
    (r"^embeddings\.register_tokens$", "backbone.vit.reg_token"),
    (r"^embeddings\.patch_embeddings\.projection\.", "backbone.vit.patch_embed.proj."),
    (r"^embeddings\.position_embeddings\.weight$", "backbone.vit.pos_embed"),
    (r"^layers\.(\d+)\.norm(\d)\.", r"backbone.vit.blocks.\1.norm\2."),
    (r"^layers\.(\d+)\.attention\.out_proj\.", r"backbone.vit.blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.attention\.([qkv])_proj\.", r"backbone.vit.blocks.\1.attn.\2_proj."),
    (r"^layers\.(\d+)\.layer_scale(\d)\.lambda1$", r"backbone.vit.blocks.\1.ls\2.gamma"),
    (r"^layers\.(\d+)\.mlp\.weights_in\.", r"backbone.vit.blocks.\1.mlp.fc1."),  # SwiGLU (ViT-g)
    (r"^layers\.(\d+)\.mlp\.weights_out\.", r"backbone.vit.blocks.\1.mlp.fc2."),
    (r"^layers\.(\d+)\.mlp\.", r"backbone.vit.blocks.\1.mlp."),
    (r"^layernorm\.", "backbone.vit.norm."),
    *HF_HEAD_RULES,
]
_HF_DROPPED = (r"^criterion\.", r"^embeddings\.position_ids$")


def detect_layout(sd: dict) -> str:
    if any(k.startswith("network.") for k in sd):
        return "official"
    if any(k.startswith(("embeddings.patch_embeddings", "layers.0.attention")) for k in sd):
        return "huggingface"
    return "ours"


def _fuse_qkv(sd: dict) -> dict:
    """Hugging Face splits timm's fused qkv projection; put q, k, v back into one (3D, D) weight."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^(.*\.attn\.)q_proj\.(weight|bias)$", k)
        if m:
            base, kind = m.groups()
            out[f"{base}qkv.{kind}"] = torch.cat([v, sd[f"{base}k_proj.{kind}"], sd[f"{base}v_proj.{kind}"]])
        elif not re.match(r"^.*\.attn\.[kv]_proj\.", k):
            out[k] = v
    return out


def convert_state_dict(sd: dict, layout: str, path="<state dict>") -> dict:
    if layout == "official":
        return rename_keys(sd, _OFFICIAL, _OFFICIAL_DROPPED, path)
    if layout == "huggingface":
        sd = _fuse_qkv(rename_keys(sd, _HF, _HF_DROPPED, path))
        if "backbone.vit.pos_embed" in sd and sd["backbone.vit.pos_embed"].dim() == 2:
            sd["backbone.vit.pos_embed"] = sd["backbone.vit.pos_embed"][None]  # (N, D) -> (1, N, D)
        return sd
    return sd


def load_checkpoint(model: nn.Module, path: str | os.PathLike, delta_weights: bool = False,
                    keep_own: tuple[str, ...] = ()) -> str:
    """Load a whole-model checkpoint (any of the three layouts) into ``model``; returns the layout.
    EoMT on DINOv3 (official or Hugging Face layout, ``delta_weights`` included) goes to study/models/dinov3.py.
    ``keep_own``: key prefixes whose tensors stay as the model was built, whatever the file holds (or lacks) for
    them (:func:`init_from_checkpoint`); every other key must fit, or the UserError names it."""
    sd = read_weights(path)
    from study.models.dinov3 import detect_dinov3_layout, load_dinov3_checkpoint

    dinov3 = detect_dinov3_layout(sd)
    if dinov3 is not None:
        return load_dinov3_checkpoint(model, sd, dinov3, path, delta_weights, keep_own=keep_own)
    if delta_weights:
        raise UserError(f"checkpoint {path}: delta weights are defined for EoMT-DINOv3 checkpoints only "
                        "(official or Hugging Face layout)")
    layout = detect_layout(sd)
    sd = convert_state_dict(sd, layout, path)
    own = model.state_dict()
    # The pixel statistics are constants of the recipe; checkpoints without them (Hugging Face) keep ours.
    for k in ("backbone.pixel_mean", "backbone.pixel_std"):
        if k in own and k not in sd:
            sd[k] = own[k]
    if keep_own:
        sd = {k: v for k, v in sd.items() if not k.startswith(keep_own)}
        sd.update({k: v for k, v in own.items() if k.startswith(keep_own)})
    problem = state_dict_mismatch(own, sd)
    if problem:
        raise UserError(f"checkpoint {path} ({layout} layout) does not fit the model: {problem}. "
                         "Check model.size, model.num_classes, model.num_queries and model.img_size.")
    model.load_state_dict(sd)
    return layout


def init_from_checkpoint(model: nn.Module, source: str | os.PathLike, reinit_class_head: bool = False,
                         delta_weights: bool = False) -> str:
    """Start a run from another run's weights (``model.init_from``; Table 4's ADE20K runs from their COCO runs).

    ``source`` is a weights file (any layout :func:`load_checkpoint` reads) or a run folder (its
    ``checkpoints/model_final.pt``). The masking probabilities stay as built (a new training anneals anew).
    ``reinit_class_head``: the class head (``model.class_head_prefix``) keeps its fresh initialisation, so the
    new run may have other classes; any other mismatch fails naming the tensor."""
    from pathlib import Path

    path = Path(source)
    if path.is_dir():
        path = path / "checkpoints" / "model_final.pt"
        if not path.is_file():
            raise UserError(f"model.init_from {source} is a folder without checkpoints/model_final.pt: is it a "
                            "finished run? Give the run folder of a finished run or a weights file")
    keep = ("attn_mask_probs",)
    if reinit_class_head:
        keep += (model.class_head_prefix,)
    try:
        return load_checkpoint(model, path, delta_weights, keep_own=keep)
    except UserError as e:
        hint = "" if reinit_class_head or "class_head" not in str(e) else \
            " To start with other classes, set model.reinit_class_head: true."
        raise UserError(f"model.init_from: {e}{hint}") from None
