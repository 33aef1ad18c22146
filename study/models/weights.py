"""Weights files and state-dict names, below every model file: the readers of checkpoint files, the key-renaming
rules shared by the whole-model layouts (the official EoMT code's and Hugging Face's heads), and the check that a
state dict fits a model. study/models/backbone.py, dinov3.py and checkpoint.py build on it; it imports none of
them (no import circle).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from study.errors import UserError
from study.io import read_torch_file

# Official EoMT (tue-mps/eomt) -> ours, the parts outside the ViT: the same in the official DINOv2 and DINOv3
# EoMT (study/models/checkpoint.py, study/models/dinov3.py). Applied in order, first match wins.
OFFICIAL_HEAD_RULES: list[tuple[str, str]] = [
    (r"^network\.encoder\.pixel_(mean|std)$", r"backbone.pixel_\1"),
    (r"^network\.q\.", "q."),
    (r"^network\.class_head\.", "head.class_head."),
    (r"^network\.mask_head\.", "head.mask_head."),
    (r"^network\.upscale\.", "head.upscale."),
    (r"^network\.attn_mask_probs$", "attn_mask_probs"),
]
# The parts outside the ViT, the same in Hugging Face's EomtForUniversalSegmentation and
# EomtDinov3ForUniversalSegmentation (study/models/dinov3.py): queries, class head, mask MLP, upscaler, P_mask.
HF_HEAD_RULES: list[tuple[str, str]] = [
    (r"^query\.", "q."),
    (r"^class_predictor\.", "head.class_head."),
    (r"^mask_head\.fc1\.", "head.mask_head.0."),
    (r"^mask_head\.fc2\.", "head.mask_head.2."),
    (r"^mask_head\.fc3\.", "head.mask_head.4."),
    (r"^upscale_block\.block\.(\d+)\.layernorm2d\.", r"head.upscale.\1.norm."),
    (r"^upscale_block\.block\.(\d+)\.", r"head.upscale.\1."),  # conv1, conv2
    (r"^attn_mask_probs$", "attn_mask_probs"),
]


def state_dict_mismatch(own: dict, sd: dict) -> str:
    """'' when ``sd`` fits ``own`` key for key and shape for shape, else what does not fit (first few each)."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches ({'; '.join(wrong[:3])})")
    if missing:
        parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])})")
    return "; ".join(parts)


def rename_key(key: str, rules: list, where="<state dict>") -> str:
    """The first of ``rules`` (regex, replacement) that matches ``key`` renames it; no match is an error."""
    for pat, rep in rules:
        if re.match(pat, key):
            return re.sub(pat, rep, key)
    raise UserError(f"checkpoint {where}: key '{key}' has no counterpart in this suite's model")


def rename_keys(sd: dict, rules: list, dropped: tuple = (), where="<state dict>") -> dict:
    """A state dict renamed by ``rules``; keys matching a pattern of ``dropped`` are left out."""
    return {rename_key(k, rules, where): v for k, v in sd.items() if not any(re.match(d, k) for d in dropped)}


def read_weights(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """The tensors of a weights file without running pickled code: ``.safetensors``, or a ``torch.save``
    file (``weights_only``), unwrapped from a ``model`` / ``state_dict`` entry. A missing, damaged or
    unsafe file ends in one :class:`UserError` naming it."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UserError(f"{what} {path} does not exist")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise UserError(f"{what} {path} is damaged ({path.stat().st_size} bytes; safetensors says: {e}); "
                            f"download or copy it again") from None
    sd = read_torch_file(path, what)
    if not isinstance(sd, dict):
        raise UserError(f"{what} {path} holds a {type(sd).__name__}, not a state dict")
    for key in ("model", "state_dict"):  # common wrappers
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{what} {path}: entry '{bad[0]}' is a {type(sd[bad[0]]).__name__}, not a tensor; "
                        f"expected a model state dict")
    return sd


