"""Post-processing of one image's final prediction set into a panoptic, instance or semantic result.

Exactly docs/paper.md section 7 (Mask2Former's inference, which EoMT reuses). Inputs are at the original
image resolution: ``mask_logits (Q, H, W)``, ``class_logits (Q, C + 1)`` with no-object last. The
thresholds come from :class:`study.eval.config.EvalConfig` (the paper's numbers live there, once).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

# Mask2Former's guard against an empty mask in the mean mask probability (instance score); not a paper number.
_EPS = 1e-6


@dataclass
class PanopticResult:
    ids: torch.Tensor  # int64 (H, W), 0 = void, 1..N = segments
    segments: list[dict]  # {"id", "label" (contiguous class), "isthing", "score"}


@dataclass
class InstanceResult:
    masks: torch.Tensor  # bool (K, H, W), K <= top_k
    labels: torch.Tensor  # int64 (K,), contiguous classes
    scores: torch.Tensor  # float (K,), class score x mean mask probability inside the mask


def panoptic_merge(mask_logits: torch.Tensor, class_logits: torch.Tensor, is_thing: list[bool],
                   score_threshold: float, overlap_threshold: float, mask_threshold: float) -> PanopticResult:
    """Mask2Former's panoptic merge.

    Keep queries whose top class (softmax over C + 1) is not no-object and whose score > score_threshold;
    every pixel goes to argmax_q(score_q * sigmoid(m_q)); a kept query's segment is its pixels that also have
    sigmoid >= mask_threshold; a query is dropped when (pixels it wins) / (pixels with sigmoid >=
    mask_threshold) < overlap_threshold; stuff of one class merges into one segment; the rest is void.
    """
    num_classes = class_logits.shape[-1] - 1
    scores, labels = F.softmax(class_logits.float(), dim=-1).max(-1)  # (Q,), (Q,)
    keep = (labels != num_classes) & (scores > score_threshold)
    h, w = mask_logits.shape[-2:]
    ids = torch.zeros(h, w, dtype=torch.int64, device=mask_logits.device)
    segments: list[dict] = []
    if not bool(keep.any()):
        return PanopticResult(ids, segments)
    scores, labels = scores[keep], labels[keep]
    probs = mask_logits[keep].float().sigmoid()  # (K, H, W)
    winner = (scores[:, None, None] * probs).argmax(0)  # (H, W) index into the kept queries
    stuff_ids: dict[int, int] = {}
    for k in range(len(labels)):
        label = int(labels[k])
        won = winner == k
        won_area = int(won.sum())
        above = probs[k] >= mask_threshold
        above_area = int(above.sum())
        mask = won & above
        if won_area == 0 or above_area == 0 or not bool(mask.any()):
            continue
        if won_area / above_area < overlap_threshold:
            continue
        thing = bool(is_thing[label])
        if not thing and label in stuff_ids:  # stuff of a class already placed: merge into its segment
            ids[mask] = stuff_ids[label]
            continue
        seg_id = len(segments) + 1
        if not thing:
            stuff_ids[label] = seg_id
        ids[mask] = seg_id
        segments.append({"id": seg_id, "label": label, "isthing": thing, "score": float(scores[k])})
    return PanopticResult(ids, segments)


def instance_topk(mask_logits: torch.Tensor, class_logits: torch.Tensor, top_k: int) -> InstanceResult:
    """Mask2Former's instance inference.

    Class scores = softmax over C + 1 without the no-object column, ranked over all (query, class) pairs;
    the ``top_k`` best each give one instance: mask = logit > 0, score = class score x mean sigmoid inside
    the mask.
    """
    q, c1 = class_logits.shape
    num_classes = c1 - 1
    probs = F.softmax(class_logits.float(), dim=-1)[:, :num_classes]  # (Q, C)
    k = min(top_k, probs.numel())
    top_scores, flat = probs.flatten().topk(k, sorted=True)  # over queries x classes
    labels = flat % num_classes
    queries = flat // num_classes
    logits = mask_logits[queries].float()  # (K, H, W)
    masks = logits > 0
    mask_prob = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + _EPS)
    return InstanceResult(masks, labels, top_scores * mask_prob)


def semantic_logits(mask_logits: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class logits (C, H, W) = sum_q softmax_q[:C] * sigmoid(m_q)."""
    num_classes = class_logits.shape[-1] - 1
    probs = F.softmax(class_logits.float(), dim=-1)[:, :num_classes]  # (Q, C)
    return torch.einsum("qc,qhw->chw", probs, mask_logits.float().sigmoid())
