"""Post-processing of one image's final prediction set into a panoptic, instance or semantic result.

Exactly docs/paper.md section 7 (Mask2Former's inference, which EoMT reuses). Inputs are at the original
image resolution: ``mask_logits (Q, H, W)``, ``class_logits (Q, C + 1)`` with no-object last. The
thresholds come from :class:`study.eval.config.EvalConfig` (the paper's numbers live there, once).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

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


# A chunk of queries' mask logits at the original resolution: (first query, (c, H, W)); chunks come in query
# order and cover every query once (study/eval/inference.py iter_query_chunks).
Chunks = Iterable[tuple[int, torch.Tensor]]


def _one_chunk(mask_logits: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    return [(0, mask_logits)]


def panoptic_merge(mask_logits: torch.Tensor, class_logits: torch.Tensor, is_thing: list[bool],
                   score_threshold: float, overlap_threshold: float, mask_threshold: float) -> PanopticResult:
    """Mask2Former's panoptic merge of every query's mask logits (Q, H, W): :func:`panoptic_merge_chunks`
    on one chunk."""
    return panoptic_merge_chunks(_one_chunk(mask_logits), class_logits, tuple(mask_logits.shape[-2:]), is_thing,
                                 score_threshold, overlap_threshold, mask_threshold)


def panoptic_merge_chunks(chunks: Chunks, class_logits: torch.Tensor, hw: tuple[int, int], is_thing: list[bool],
                          score_threshold: float, overlap_threshold: float, mask_threshold: float) -> PanopticResult:
    """Mask2Former's panoptic merge, reading the mask logits a chunk of queries at a time.

    Keep queries whose top class (softmax over C + 1) is not no-object and whose score > score_threshold;
    every pixel goes to argmax_q(score_q * sigmoid(m_q)); a kept query's segment is its pixels that also have
    sigmoid >= mask_threshold; a query is dropped when (pixels it wins) / (pixels with sigmoid >=
    mask_threshold) < overlap_threshold; stuff of one class merges into one segment; the rest is void.

    Only (H, W) maps persist across chunks: the running best value, its query, and whether that query's
    sigmoid is >= mask_threshold there; per query, its area above the threshold. A later query takes a pixel
    only with a strictly larger value, so ties go to the first query as in argmax over all queries at once, and
    every value is the same product as in the whole-set computation: the result is identical (exact by
    construction, given chunks that are themselves exact: study/eval/inference.py; docs/exactness.md).
    """
    num_classes = class_logits.shape[-1] - 1
    scores, labels = F.softmax(class_logits.float(), dim=-1).max(-1)  # (Q,), (Q,)
    keep = (labels != num_classes) & (scores > score_threshold)
    h, w = hw
    device = class_logits.device
    ids = torch.zeros(h, w, dtype=torch.int64, device=device)
    segments: list[dict] = []
    if not bool(keep.any()):
        return PanopticResult(ids, segments)
    kept_q = keep.nonzero()[:, 0]  # kept queries in query order; k = their rank
    num_kept = len(kept_q)
    best = winner = winner_above = None
    above_area = torch.zeros(num_kept, dtype=torch.int64, device=device)
    k0 = 0  # rank of the chunk's first kept query
    for q0, m in chunks:
        sel = keep[q0:q0 + m.shape[0]]
        if not bool(sel.any()):
            continue
        probs = m[sel].float().sigmoid()  # (k, H, W)
        n = probs.shape[0]
        above = probs >= mask_threshold
        above_area[k0:k0 + n] = above.flatten(1).sum(1)
        value, local = (scores[kept_q[k0:k0 + n], None, None] * probs).max(0)  # first max within the chunk
        local_above = above.gather(0, local[None])[0]
        if best is None:
            best, winner, winner_above = value, local + k0, local_above
        else:
            take = value > best  # strictly: an earlier query keeps a tie
            best = torch.where(take, value, best)
            winner = torch.where(take, local + k0, winner)
            winner_above = torch.where(take, local_above, winner_above)
        k0 += n
    if k0 != num_kept:
        raise RuntimeError(f"the mask chunks covered {k0} of the {num_kept} kept queries")
    won_area = torch.bincount(winner.flatten(), minlength=num_kept).tolist()
    mask_area = torch.bincount(winner[winner_above], minlength=num_kept).tolist()
    above_list = above_area.tolist()
    scores, labels = scores[kept_q].tolist(), labels[kept_q].tolist()
    segment_of = [0] * num_kept  # segment id of each kept query's pixels (0: dropped, void)
    stuff_ids: dict[int, int] = {}
    for k in range(num_kept):
        label = labels[k]
        if won_area[k] == 0 or above_list[k] == 0 or mask_area[k] == 0:
            continue
        if won_area[k] / above_list[k] < overlap_threshold:
            continue
        thing = bool(is_thing[label])
        if not thing and label in stuff_ids:  # stuff of a class already placed: merge into its segment
            segment_of[k] = stuff_ids[label]
            continue
        seg_id = len(segments) + 1
        if not thing:
            stuff_ids[label] = seg_id
        segment_of[k] = seg_id
        segments.append({"id": seg_id, "label": label, "isthing": thing, "score": scores[k]})
    lut = torch.tensor(segment_of, dtype=torch.int64, device=device)
    ids = torch.where(winner_above, lut[winner], ids)
    return PanopticResult(ids, segments)


def instance_topk(mask_logits: torch.Tensor, class_logits: torch.Tensor, top_k: int) -> InstanceResult:
    """Mask2Former's instance inference on every query's mask logits (Q, H, W): :func:`instance_topk_chunks`
    on one chunk."""
    return instance_topk_chunks(_one_chunk(mask_logits), class_logits, tuple(mask_logits.shape[-2:]), top_k)


def instance_topk_chunks(chunks: Chunks, class_logits: torch.Tensor, hw: tuple[int, int],
                         top_k: int) -> InstanceResult:
    """Mask2Former's instance inference, reading the mask logits a chunk of queries at a time.

    Class scores = softmax over C + 1 without the no-object column, ranked over all (query, class) pairs;
    the ``top_k`` best each give one instance: mask = logit > 0, score = class score x mean sigmoid inside
    the mask. Only the selected queries' binary masks are kept (bool, K x H x W); each selected query's
    mean is computed once, on its own row, as the whole-set computation does.
    """
    q, c1 = class_logits.shape
    num_classes = c1 - 1
    probs = F.softmax(class_logits.float(), dim=-1)[:, :num_classes]  # (Q, C)
    k = min(top_k, probs.numel())
    top_scores, flat = probs.flatten().topk(k, sorted=True)  # over queries x classes
    labels = flat % num_classes
    queries = flat // num_classes
    device = class_logits.device
    masks = torch.empty(k, *hw, dtype=torch.bool, device=device)
    mask_prob = torch.empty(k, device=device)
    for q0, m in chunks:
        inside = (queries >= q0) & (queries < q0 + m.shape[0])
        if not bool(inside.any()):
            continue
        rows = inside.nonzero()[:, 0]
        uniq, where = torch.unique(queries[rows] - q0, return_inverse=True)
        logits = m[uniq].float()  # (u, H, W): each selected query once
        if len(uniq) == 1:  # a reduction over one row may split that row across threads: keep >= 2 rows
            logits = logits.expand(2, *logits.shape[1:])
        on = logits > 0
        prob = (logits.sigmoid() * on).flatten(1).sum(1) / (on.flatten(1).sum(1) + _EPS)
        masks[rows] = on[where]
        mask_prob[rows] = prob[where]
    return InstanceResult(masks, labels, top_scores * mask_prob)


def semantic_logits(mask_logits: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class logits (C, H, W) = sum_q softmax_q[:C] * sigmoid(m_q)."""
    num_classes = class_logits.shape[-1] - 1
    probs = F.softmax(class_logits.float(), dim=-1)[:, :num_classes]  # (Q, C)
    return torch.einsum("qc,qhw->chw", probs, mask_logits.float().sigmoid())
