"""Hungarian matching of predictions to ground-truth masks on point-sampled costs (docs/paper.md section 6).

Mask2Former's matcher: for each image, the cost of assigning query q to ground-truth mask n is

    cost[q, n] = class_weight * (-p_q(class_n)) + mask_weight * BCE(m_q, t_n) + dice_weight * Dice(m_q, t_n)

with p_q the softmax class probabilities and BCE / Dice computed on the same 12,544 points drawn uniformly
in the image (docs/paper.md section 6). SciPy's ``linear_sum_assignment`` solves the assignment.

Points live in normalised [0, 1]^2 coordinates and are read with bilinear ``grid_sample``, so the mask logits
(1/4 of the image) and the target masks (full image) are sampled at the same places without resizing either.
Random numbers are drawn in the same order and shapes as Mask2Former (and the Hugging Face port): one
``torch.rand(1, num_points, 2)`` per image, so a seeded run reproduces their points exactly.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from study.train.config import TrainConfig

_DEFAULTS = TrainConfig()  # the paper's numbers live once, in TrainConfig


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``maps`` (N, C, h, w) at ``coords`` (N, P, 2), (x, y) in [0, 1] -> (N, C, P).

    ``align_corners=False`` as in Mask2Former: coordinate 0 is the left edge of the first pixel, 1 the right
    edge of the last, whatever the resolution of ``maps``.
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # (N, P, 1, 2) in [-1, 1]
    return F.grid_sample(maps, grid, mode="bilinear", align_corners=False).squeeze(3)


def pairwise_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of every prediction against every target: (Q, P), (N, P) -> (Q, N).

    BCE(x, y) = softplus(x) - x * y, so the mean over points of all pairs is one matmul plus a row term.
    """
    num_points = logits.shape[1]
    per_pred = F.softplus(logits).sum(1, keepdim=True)  # (Q, 1): the cost if every label were 0
    return (per_pred - logits @ labels.T) / num_points


def pairwise_dice(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Dice loss 1 - (2|p.y| + 1) / (|p| + |y| + 1) of every prediction against every target -> (Q, N)."""
    probs = logits.sigmoid()
    inter = probs @ labels.T  # (Q, N)
    total = probs.sum(1)[:, None] + labels.sum(1)[None, :]  # (Q, N)
    return 1 - (2 * inter + 1) / (total + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth masks, image by image.

    Args:
        class_weight: weight of the class cost (-probability of the target class); paper: 2.
        mask_weight: weight of the point-sampled BCE cost; paper: 5.
        dice_weight: weight of the point-sampled Dice cost; paper: 5.
        num_points: uniformly sampled points shared by all masks of an image; paper: 12,544.
    """

    def __init__(self, class_weight: float = _DEFAULTS.class_weight, mask_weight: float = _DEFAULTS.mask_weight,
                 dice_weight: float = _DEFAULTS.dice_weight, num_points: int = _DEFAULTS.num_points):
        super().__init__()
        if class_weight == 0 and mask_weight == 0 and dice_weight == 0:
            raise ValueError("the matching costs cannot all be 0")
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, mask_logits: torch.Tensor, class_logits: torch.Tensor, masks: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
        """Costs of one image: mask_logits (Q, h, w), class_logits (Q, C+1), masks (N, H, W) float,
        labels (N,) -> (Q, N)."""
        # Drawn before anything else (also when N = 0) to keep the random stream aligned with Mask2Former.
        coords = torch.rand(1, self.num_points, 2, device=mask_logits.device)  # (1, P, 2)
        num_queries, num_targets = mask_logits.shape[0], masks.shape[0]
        if num_targets == 0:
            return mask_logits.new_zeros(num_queries, 0)
        cost_class = -class_logits.softmax(-1)[:, labels]  # (Q, N); the constant 1 of 1 - p is left out
        pred = point_sample(mask_logits[:, None], coords.expand(num_queries, -1, -1))[:, 0]  # (Q, P)
        target = point_sample(masks[:, None], coords.expand(num_targets, -1, -1))[:, 0]  # (N, P)
        cost = (self.class_weight * cost_class + self.mask_weight * pairwise_bce(pred, target)
                + self.dice_weight * pairwise_dice(pred, target))
        # A non-finite cost (a diverged prediction) is made the largest cost instead of crashing SciPy.
        big = torch.finfo(cost.dtype).max
        return torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)

    @torch.no_grad()
    def forward(self, mask_logits: torch.Tensor, class_logits: torch.Tensor, masks: list[torch.Tensor],
                labels: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match a batch.

        Args:
            mask_logits: (B, Q, h, w).
            class_logits: (B, Q, C + 1).
            masks: per image (N_b, H, W) float targets (any resolution; sampled in normalised coordinates).
            labels: per image (N_b,) int64 classes.

        Returns:
            Per image a pair (query indices, target indices), int64 CPU tensors of length min(Q, N_b);
            query indices ascending, as SciPy returns them.
        """
        out = []
        for b in range(mask_logits.shape[0]):
            cost = self.cost_matrix(mask_logits[b], class_logits[b], masks[b], labels[b])
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out
