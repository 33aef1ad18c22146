"""DINOv3 weights in the layouts users have, mapped to the suite's timm DINOv3 (study/models/backbone.py).

Backbone files:
- Hugging Face's ``DINOv3ViTModel`` (``facebook/dinov3-vit*16-pretrain-lvd1689m``, the files the official EoMT
  DINOv3 configs load): ``embeddings.*``, ``layer.N.*`` (``model.layer.N.*`` as transformers 5 names them in
  memory), ``norm.*``; q, k and v as separate projections, MLP ``up_proj`` / ``down_proj``, layer scale
  ``lambda1``.
- timm's layout, and the original DINOv3 release (``storage_tokens``, fused ``qkv`` with a bias); both go
  through timm's own converter in :meth:`ViTBackbone.load_pretrained`.

Whole-model checkpoints of EoMT on DINOv3:
- the official code's (github tue-mps/eomt, models/vit.py + models/eomt.py + training/lightning_module.py):
  the Lightning module's state dict, ``network.encoder.backbone.*`` being Hugging Face's DINOv3ViTModel with
  ``embeddings`` renamed ``patch_embed`` (its ``mask_token`` deleted) and ``layer`` renamed ``blocks``.
  With ``delta_weights: True`` (every official DINOv3 config, and the released DINOv3 checkpoints) the file
  holds ``trained - base``: the base is the pretrained backbone under ``network.encoder.``, zero for every
  other parameter (``_zero_init_outside_encoder`` zeroes parameters only) and, for the one buffer outside the
  encoder, ``attn_mask_probs``, its initial value 1.
- Hugging Face's ``EomtDinov3ForUniversalSegmentation``.

Every key goes through an explicit rule; a key without one, a shape mismatch or a missing key is one
:class:`UserError` naming the file and the keys.
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from study.errors import UserError
from study.models.weights import HF_HEAD_RULES, OFFICIAL_HEAD_RULES, read_weights, state_dict_mismatch

# Backbone: Hugging Face DINOv3ViTModel (and the official code's renamed copy of it) -> timm's Eva.
# ``(?:model\.)?(?:layer|blocks)``: the file's ``layer.N``, transformers 5's ``model.layer.N``, the official
# ``blocks.N``; ``(?:embeddings|patch_embed)``: Hugging Face's and the official names of the embeddings.
_L = r"^(?:model\.)?(?:layer|blocks)\.(\d+)\."
_E = r"^(?:embeddings|patch_embed)\."
BACKBONE_RULES: list[tuple[str, str]] = [
    (_E + r"cls_token$", "cls_token"),
    (_E + r"register_tokens$", "reg_token"),
    (_E + r"patch_embeddings\.(weight|bias)$", r"patch_embed.proj.\1"),
    (_L + r"norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
    (_L + r"attention\.([qkv])_proj\.weight$", r"blocks.\1.attn.\2_proj.weight"),  # fused into qkv below
    (_L + r"attention\.q_proj\.bias$", r"blocks.\1.attn.q_bias"),
    (_L + r"attention\.v_proj\.bias$", r"blocks.\1.attn.v_bias"),
    (_L + r"attention\.k_proj\.bias$", r"blocks.\1.attn.k_bias"),  # must be zero: timm's k_bias is a zero buffer
    (_L + r"attention\.o_proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (_L + r"layer_scale([12])\.lambda1$", r"blocks.\1.gamma_\2"),
    (_L + r"mlp\.up_proj\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
    (_L + r"mlp\.down_proj\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
    (r"^norm\.(weight|bias)$", r"norm.\1"),
]
# Pre-training only (mask token) or recomputed (RoPE frequencies).
BACKBONE_DROPPED = (_E + r"mask_token$", r"^rope_embeddings\.")

# Whole model, official layout -> ours (the backbone part then goes through BACKBONE_RULES).
OFFICIAL_RULES: list[tuple[str, str]] = OFFICIAL_HEAD_RULES
OFFICIAL_BACKBONE = "network.encoder.backbone."
OFFICIAL_DROPPED = (r"^criterion\.",)  # the loss's empty_weight buffer

# Whole model, Hugging Face EomtDinov3ForUniversalSegmentation -> ours.
HF_EOMT_RULES: list[tuple[str, str]] = [
    (r"^layernorm\.", "norm."),  # the final norm: a backbone key, through BACKBONE_RULES
    *HF_HEAD_RULES,  # the same head as Hugging Face's DINOv2 EoMT
]
HF_EOMT_DROPPED = (r"^criterion\.",)


def _rename(key: str, rules, where) -> str:
    for pat, rep in rules:
        if re.match(pat, key):
            return re.sub(pat, rep, key)
    raise UserError(f"{where}: key '{key}' has no counterpart in the suite's DINOv3 model "
                    f"(gated-MLP DINOv3 sizes such as S+ and H+ are not supported)")


def is_hf_backbone(sd: dict) -> bool:
    return any(re.match(_E + "patch_embeddings", k) for k in sd) and any(re.match(_L, k) for k in sd)


def hf_backbone_to_timm(sd: dict, where="<state dict>") -> dict:
    """A DINOv3 backbone state dict in Hugging Face's (or the official code's) names -> timm's Eva names."""
    out = {}
    for k, v in sd.items():
        if any(re.match(d, k) for d in BACKBONE_DROPPED):
            continue
        new = _rename(k, BACKBONE_RULES, where)
        if new in out:
            raise UserError(f"{where}: keys for '{new}' appear twice (e.g. '{k}')")
        out[new] = v
    for k in [k for k in out if k.endswith(".attn.k_bias")]:
        if out[k].abs().max() > 0:
            raise UserError(f"{where}: '{k}' (the key projection's bias) is not zero; the DINOv3 of this suite, "
                            "like Hugging Face's (key_bias=False), has none")
        del out[k]
    for k in [k for k in out if k.endswith(".attn.q_proj.weight")]:
        base = k[: -len("q_proj.weight")]
        parts = [out.pop(base + f"{p}_proj.weight", None) for p in "qkv"]
        if any(p is None for p in parts):
            raise UserError(f"{where}: block '{base[:-len('attn.')]}' lacks one of its q, k, v projections")
        out[base + "qkv.weight"] = torch.cat(parts)
    stray = [k for k in out if re.search(r"\.attn\.[kv]_proj\.weight$", k)]
    if stray:
        raise UserError(f"{where}: '{stray[0]}' has no matching query projection")
    return out


def dinov3_backbone_to_timm(sd: dict, vit: nn.Module, where="<state dict>") -> dict:
    """Any supported DINOv3 backbone file -> what timm's own converter and our strict load take.

    Hugging Face layout: renamed here. timm's plain ``vit_*_patch16_dinov3`` layout (no q/v bias, the released
    weights' biases being zero): the zero biases are filled in. The original release's layout passes through
    (timm's checkpoint_filter_fn converts it).
    """
    if is_hf_backbone(sd):
        sd = hf_backbone_to_timm(sd, where)
    own = vit.state_dict()
    if "blocks.0.attn.qkv.weight" in sd and "blocks.0.attn.q_bias" not in sd:
        sd = dict(sd)
        for k, v in own.items():
            if k.endswith((".attn.q_bias", ".attn.v_bias")):
                sd[k] = torch.zeros_like(v, device="cpu")
    return sd


# ------------------------------------------------------------------------------------- whole-model checkpoints


def detect_dinov3_layout(sd: dict) -> str | None:
    """'official' / 'huggingface' for an EoMT-DINOv3 checkpoint in those layouts, else None."""
    if any(k.startswith(OFFICIAL_BACKBONE + "patch_embed.patch_embeddings.") for k in sd):
        return "official"
    if any(k.startswith("embeddings.patch_embeddings.") for k in sd) and \
            any(re.match(r"^layers\.\d+\.mlp\.up_proj\.", k) for k in sd):
        return "huggingface"
    return None


def dinov3_checkpoint_to_ours(sd: dict, layout: str, where="<state dict>") -> dict:
    """An EoMT-DINOv3 state dict in the official or Hugging Face layout -> our EoMT's names."""
    backbone, rest = {}, {}
    if layout == "official":
        for k, v in sd.items():
            if any(re.match(d, k) for d in OFFICIAL_DROPPED):
                continue
            if k.startswith(OFFICIAL_BACKBONE):
                backbone[k[len(OFFICIAL_BACKBONE):]] = v
            else:
                rest[_rename(k, OFFICIAL_RULES, where)] = v
    elif layout == "huggingface":
        for k, v in sd.items():
            if any(re.match(d, k) for d in HF_EOMT_DROPPED):
                continue
            if k.startswith(("embeddings.", "layers.", "rope_embeddings.")):
                backbone[re.sub(r"^layers\.", "layer.", k)] = v
                continue
            new = _rename(k, HF_EOMT_RULES, where)
            if new.startswith("norm."):
                backbone[new] = v
            else:
                rest[new] = v
    else:
        raise ValueError(f"not a DINOv3 checkpoint layout: {layout}")
    out = {"backbone.vit." + k: v for k, v in hf_backbone_to_timm(backbone, where).items()}
    out.update(rest)
    return out


def delta_base(model: nn.Module, backbone_file: str | os.PathLike | None, where) -> dict:
    """The base a delta checkpoint is added to, in our names: the pretrained backbone for the encoder (its
    weights from ``backbone_file``, the pixel statistics as built), zero for every other parameter, and the
    initial value (1) for ``attn_mask_probs`` (the official code zeroes parameters only)."""
    if backbone_file is None:
        raise UserError(f"checkpoint {where} holds delta weights (model.delta_weights): it needs the pretrained "
                        f"DINOv3 backbone file it was trained from; set model.pretrained to it")
    if not os.path.isfile(backbone_file):
        raise UserError(f"checkpoint {where} holds delta weights: its backbone file {backbone_file} "
                        f"(model.pretrained) does not exist")
    bb = model.backbone
    vit_sd = bb.pretrained_state_dict(backbone_file)
    base = {}
    params = {n for n, _ in model.named_parameters()}
    for k, v in model.state_dict().items():
        if k.startswith("backbone.vit."):
            base[k] = vit_sd[k[len("backbone.vit."):]]
        elif k.startswith("backbone."):
            base[k] = v
        elif k == "attn_mask_probs":
            base[k] = torch.ones_like(v)
        elif k in params:
            base[k] = torch.zeros_like(v)
        else:
            raise ValueError(f"delta base: no rule for buffer '{k}'")  # a new buffer: a bug here, not the user's
    return base


def load_dinov3_checkpoint(model: nn.Module, sd: dict, layout: str, where="<state dict>",
                           delta_weights: bool = False, backbone_file: str | os.PathLike | None = None,
                           keep_own: tuple[str, ...] = ()) -> str:
    """Load an EoMT-DINOv3 state dict (``layout`` from :func:`detect_dinov3_layout`) into our EoMT, strictly.

    ``delta_weights``: the file holds differences to the base of :func:`delta_base`; ``backbone_file`` defaults
    to the file the backbone was built from (``model.pretrained``). ``keep_own``: key prefixes of our model
    whose tensors stay as built (a re-initialised class head; study/models/checkpoint.py).
    """
    sd = dinov3_checkpoint_to_ours(sd, layout, where)
    own = model.state_dict()
    kept = {k: own[k] for k in own if k.startswith(keep_own)} if keep_own else {}
    sd.update(kept)
    for k in ("backbone.pixel_mean", "backbone.pixel_std"):  # constants of the recipe; HF files have none
        if k in own and k not in sd:
            sd[k] = torch.zeros_like(own[k]) if delta_weights else own[k]
    problem = state_dict_mismatch(own, sd)
    if problem:
        raise UserError(f"checkpoint {where} (EoMT-DINOv3, {layout} layout) does not fit the model: {problem}. "
                        "Check model.backbone, model.num_classes, model.num_queries and model.num_query_blocks.")
    if delta_weights:
        base = delta_base(model, backbone_file if backbone_file is not None else model.backbone.pretrained, where)
        sd = {k: base[k] + v.to(base[k].dtype) for k, v in sd.items()}
        sd.update(kept)
    model.load_state_dict(sd)
    return layout


def load_dinov3_checkpoint_file(model: nn.Module, path: str | os.PathLike, delta_weights: bool = False,
                                backbone_file: str | os.PathLike | None = None) -> str:
    """Read ``path`` and load it with :func:`load_dinov3_checkpoint`; returns the layout."""
    sd = read_weights(path)
    layout = detect_dinov3_layout(sd)
    if layout is None:
        raise UserError(f"checkpoint {path} is not an EoMT-DINOv3 checkpoint in the official or Hugging Face "
                        "layout")
    return load_dinov3_checkpoint(model, sd, layout, path, delta_weights, backbone_file)
