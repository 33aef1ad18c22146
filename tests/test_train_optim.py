"""AdamW with layer-wise lr decay from the model's groups, clipping, accumulation, and a tiny EoMT that
learns a fixed synthetic batch with the loss, optimiser and schedules of study.train."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from study.config import load_config
from study.models.build import build_model
from study.models.contract import ParamGroup
from study.train.config import TrainConfig
from study.train.loss import build_loss
from study.train.optim import accumulation_steps, build_optimizer, checked_param_groups, clip_gradients
from study.train.schedules import build_lr_scheduler, build_mask_annealing

TINY = ["model.size=tiny", "model.img_size=64", "model.num_classes=3", "model.num_queries=6"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_eomt(overrides=()):
    cfg = load_config(None, TINY + list(overrides))
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


def test_groups_get_layer_decayed_lr_weight_decay_and_backbone_flag():
    cfg, model = tiny_eomt()
    opt = build_optimizer(model, cfg.train)
    depth = model.backbone.depth
    lr_of = {id(p): (g["lr"], g["weight_decay"], g["backbone"]) for g in opt.param_groups for p in g["params"]}
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)
    for name, p in model.named_parameters():
        lr, wd, backbone = lr_of[id(p)]
        assert wd == 0.05  # docs/paper.md section 6: on all parameters
        if name.startswith("backbone.vit.blocks."):
            i = int(name.split(".")[3])
            assert backbone and lr == pytest.approx(1e-4 * 0.8 ** (depth - 1 - i)), name
        elif name.startswith(("backbone.vit.patch_embed", "backbone.vit.pos_embed", "backbone.vit.cls_token",
                              "backbone.vit.reg_token")):
            assert backbone and lr == pytest.approx(1e-4 * 0.8 ** (depth - 1)), name  # block 0's factor
        elif name.startswith("backbone.vit.norm"):
            assert backbone and lr == pytest.approx(1e-4), name  # final norm: full lr, late warm-up
        else:
            assert not backbone and lr == pytest.approx(1e-4), name  # queries, heads: new parameters
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


class _Toy(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        self._groups = groups

    def param_groups(self, layer_decay, decay_query_blocks=True):
        return self._groups(self)


@pytest.mark.parametrize("groups, message", [
    (lambda m: [ParamGroup("new", list(m.a.parameters()), 1.0, False)], "leaves out"),
    (lambda m: [ParamGroup("x", list(m.parameters()), 1.0, False), ParamGroup("y", [m.a.weight], 1.0, True)],
     "is in groups"),
])
def test_groups_must_cover_every_trainable_parameter_once(groups, message):
    with pytest.raises(ValueError, match=message):
        checked_param_groups(_Toy(groups), 0.8)


def test_clipping_by_global_norm():
    w1, w2 = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([dict(params=[w1]), dict(params=[w2])])
    w1.grad, w2.grad = torch.full((3,), 3.0), torch.full((4,), 2.0)  # global norm sqrt(27 + 16)
    norm = clip_gradients(opt, TrainConfig().grad_clip)
    assert norm == pytest.approx(43 ** 0.5)
    total = torch.cat([w1.grad, w2.grad]).norm()
    assert total == pytest.approx(0.01, rel=1e-4)  # docs/paper.md section 6: clip at 0.01
    assert w1.grad[0] / w2.grad[0] == pytest.approx(1.5)  # one factor for all (global, not per tensor)


def test_accumulation_reaches_the_effective_batch():
    assert accumulation_steps(16, 2, 1) == 8
    assert accumulation_steps(16, 4, 4) == 1
    assert accumulation_steps(16, 2, 2, accumulate=4) == 4
    with pytest.raises(ValueError, match="multiple"):
        accumulation_steps(16, 3, 1)
    with pytest.raises(ValueError, match="not train.batch_size"):
        accumulation_steps(16, 2, 1, accumulate=4)


def synthetic_batch():
    """Two 64x64 images with two coloured rectangles each; masks at the image size, classes = colour."""
    images = torch.zeros(2, 3, 64, 64)
    boxes = [[(4, 4, 30, 40, 0), (34, 10, 60, 60, 1)], [(0, 0, 64, 20, 2), (20, 30, 50, 60, 0)]]
    targets = []
    for b, objects in enumerate(boxes):
        masks = torch.zeros(len(objects), 64, 64, dtype=torch.bool)
        for k, (y0, x0, y1, x1, c) in enumerate(objects):
            masks[k, y0:y1, x0:x1] = True
            images[b, c][masks[k]] = 1.0
        targets.append(dict(masks=masks, labels=torch.tensor([o[-1] for o in objects])))
    return images, targets


def test_tiny_eomt_learns_a_fixed_batch_with_loss_optimiser_and_schedules():
    steps = 40
    cfg, model = tiny_eomt([f"train.max_steps={steps}", "train.warmup_steps=4", "train.backbone_warmup_steps=4",
                            "train.lr=1e-3", "train.num_points=512"])
    model.train()
    images, targets = synthetic_batch()
    criterion = build_loss(cfg.train, cfg.model.num_classes)
    opt = build_optimizer(model, cfg.train)
    sched = build_lr_scheduler(opt, cfg.train, steps)
    annealing = build_mask_annealing(cfg.train, steps, model.num_masked_layers)
    backbone_block = next(p for n, p in model.named_parameters() if n.startswith("backbone.vit.blocks.0."))
    head = model.head.class_head.weight

    def loss_now():
        torch.manual_seed(123)  # same points every time
        with torch.no_grad():
            return criterion(model(images), targets)[0].item()

    before = loss_now()
    start_bb, start_head = backbone_block.detach().clone(), head.detach().clone()
    for step in range(steps):
        annealing.apply(model, step)
        total, parts = criterion(model(images), targets)
        assert len(parts) == 3 * (model.num_masked_layers + 1)  # every prediction set supervised
        opt.zero_grad()
        total.backward()
        clip_gradients(opt, cfg.train.grad_clip)
        opt.step()
        sched.step()
        if step == cfg.train.warmup_steps - 1:  # end of the first stage: backbone frozen, new parts moved
            assert torch.equal(backbone_block, start_bb)
            assert not torch.equal(head, start_head)
    assert not torch.equal(backbone_block, start_bb)
    assert model.attn_mask_probs.tolist() == [0.0] * model.num_masked_layers  # annealed away by the end
    after = loss_now()
    assert after < 0.5 * before, (before, after)
