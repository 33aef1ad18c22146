"""The one contract every segmenter of the suite follows (EoMT and all baseline variants).

- ``forward(images)`` takes images in [0, 1], (B, 3, H, W), and returns a list of :class:`PredictionSet`;
  the last set is the final prediction, every set is supervised in training.
- ``attn_mask_probs`` (a buffer, one entry per masked-attention layer) holds the probability that a query's
  mask is applied; one annealing schedule drives EoMT and the Mask2Former decoder alike (paper Table C).
  Set it with ``set_mask_probs`` (or by loading a state dict): the forward branches on host flags kept in
  step with the buffer (P_mask > 0, P_mask < 1) and compares with the buffer on the device, so it never reads
  the buffer back (no host sync per masked layer, no graph break under ``torch.compile``; a compiled model
  recompiles only when a flag flips, at most twice per layer over the annealing).
  ``masked_inference`` keeps masked attention on at inference (Table 1 row 4). ``mask_annealing`` is what
  the model's mask setting (``model.mask_setting``, study/models/config.py) says about annealing in training:
  True / False, or None when the trainer's rule decides (study/train/schedules.py ``build_mask_annealing``).
- ``param_groups()`` tells the optimiser which parameters are backbone (and at which depth) and which are new.
- ``components()`` names the sub-modules whose time the benchmark breaks down.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn


class PredictionSet(NamedTuple):
    mask_logits: torch.Tensor  # (B, Q, H/4, W/4)
    class_logits: torch.Tensor  # (B, Q, C + 1), the last class is no-object


@dataclass
class ParamGroup:
    name: str
    params: list
    lr_scale: float  # multiplies the base lr (layer-wise decay)
    backbone: bool  # backbone parameters follow the delayed warm-up (docs/paper.md section 6)


class Segmenter(nn.Module):
    """Base class: holds what is common to every model of the contract."""

    num_classes: int
    num_queries: int
    masked_inference: bool
    # the state-dict prefix of the class head (model.reinit_class_head re-initialises it)
    class_head_prefix: str = "head.class_head."

    def __init__(self, num_classes: int, num_queries: int, num_masked_layers: int, masked_attention: bool,
                 masked_inference: bool, mask_annealing: Optional[bool] = None):
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.masked_attention = masked_attention
        self.masked_inference = masked_inference
        self.mask_annealing = mask_annealing
        # P_mask per masked layer (docs/paper.md section 6); 1 = every query's mask applied.
        self.register_buffer("attn_mask_probs", torch.ones(num_masked_layers))
        self._set_host_flags(self.attn_mask_probs)
        self.register_load_state_dict_post_hook(_after_load)

    @property
    def num_masked_layers(self) -> int:
        return self.attn_mask_probs.numel()

    def set_mask_probs(self, probs) -> None:
        """Set P_mask per masked layer (the annealing schedule calls this before each step's forward)."""
        probs = torch.as_tensor(probs, dtype=self.attn_mask_probs.dtype).detach().cpu()
        if probs.shape != self.attn_mask_probs.shape:
            raise ValueError(f"expected {self.num_masked_layers} masking probabilities, got {tuple(probs.shape)}")
        self._set_host_flags(probs)
        with torch.no_grad():
            self.attn_mask_probs.copy_(probs)

    def _set_host_flags(self, probs: torch.Tensor) -> None:
        """Host copies of what the forward branches on (read from the device only here, never in forward)."""
        values = probs.detach().cpu().tolist()
        self._prob_positive = tuple(v > 0 for v in values)  # masking runs at (masked) inference
        self._prob_below_one = tuple(v < 1 for v in values)  # annealing opens some queries' masks

    def masking_active(self, layer: int) -> bool:
        """Whether masked attention (and the prediction that feeds it) runs before masked layer ``layer``.

        Training: whenever masked attention is enabled (queries are then dropped from the mask at random
        with probability 1 - P_mask). Inference: only with ``masked_inference`` and P_mask > 0, as in the
        official and Hugging Face EoMT.
        """
        if not self.masked_attention:
            return False
        if self.training:
            return True
        return self.masked_inference and self._prob_positive[layer]

    def drop_query_masks(self, query_mask: torch.Tensor, layer: int) -> torch.Tensor:
        """query_mask (B, Q, N) bool, True = may attend; opens a query's row with probability 1 - P_mask."""
        if self._prob_below_one[layer]:
            opened = torch.rand(query_mask.shape[:2], device=query_mask.device) > self.attn_mask_probs[layer]
            query_mask = query_mask | opened[..., None]
        return query_mask

    def forward(self, images: torch.Tensor) -> list[PredictionSet]:  # pragma: no cover - abstract
        raise NotImplementedError

    def param_groups(self, layer_decay: float = 0.8, decay_query_blocks: bool = True
                     ) -> list[ParamGroup]:  # pragma: no cover - abstract
        raise NotImplementedError

    def components(self) -> dict[str, list[nn.Module]]:  # pragma: no cover - abstract
        raise NotImplementedError


def _after_load(module: Segmenter, _incompatible_keys) -> None:
    """``load_state_dict`` (resume, checkpoints) replaced the buffer: the host flags follow it."""
    module._set_host_flags(module.attn_mask_probs)


def backbone_param_groups(model: nn.Module, backbone, layer_decay: float, prefix: str,
                          full_lr_blocks: tuple[int, ...] = ()) -> list[ParamGroup]:
    """Layer-wise lr decay (docs/paper.md section 6): block i of L gets decay^(L-1-i); embeddings get block 0's;
    the final norm and every parameter outside the backbone get the full lr. Blocks in ``full_lr_blocks``
    get the full lr too (the official DINOv3 recipe's ``llrd_l2_enabled: False``: no decay on the query blocks)."""
    groups: dict[tuple[float, bool], ParamGroup] = {}
    ids = backbone.layer_ids()
    depth = backbone.depth
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(prefix):
            layer = ids[name[len(prefix):]]
            scale = layer_decay ** (depth - 1 - layer) if layer < depth and layer not in full_lr_blocks else 1.0
            key = (scale, True)
        else:
            key = (1.0, False)
        if key not in groups:
            tag = f"backbone_x{key[0]:.4g}" if key[1] else "new"
            groups[key] = ParamGroup(tag, [], key[0], key[1])
        groups[key].params.append(p)
    return list(groups.values())
