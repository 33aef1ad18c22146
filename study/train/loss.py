"""The mask-classification loss of Mask2Former, used by EoMT and every baseline (docs/paper.md section 6).

For each prediction set (every masked layer's intermediate prediction and the final one), on its own:

1. match queries to ground-truth masks (``HungarianMatcher``, point-sampled costs);
2. cross-entropy of all queries' class logits, unmatched queries labelled no-object with weight 0.1;
3. BCE and Dice of the matched queries' mask logits on 12,544 points per mask, 75 % of them the most
   uncertain (|logit| smallest) of 3 x 12,544 random candidates and the rest uniformly random;
4. BCE and Dice summed over masks and divided by the number of ground-truth masks in the batch, averaged
   over processes (``torch.distributed.all_reduce`` when a process group is initialised).

total = sum over sets of (2 * CE + 5 * BCE + 5 * Dice), as the official ``loss_total``.

With gradient accumulation each micro-batch is normalised by its own mask count (averaged over processes);
the loop divides the total by the number of micro-batches, as Lightning's ``accumulate_grad_batches`` does.

The sets are processed final set first, then the intermediate ones in order, as Mask2Former's criterion
does (outputs, then ``aux_outputs``): with the same seed a run draws exactly the points the Hugging Face
``Mask2FormerLoss`` draws, which is how tests/test_train_loss.py holds this module against it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from study.models.contract import PredictionSet
from study.train.config import TrainConfig
from study.train.matcher import HungarianMatcher, point_sample

_DEFAULTS = TrainConfig()  # the paper's numbers live once, in TrainConfig


def sample_points_by_uncertainty(logits: torch.Tensor, num_points: int, oversample_ratio: float,
                                 importance_sample_ratio: float) -> torch.Tensor:
    """PointRend-style point selection: logits (M, 1, h, w) -> coordinates (M, num_points, 2) in [0, 1].

    ``int(num_points * oversample_ratio)`` random candidates per mask; the ``int(importance_sample_ratio *
    num_points)`` with the smallest |logit| (most uncertain) are kept, the rest of the points are drawn
    uniformly. Same draws, in the same order, as Mask2Former.
    """
    num_masks = logits.shape[0]
    candidates = torch.rand(num_masks, int(num_points * oversample_ratio), 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()  # (M, K): highest = closest to 0
    num_uncertain = int(importance_sample_ratio * num_points)
    top = uncertainty.topk(num_uncertain, dim=1).indices  # (M, k)
    coords = candidates.gather(1, top[..., None].expand(-1, -1, 2))  # (M, k, 2)
    num_random = num_points - num_uncertain
    if num_random > 0:
        coords = torch.cat([coords, torch.rand(num_masks, num_random, 2, device=logits.device)], dim=1)
    return coords


def average_num_masks(num_masks: int, device: torch.device) -> torch.Tensor:
    """Ground-truth masks of this process, averaged over all processes, at least 1 (a float tensor)."""
    n = torch.as_tensor(float(num_masks), device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)  # sum over processes
        world = dist.get_world_size()
    return torch.clamp(n / world, min=1)


class MaskClassificationLoss(nn.Module):
    """Set criterion: Hungarian matching, then CE + point BCE + point Dice for every prediction set.

    Args:
        num_classes: C; class logits have C + 1 entries, the last one no-object.
        class_weight, mask_weight, dice_weight: matching costs and loss weights (paper: 2, 5, 5).
        no_object_weight: cross-entropy weight of the no-object class (paper: 0.1).
        num_points: points per mask for matching and for the mask losses (paper: 12,544).
        oversample_ratio: candidate points per kept point for uncertainty sampling (paper: 3).
        importance_sample_ratio: share of points chosen by uncertainty (paper: 0.75).

    Call with ``(prediction_sets, targets)``: the model's list of :class:`PredictionSet` (mask logits
    (B, Q, h, w) at any resolution, class logits (B, Q, C + 1)) and per image a dict with ``masks``
    (N, H, W) bool or float at the image size and ``labels`` (N,) int64. Returns ``(total, parts)``: the
    weighted total to back-propagate and a dict of detached parts ``loss_ce``, ``loss_mask``, ``loss_dice``
    of the final set and ``loss_ce_{i}``, ... of intermediate set i (0 = earliest).
    """

    def __init__(self, num_classes: int, class_weight: float = _DEFAULTS.class_weight,
                 mask_weight: float = _DEFAULTS.mask_weight, dice_weight: float = _DEFAULTS.dice_weight,
                 no_object_weight: float = _DEFAULTS.no_object_weight, num_points: int = _DEFAULTS.num_points,
                 oversample_ratio: float = _DEFAULTS.oversample_ratio,
                 importance_sample_ratio: float = _DEFAULTS.importance_sample_ratio):
        super().__init__()
        self.num_classes = num_classes
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        # Not part of any model checkpoint (the official `criterion.empty_weight` is dropped on load).
        self.register_buffer("class_weights", class_weights, persistent=False)

    # ------------------------------------------------------------------------------------------ parts

    def loss_classes(self, class_logits: torch.Tensor, labels: list[torch.Tensor],
                     indices: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Weighted cross-entropy over all B x Q queries; unmatched queries target no-object (index C)."""
        b, q, _ = class_logits.shape
        target = torch.full((b, q), self.num_classes, dtype=torch.int64, device=class_logits.device)
        for i, (rows, cols) in enumerate(indices):
            target[i, rows.to(target.device)] = labels[i][cols.to(labels[i].device)].to(target.device)
        # Weighted mean: sum_i w_i * nll_i / sum_i w_i, as nn.CrossEntropyLoss(weight=...).
        weight = self.class_weights.to(class_logits.device)  # works even if the loss was never .to(device)
        return F.cross_entropy(class_logits.transpose(1, 2), target, weight=weight)

    def loss_masks(self, mask_logits: torch.Tensor, masks: list[torch.Tensor],
                   indices: list[tuple[torch.Tensor, torch.Tensor]], num_masks: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Point BCE and Dice of the matched queries, summed over masks and divided by ``num_masks``."""
        device = mask_logits.device
        batch_idx = torch.cat([torch.full_like(rows, i) for i, (rows, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([rows for rows, _ in indices]).to(device)
        if query_idx.numel() == 0:  # no ground truth in the batch: nothing to supervise, keep the graph
            zero = mask_logits.sum() * 0
            return zero, zero
        pred = mask_logits[batch_idx, query_idx][:, None]  # (M, 1, h, w), matched queries image by image
        with torch.no_grad():
            coords = sample_points_by_uncertainty(pred, self.num_points, self.oversample_ratio,
                                                  self.importance_sample_ratio)  # (M, P, 2)
            # Target values at the same normalised places (bilinear, so fractional at mask borders),
            # image by image to avoid stacking every full-resolution mask of the batch.
            point_labels, start = [], 0
            for (_, cols), m in zip(indices, masks):
                n = cols.numel()
                if n:
                    target = m[cols.to(m.device)][:, None]  # (n, 1, H, W)
                    point_labels.append(point_sample(target, coords[start:start + n])[:, 0])
                start += n
            point_labels = torch.cat(point_labels)  # (M, P)
        point_logits = point_sample(pred, coords)[:, 0]  # (M, P), differentiable
        bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(1)
        probs = point_logits.sigmoid()
        dice = 1 - (2 * (probs * point_labels).sum(1) + 1) / (probs.sum(1) + point_labels.sum(1) + 1)
        return bce.sum() / num_masks, dice.sum() / num_masks

    # ------------------------------------------------------------------------------------------ call

    def check_targets(self, batch_size: int, targets: list[dict]) -> None:
        if len(targets) != batch_size:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch_size} images")
        for i, t in enumerate(targets):
            if "masks" not in t or "labels" not in t:
                raise ValueError(f"target {i} must be a dict with 'masks' (N, H, W) and 'labels' (N,)")
            masks, labels = t["masks"], t["labels"]
            if masks.dim() != 3 or labels.dim() != 1 or masks.shape[0] != labels.shape[0]:
                raise ValueError(f"target {i}: masks must be (N, H, W) and labels (N,), got "
                                 f"{tuple(masks.shape)} and {tuple(labels.shape)}")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"target {i}: labels must be in 0..{self.num_classes - 1}, got "
                                 f"{labels.min().item()}..{labels.max().item()}")

    def forward(self, prediction_sets: list[PredictionSet], targets: list[dict]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not prediction_sets:
            raise ValueError("the model returned no prediction set")
        first = prediction_sets[-1].mask_logits
        self.check_targets(first.shape[0], targets)
        labels = [t["labels"].to(first.device, torch.int64) for t in targets]
        num_masks = average_num_masks(sum(len(x) for x in labels), first.device)
        parts: dict[str, torch.Tensor] = {}
        total = first.new_zeros((), dtype=torch.float32)
        # Final set first, then intermediate sets 0..n-2: Mask2Former's order (see module docstring).
        order = [len(prediction_sets) - 1] + list(range(len(prediction_sets) - 1))
        # In float32 even under mixed precision: point sampling, softmax and Dice are sensitive to rounding.
        with torch.autocast(first.device.type, enabled=False):
            masks = [t["masks"].to(first.device, torch.float32) for t in targets]
            for k in order:
                mask_logits = prediction_sets[k].mask_logits.float()
                class_logits = prediction_sets[k].class_logits.float()
                indices = self.matcher(mask_logits, class_logits, masks, labels)
                bce, dice = self.loss_masks(mask_logits, masks, indices, num_masks)
                ce = self.loss_classes(class_logits, labels, indices)
                total = total + self.class_weight * ce + self.mask_weight * bce + self.dice_weight * dice
                suffix = "" if k == len(prediction_sets) - 1 else f"_{k}"
                parts.update({f"loss_ce{suffix}": ce.detach(), f"loss_mask{suffix}": bce.detach(),
                              f"loss_dice{suffix}": dice.detach()})
        return total, parts


def build_loss(cfg: TrainConfig, num_classes: int) -> MaskClassificationLoss:
    """The loss a :class:`TrainConfig` describes."""
    return MaskClassificationLoss(num_classes, class_weight=cfg.class_weight, mask_weight=cfg.mask_weight,
                                  dice_weight=cfg.dice_weight, no_object_weight=cfg.no_object_weight,
                                  num_points=cfg.num_points, oversample_ratio=cfg.oversample_ratio,
                                  importance_sample_ratio=cfg.importance_sample_ratio)
