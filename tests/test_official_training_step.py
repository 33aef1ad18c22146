"""One training step against the official code (issue 27 item 4): the official module's ``training_step``
(panoptic, instance and semantic: the same inherited step with each task's module and criterion) against our
model + loss + optimiser on the same batch and the same weights, in training mode with P_mask in (0, 1).

Making the random draws equal:
- the forward: both models draw the same (B, Q) uniforms per masked layer in the same order
  (tests/test_official_model.py); both are seeded alike before the forward;
- the point sampling: the official step runs the criterion set by set in the model's order (earliest
  intermediate set first), ours final set first (Mask2Former's and Hugging Face's order, which
  tests/test_train_loss.py holds us to). So each side's matcher is wrapped to reseed at the start of each
  prediction set, keyed by the set's index: every set then draws the same matching points and the same
  uncertainty candidates on both sides. (The order of the draws is the one difference: it changes which
  random points a set gets, not their distribution; docs/official.md.)

``self.log`` is stubbed (no Trainer). Compared: every loss term of every prediction set and the total (1e-5
relative), every parameter's gradient (1e-5 absolute on gradients of order 1e-2..1), and the parameters after
one AdamW step with the official gradient clipping (global norm 0.01): Adam's first step moves each weight by
about lr * sign(gradient), so they agree to 1e-6 (1 % of lr = 1e-4) wherever the gradient is not zero to
rounding.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from official_oracle import official
from study.train.config import TrainConfig
from study.train.loss import MaskClassificationLoss
from study.train.optim import build_optimizer, clip_gradients
from study.train.schedules import build_lr_scheduler
from test_official_model import NUM_CLASSES, pair
from test_official_optim import our_name

POINTS, IMG, LR = 256, 32, 1e-4
MODULES = {"panoptic": ("training.mask_classification_panoptic", "MaskClassificationPanoptic"),
           "instance": ("training.mask_classification_instance", "MaskClassificationInstance"),
           "semantic": ("training.mask_classification_semantic", "MaskClassificationSemantic")}


class Reseed(nn.Module):
    """A matcher that reseeds the global generator before matching prediction set k (k from its tensor)."""

    def __init__(self, matcher, index_of: dict):
        super().__init__()
        self.inner, self.index_of = matcher, index_of

    def forward(self, *args, **kw):
        logits = kw.get("masks_queries_logits", args[0] if args else None)
        torch.manual_seed(1000 + self.index_of[id(logits)])
        return self.inner(*args, **kw)


def targets_for(task: str, g: torch.Generator) -> list[dict]:
    """Per image: instance / panoptic: a few overlapping-free random masks; semantic: one mask per class
    present, partitioning the labelled pixels (as a semantic reader gives them)."""
    out = []
    for n in (3, 2):
        owner = torch.randint(0, n + 1, (IMG // 8, IMG // 8), generator=g).repeat_interleave(8, 0)
        owner = owner.repeat_interleave(8, 1)  # blocks of 8 x 8 pixels; n = unlabelled
        masks = torch.stack([owner == k for k in range(n)])
        labels = torch.randperm(NUM_CLASSES, generator=g)[:n] if task == "semantic" else \
            torch.randint(0, NUM_CLASSES, (n,), generator=g)
        out.append({"masks": masks, "labels": labels, "is_crowd": torch.zeros(n, dtype=torch.bool)})
    return out


def official_module(task: str, network):
    mod = getattr(official(MODULES[task][0]), MODULES[task][1])
    extra = {"stuff_classes": [3, 4]} if task == "panoptic" else {}
    m = mod(network=network, img_size=(IMG, IMG), num_classes=NUM_CLASSES, attn_mask_annealing_enabled=False,
            num_points=POINTS, warmup_steps=[0, 0], **extra)
    m.log = lambda *a, **k: None  # no Trainer
    return m


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_one_training_step_equals_the_official(task, one_thread):
    off, ours = pair("tiny", img=IMG)
    module = official_module(task, off)
    probs = [0.4, 0.7]
    off.attn_mask_probs.copy_(torch.tensor(probs))
    ours.set_mask_probs(probs)
    module.train(), ours.train()
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (2, 3, IMG, IMG), generator=g, dtype=torch.uint8)
    targets = targets_for(task, g)

    # the official step
    torch.manual_seed(11)
    index_of = {}
    forward = module.network.forward

    def keyed_forward(x):
        m, c = forward(x)
        index_of.update({id(t): k for k, t in enumerate(m)})
        return m, c

    module.network.forward = keyed_forward
    module.criterion.matcher = Reseed(module.criterion.matcher, index_of)
    logged = {}
    module.log = lambda name, value, **k: logged.__setitem__(name, value.detach())
    loss_official = module.training_step((images, targets), 0)
    loss_official.backward()

    # ours
    criterion = MaskClassificationLoss(NUM_CLASSES, num_points=POINTS)
    torch.manual_seed(11)
    sets = ours(images.float() / 255)
    our_index = {id(s.mask_logits): k for k, s in enumerate(sets)}
    criterion.matcher = Reseed(criterion.matcher, our_index)
    loss_ours, parts = criterion(sets, [{"masks": t["masks"], "labels": t["labels"]} for t in targets])
    loss_ours.backward()

    # loss terms of every prediction set: official "losses/train_loss_mask_block_-2" = our "loss_mask_0", ...
    n = len(sets)
    names = {"loss_mask": "loss_mask", "loss_dice": "loss_dice", "loss_cross_entropy": "loss_ce"}
    compared = 0
    for key, value in logged.items():
        if key == "losses/train_loss_total":
            continue
        term = key.removeprefix("losses/train_")
        base, _, block = term.partition("_block_")
        ours_key = names[base] + ("" if not block else f"_{n - 1 + int(block)}")
        torch.testing.assert_close(parts[ours_key], value, rtol=1e-5, atol=1e-7, msg=f"{key} vs {ours_key}")
        compared += 1
    assert compared == 3 * n
    torch.testing.assert_close(loss_ours, loss_official, rtol=1e-5, atol=0)

    # every gradient
    grads = {our_name(k): p.grad for k, p in module.named_parameters()}
    for name, p in ours.named_parameters():
        assert p.grad is not None and grads[name] is not None, name
        torch.testing.assert_close(p.grad, grads[name], rtol=0, atol=1e-5, msg=name)

    # one AdamW step with the official clipping and schedule (warm-ups 0 so that step 0 moves every weight)
    conf = module.configure_optimizers.__func__(type("M", (), {
        "network": module.network, "named_parameters": module.named_parameters, "lr": module.lr,
        "llrd": module.llrd, "lr_mult": 1.0, "llrd_l2_enabled": True, "weight_decay": module.weight_decay,
        "warmup_steps": (0, 0), "poly_power": module.poly_power,
        "trainer": type("T", (), {"estimated_stepping_batches": 10})})())
    torch.nn.utils.clip_grad_norm_([p for p in module.parameters()], 0.01)
    conf["optimizer"].step()
    cfg = TrainConfig(warmup_steps=0, backbone_warmup_steps=0)
    opt = build_optimizer(ours, cfg)
    build_lr_scheduler(opt, cfg, 10)
    clip_gradients(opt, 0.01)
    opt.step()
    after = {our_name(k): p.detach() for k, p in module.named_parameters()}
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.detach(), after[name], rtol=0, atol=1e-6, msg=name)
