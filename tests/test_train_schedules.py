"""Schedules against the official numbers: mask-annealing windows (docs/paper.md section 6), the two-stage
warm-up poly lr of the official TwoStageWarmupPolySchedule, and the configuration that drives them."""
from __future__ import annotations

import pytest
import torch

from study.config import ConfigError, load_config
from study.train.config import TrainConfig
from study.train.schedules import (MaskAnnealing, annealing_windows, build_lr_scheduler, build_mask_annealing,
                                   lr_factor, mask_annealing_probs)

COCO_T = 88692  # COCO 12 epochs at batch 16 (docs/paper.md section 6)
COCO_L_STARTS = [14782, 29564, 44346, 59128]  # docs/paper.md section 6, the official COCO-L config
COCO_L_ENDS = [29564, 44346, 59128, 73910]


def test_sixths_rule_gives_the_official_coco_large_windows():
    assert annealing_windows(COCO_T, 4) == list(zip(COCO_L_STARTS, COCO_L_ENDS))


def test_sixths_rule_for_three_blocks_gives_the_three_block_config_steps():
    # EoMT-B (L2 = 3) Cityscapes configs, T = 107 epochs x 186 steps = 19902: starts at 1, 2.5, 4 sixths.
    assert annealing_windows(19902, 3) == [(3317, 6634), (8292, 11609), (13268, 16585)]


@pytest.mark.parametrize("layers", [1, 2, 3, 5, 6, 9])
def test_sixths_rule_generalises(layers):
    t = 60000
    w = annealing_windows(t, layers)
    assert len(w) == layers
    assert w[0][0] == t // 6  # fully masked during the first sixth
    # Nothing masked in the last sixth; a single layer anneals during the second sixth.
    assert w[-1][1] == (2 * t // 6 if layers == 1 else 5 * t // 6)
    assert all(e - s == t // 6 for s, e in w)  # each layer anneals for one sixth
    starts = [s for s, _ in w]
    assert starts == sorted(starts) and len(set(starts)) == layers  # shallower layers anneal first


def test_mask_probabilities_at_the_official_steps():
    p = lambda step: mask_annealing_probs(step, COCO_T, 4)  # noqa: E731
    assert p(0) == [1.0] * 4
    assert p(14781) == [1.0] * 4
    assert p(14782) == [1.0] * 4  # progress 0 at the start: (1 - 0)^0.9
    mid = 14782 + 14782 // 2
    assert p(mid)[0] == pytest.approx(0.5 ** 0.9) and p(mid)[1:] == [1.0] * 3
    assert p(29564) == [0.0, 1.0, 1.0, 1.0]  # block 0 done exactly when block 1 starts
    assert p(59128 + 7391) == [0.0, 0.0, 0.0, pytest.approx((1 - 7391 / 14782) ** 0.9)]
    assert p(73910) == [0.0] * 4
    assert p(COCO_T) == [0.0] * 4
    # Monotone non-increasing in time for every layer.
    steps = range(0, COCO_T, 997)
    for j in range(4):
        values = [p(s)[j] for s in steps]
        assert all(a >= b for a, b in zip(values, values[1:]))


def test_mask_annealing_from_config_override_and_off():
    cfg = TrainConfig(mask_annealing_starts=[0, 10], mask_annealing_ends=[10, 30])
    ann = build_mask_annealing(cfg, total_steps=100, num_layers=2)
    assert ann.probs(0) == [1.0, 1.0] and ann.probs(5) == [pytest.approx(0.5 ** 0.9), 1.0]
    assert ann.probs(20) == [0.0, pytest.approx(0.5 ** 0.9)]
    with pytest.raises(ValueError, match="masked layers"):
        build_mask_annealing(cfg, total_steps=100, num_layers=4)
    assert build_mask_annealing(TrainConfig(mask_annealing=False), 100, 4) is None
    # Unset: annealed for EoMT (row 5), by the sixths rule of docs/paper.md section 6 (block j anneals during
    # [(j+1)/6, (j+2)/6] of T; T = 600 makes every boundary whole); not annealed for models that keep masking at
    # inference (rows 0-4).
    ann = build_mask_annealing(TrainConfig(), 600, 4, masked_inference=False)
    assert ann.windows == [(100, 200), (200, 300), (300, 400), (400, 500)]
    assert ann.probs(99) == [1.0] * 4 and ann.probs(500) == [0.0] * 4
    assert build_mask_annealing(TrainConfig(), 600, 4, masked_inference=True) is None
    # Asked for explicitly, annealing applies even to a model that masks at inference, over any number of layers:
    # everything masked in the first sixth, nothing in the last.
    ann = build_mask_annealing(TrainConfig(mask_annealing=True), 600, 9, masked_inference=True)
    assert len(ann.windows) == 9 and ann.windows[0][0] == 100 and ann.windows[-1][1] == 500
    assert ann.probs(100) == [1.0] * 9 and ann.probs(500) == [0.0] * 9
    ann = build_mask_annealing(TrainConfig(), COCO_T, 4)
    assert ann.windows == list(zip(COCO_L_STARTS, COCO_L_ENDS))

    class Model:  # the contract's set_mask_probs
        probs = None

        def set_mask_probs(self, probs):
            self.probs = probs

    m = Model()
    assert MaskAnnealing([(0, 10)]).apply(m, 10) == [0.0] and m.probs == [0.0]


def test_lr_factor_follows_the_official_two_stage_warmup():
    t = COCO_T
    new = lambda s: lr_factor(s, t, backbone=False)  # noqa: E731
    bb = lambda s: lr_factor(s, t, backbone=True)  # noqa: E731
    # New parameters: linear 0 -> 1 over 0-500, then poly from 500.
    assert new(0) == 0.0 and new(250) == 0.5 and new(499) == pytest.approx(499 / 500)
    assert new(500) == 1.0
    assert new(1000) == pytest.approx((1 - 500 / (t - 500)) ** 0.9)
    # Backbone: 0 for 500 iterations, linear over 500-1500, poly from 1500.
    assert bb(0) == bb(499) == 0.0
    assert bb(500) == 0.0 and bb(1000) == 0.5 and bb(1500) == 1.0
    assert bb(2000) == pytest.approx((1 - 500 / (t - 1500)) ** 0.9)
    # Decay to 0 at T and never negative (a negative base would give a complex power) after it.
    assert new(t) == bb(t) == 0.0 and new(t + 10) == 0.0
    mid = (t + 500) // 2
    assert new(mid) == pytest.approx(0.5 ** 0.9, rel=1e-4)


def test_lambda_lr_scheduler_and_resume():
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, backbone_warmup_steps=4)
    w_new, w_bb = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([dict(params=[w_bb], lr=cfg.lr * 0.5, backbone=True),
                             dict(params=[w_new], lr=cfg.lr, backbone=False)])
    sched = build_lr_scheduler(opt, cfg, total_steps=20)
    seen = []
    for step in range(20):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, (lr_bb, lr_new) in enumerate(seen):  # update `step` used the factor of `step`
        assert lr_bb == pytest.approx(0.5e-3 * lr_factor(step, 20, True, 4, 4, 0.9))
        assert lr_new == pytest.approx(1e-3 * lr_factor(step, 20, False, 4, 4, 0.9))
    assert seen[2] == [0.0, pytest.approx(0.5e-3)] and seen[6][0] == pytest.approx(0.25e-3)

    # Resume at step 7 from a state dict: the next lrs continue the schedule.
    opt2 = torch.optim.AdamW([dict(params=[w_bb], lr=cfg.lr * 0.5, backbone=True),
                              dict(params=[w_new], lr=cfg.lr, backbone=False)])
    first = build_lr_scheduler(opt2, cfg, total_steps=20)
    for _ in range(7):
        opt2.step()
        first.step()
    state = first.state_dict()
    opt3 = torch.optim.AdamW([dict(params=[w_bb], lr=cfg.lr * 0.5, backbone=True),
                              dict(params=[w_new], lr=cfg.lr, backbone=False)])
    opt3.load_state_dict(opt2.state_dict())
    resumed = build_lr_scheduler(opt3, cfg, total_steps=20)
    resumed.load_state_dict(state)
    resumed.step()
    assert [g["lr"] for g in opt3.param_groups] == pytest.approx(seen[8])

    with pytest.raises(ValueError, match="backbone"):
        build_lr_scheduler(torch.optim.AdamW([w_new]), cfg, 20)


def test_config_fields_and_validation():
    cfg = load_config(None, ["train.mask_annealing_starts=[1, 2]", "train.mask_annealing_ends=[3, 4]",
                             "train.epochs=12"])
    assert cfg.train.mask_annealing_starts == [1, 2] and cfg.train.total_steps(7391) == COCO_T
    assert TrainConfig(max_steps=50).total_steps() == 50
    for bad, match in [
        (["train.mask_annealing_starts=[1, 2]"], "both"),
        (["train.mask_annealing_starts=[1, 2]", "train.mask_annealing_ends=[3]"], "entries"),
        (["train.mask_annealing_starts=[5]", "train.mask_annealing_ends=[3]"], "start <= end"),
        (["train.layer_decay=1.5"], "layer_decay"),
        (["train.importance_sample_ratio=2"], "importance_sample_ratio"),
        (["train.grad_clip=0"], "grad_clip"),
        (["train.lr=0"], "lr"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, bad)
    with pytest.raises(ValueError, match="steps per epoch"):
        TrainConfig(epochs=12).total_steps()


# ---- the one mask-setting resolver (study/models/config.py; issue 25 item 3)

@pytest.mark.parametrize("setting, train, expected", [
    ("annealed", None, True), ("masked", None, False), ("masked_train_only", False, False),
    (None, None, True),  # eomt: not masked at inference, so annealed by the trainer's rule
    (None, False, False)])
def test_one_resolver_for_builder_trainer_and_paper_rows(setting, train, expected):
    from study.models.config import resolve_masking
    from study.paper_numbers import resolve

    m = resolve_masking(setting, True, None, False, train)
    assert m.annealing is expected
    cfg = build_mask_annealing(TrainConfig(mask_annealing=train), 60, 3, m.inference,
                               None if setting is None else m.annealing)
    assert (cfg is not None) is expected
    keys = resolve({"model.variant": "eomt", "model.mask_setting": setting, "model.masked_attention": True,
                    "model.masked_inference": None, "train.mask_annealing": train})
    assert keys["train.mask_annealing"] is expected and keys["model.masked_inference"] is m.inference


@pytest.mark.parametrize("over", [["model.mask_setting=masked", "train.mask_annealing=true"],
                                  ["model.mask_setting=annealed", "train.mask_annealing=false"],
                                  ["model.masked_attention=false", "train.mask_annealing=true"]])
def test_the_resolver_refuses_a_clash(over):
    from study.errors import UserError
    from study.models.config import check_masking

    cfg = load_config(None, ["model.size=tiny"] + [o for o in over if o.startswith("model.")])
    annealing = {"true": True, "false": False}[over[1].split("=")[1]]
    with pytest.raises(UserError, match="train.mask_annealing=.* contradicts model.mask_setting"):
        check_masking(cfg.model, annealing)


def test_dry_run_refuses_a_mask_setting_clash(tmp_path, capsys):
    import yaml

    from study.cli import main
    from test_launch import write_grid

    grid = write_grid(tmp_path, str(tmp_path / "synthetic"), {"runs": [{"seed": 1}]})
    tree = yaml.safe_load(open(grid))
    tree.setdefault("model", {})["mask_setting"] = "masked"
    tree.setdefault("train", {})["mask_annealing"] = True
    open(grid, "w").write(yaml.safe_dump(tree))
    assert main(["launch", grid, "--dry-run"]) == 2
    assert "train.mask_annealing=true contradicts model.mask_setting" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
