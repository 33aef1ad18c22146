"""The mask-classification loss against the Hugging Face oracles (Mask2FormerLoss, EomtLoss, the matcher).

The random point sampling is made identical by seeding: our loss draws the same random numbers in the same
order and shapes as Mask2Former (matcher points per image, then uncertainty candidates and random points per
set, final set first). Matching, every logged part, the total and the gradients must then agree.
"""
from __future__ import annotations

import pytest
import torch
from transformers import EomtConfig, Mask2FormerConfig
from transformers.models.eomt.modeling_eomt import EomtLoss
from transformers.models.mask2former.modeling_mask2former import Mask2FormerHungarianMatcher, Mask2FormerLoss

from study.models.contract import PredictionSet
from study.train.config import TrainConfig
from study.train.loss import MaskClassificationLoss, build_loss
from study.train.matcher import HungarianMatcher

C = 5  # classes
HF_NAMES = {"loss_ce": "loss_cross_entropy", "loss_mask": "loss_mask", "loss_dice": "loss_dice"}


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_config(cls=Mask2FormerConfig):
    t = TrainConfig()
    return cls(num_labels=C, no_object_weight=t.no_object_weight, class_weight=t.class_weight,
               mask_weight=t.mask_weight, dice_weight=t.dice_weight, train_num_points=t.num_points,
               oversample_ratio=t.oversample_ratio, importance_sample_ratio=t.importance_sample_ratio)


def make_sets(num_sets=3, b=2, q=10, h=16):
    """Prediction sets at 1/4 of a 64-pixel image, leaves that collect gradients."""
    return [PredictionSet(torch.randn(b, q, h, h).requires_grad_(), torch.randn(b, q, C + 1).requires_grad_())
            for _ in range(num_sets)]


def make_targets(counts=(3, 5), size=64):
    """Blob-like boolean masks at the full image size (4x the mask logits) and random labels."""
    targets = []
    for n in counts:
        coarse = torch.rand(n, 1, size // 8, size // 8)
        masks = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[:, 0] > 0.6
        targets.append(dict(masks=masks, labels=torch.randint(0, C, (n,))))
    return targets


def run_hf(hf_loss, sets, targets, seed):
    torch.manual_seed(seed)
    aux = [dict(masks_queries_logits=s.mask_logits, class_queries_logits=s.class_logits) for s in sets[:-1]]
    return hf_loss(sets[-1].mask_logits, sets[-1].class_logits, [t["masks"].float() for t in targets],
                   [t["labels"] for t in targets], aux or None)


def hf_parts_renamed(hf_parts):
    out = {}
    for key, value in hf_parts.items():
        for ours, theirs in HF_NAMES.items():
            if key == theirs or key.startswith(theirs + "_"):
                out[ours + key[len(theirs):]] = value
    return out


def weighted_total(parts):
    t = TrainConfig()
    w = {"loss_ce": t.class_weight, "loss_mask": t.mask_weight, "loss_dice": t.dice_weight}
    return sum(w[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] * v for k, v in parts.items())


def recording(forward, log):
    """Wrap a matcher's forward so that each call's matching is appended to ``log``."""
    def wrapped(*args, **kwargs):
        out = forward(*args, **kwargs)
        log.append(out)
        return out
    return wrapped


def grads(sets):
    return [g for s in sets for g in (s.mask_logits.grad.clone(), s.class_logits.grad.clone())]


def zero_grads(sets):
    for s in sets:
        s.mask_logits.grad = None
        s.class_logits.grad = None


@pytest.mark.parametrize("oracle", [Mask2FormerLoss, EomtLoss])
def test_loss_equals_hugging_face_with_every_set_supervised(oracle):
    cfg_cls = Mask2FormerConfig if oracle is Mask2FormerLoss else EomtConfig
    hf = oracle(hf_config(cfg_cls), weight_dict={})
    ours = build_loss(TrainConfig(), C)
    sets, targets = make_sets(), make_targets()
    ours.matcher.forward = recording(ours.matcher.forward, our_matches := [])
    hf.matcher.forward = recording(hf.matcher.forward, hf_matches := [])
    torch.manual_seed(0)
    total, parts = ours(sets, targets)
    total.backward()
    our_grads = grads(sets)
    zero_grads(sets)

    hf_parts = hf_parts_renamed(run_hf(hf, sets, targets, seed=0))
    # The same matching for every set (3 sets x 2 images), in the same order.
    assert len(our_matches) == len(hf_matches) == 3
    for mine, theirs in zip(our_matches, hf_matches):
        for (r1, c1), (r2, c2) in zip(mine, theirs):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)
    assert set(parts) == set(hf_parts) == {f"{k}{s}" for k in HF_NAMES for s in ("", "_0", "_1")}
    for key in parts:
        torch.testing.assert_close(parts[key], hf_parts[key].detach(), rtol=1e-5, atol=1e-6, msg=key)
    hf_total = weighted_total(hf_parts)
    torch.testing.assert_close(total.detach(), hf_total.detach(), rtol=1e-5, atol=1e-6)
    hf_total.backward()
    for mine, theirs in zip(our_grads, grads(sets)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7)
    # Each set has its own matching: the intermediate sets' losses differ from the final set's.
    assert parts["loss_ce_0"] != parts["loss_ce"] and parts["loss_dice_1"] != parts["loss_dice"]


def test_matching_equals_hugging_face_matcher():
    t = TrainConfig()
    hf = Mask2FormerHungarianMatcher(cost_class=t.class_weight, cost_mask=t.mask_weight, cost_dice=t.dice_weight,
                                     num_points=t.num_points)
    ours = HungarianMatcher()
    (pred,), targets = make_sets(num_sets=1, b=3, q=12), make_targets(counts=(4, 0, 9))
    masks = [x["masks"].float() for x in targets]
    labels = [x["labels"] for x in targets]
    torch.manual_seed(3)
    mine = ours(pred.mask_logits, pred.class_logits, masks, labels)
    torch.manual_seed(3)
    theirs = hf(pred.mask_logits, pred.class_logits, masks, labels)
    for (r1, c1), (r2, c2), n in zip(mine, theirs, (4, 0, 9)):
        assert len(r1) == n
        assert torch.equal(r1, r2) and torch.equal(c1, c2)


def test_image_without_masks_matches_hugging_face_and_empty_batch_trains_classes():
    hf = Mask2FormerLoss(hf_config(), weight_dict={})
    ours = MaskClassificationLoss(C)
    sets, targets = make_sets(num_sets=1), make_targets(counts=(0, 4))
    torch.manual_seed(5)
    _, parts = ours(sets, targets)
    hf_parts = hf_parts_renamed(run_hf(hf, sets, targets, seed=5))
    for key in parts:
        torch.testing.assert_close(parts[key], hf_parts[key].detach(), rtol=1e-5, atol=1e-6)

    # No ground truth at all: masks unsupervised (0), every query pushed to no-object, still differentiable.
    sets = make_sets(num_sets=2)
    total, parts = ours(sets, make_targets(counts=(0, 0)))
    assert parts["loss_mask"] == 0 and parts["loss_dice"] == 0
    nll = -sets[-1].class_logits.detach().log_softmax(-1)[..., C].mean()
    torch.testing.assert_close(parts["loss_ce"], nll)
    total.backward()
    assert sets[-1].class_logits.grad.abs().sum() > 0
    assert sets[-1].mask_logits.grad is not None and sets[-1].mask_logits.grad.abs().sum() == 0


def test_targets_at_full_resolution_are_sampled_where_the_logits_are():
    """A prediction equal to the target at 1/4 resolution scores a near-zero mask loss; the same
    prediction transposed does not. Wrong coordinate handling (e.g. pixel coordinates of the wrong map)
    breaks the first."""
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 8:40, 16:56] = True  # aligned to the 4-pixel grid
    target = dict(masks=masks, labels=torch.tensor([1]))
    logits = torch.full((1, 1, 16, 16), -20.0)
    logits[0, 0, 2:10, 4:14] = 20.0
    classes = torch.zeros(1, 1, C + 1)
    ours = MaskClassificationLoss(C, num_points=4096, importance_sample_ratio=0.0)  # uniform points
    _, good = ours([PredictionSet(logits, classes)], [target])
    _, bad = ours([PredictionSet(logits.transpose(2, 3).contiguous(), classes)], [target])
    assert good["loss_dice"] < 0.02 and bad["loss_dice"] > 0.5
    assert good["loss_mask"] < 0.5 * bad["loss_mask"]


def test_mask_losses_are_normalised_by_masks_averaged_over_processes(monkeypatch):
    ours = MaskClassificationLoss(C)
    sets, targets = make_sets(num_sets=1), make_targets(counts=(3, 5))
    torch.manual_seed(1)
    _, single = ours(sets, targets)

    # Fake a 2-process group in which the other process holds 12 masks: (8 + 12) / 2 = 10 per process.
    import torch.distributed as dist

    def all_reduce(t, *a, **k):
        t.add_(12.0)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    torch.manual_seed(1)
    _, multi = ours(sets, targets)
    for key in ("loss_mask", "loss_dice"):
        torch.testing.assert_close(multi[key], single[key] * 8 / 10)
    torch.testing.assert_close(multi["loss_ce"], single["loss_ce"])  # CE is a weighted mean, unaffected


def test_loss_runs_in_float32_under_mixed_precision():
    ours = MaskClassificationLoss(C)
    sets, targets = make_sets(num_sets=2), make_targets()
    half = [PredictionSet(s.mask_logits.bfloat16(), s.class_logits.bfloat16()) for s in sets]
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = ours(half, targets)
    torch.manual_seed(2)
    ref_total, _ = ours([PredictionSet(s.mask_logits.float(), s.class_logits.float()) for s in half], targets)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, ref_total)
    total.backward()
    assert sets[0].mask_logits.grad is not None


def test_defaults_are_the_papers_and_the_hugging_face_eomt_config():
    t, e = TrainConfig(), EomtConfig()
    assert (t.class_weight, t.mask_weight, t.dice_weight, t.no_object_weight) == (2.0, 5.0, 5.0, 0.1)
    assert (t.num_points, t.oversample_ratio, t.importance_sample_ratio) == (12544, 3.0, 0.75)
    assert (e.class_weight, e.mask_weight, e.dice_weight, e.no_object_weight) == (2.0, 5.0, 5.0, 0.1)
    assert (e.train_num_points, e.oversample_ratio, e.importance_sample_ratio) == (12544, 3.0, 0.75)
    loss = MaskClassificationLoss(C)
    assert loss.class_weights.tolist() == [1.0] * C + [pytest.approx(0.1)]
    assert "class_weights" not in loss.state_dict()  # never mixed into model checkpoints


@pytest.mark.parametrize("bad, message", [
    (lambda t: t[:1], "targets for a batch"),
    (lambda t: [dict(masks=t[0]["masks"], labels=t[0]["labels"][:1]), t[1]], "masks must be"),
    (lambda t: [dict(masks=t[0]["masks"], labels=t[0]["labels"] + C), t[1]], "labels must be in"),
    (lambda t: [dict(labels=t[0]["labels"]), t[1]], "must be a dict"),
])
def test_bad_targets_give_a_readable_error(bad, message):
    with pytest.raises(ValueError, match=message):
        MaskClassificationLoss(C)(make_sets(num_sets=1), bad(make_targets()))
