"""The lr schedule and mask annealing against the official code, step for step (issue 27 item 3).

- ``TwoStageWarmupPolySchedule`` on the official optimiser against our ``build_lr_scheduler`` on ours: every
  parameter's lr at every step of a short run.
- The official ``mask_annealing`` against ours at every step, and the official configs' windows against our
  sixths rule.
- When each takes effect: a real Lightning ``Trainer`` runs the official module (its ``on_train_batch_end``
  sets P_mask from ``global_step`` after each optimiser step) and records, in each training step, the
  P_mask the forward uses and the lr the optimiser step will use; our trainer (study.train.loop.run_step)
  records the same. The sequences must be equal: the same probabilities and lrs at the same step.

Both sides compute the same float expressions (``(1 - progress) ** power``; the official annealing in a
float32 tensor, ours in Python floats then stored in the float32 buffer): compared to 1e-7 relative.
"""
from __future__ import annotations

import pytest
import torch

from official_oracle import official
from study.train.config import TrainConfig
from study.train.optim import build_optimizer
from study.train.schedules import annealing_windows, build_lr_scheduler, mask_prob
from test_official_model import pair
from test_official_optim import official_module, our_name

T, WARMUP = 40, (4, 6)


def test_lr_schedule_step_for_step(one_thread):
    off, ours = pair("tiny", img=32)
    conf = official_module(off, llrd_l2_enabled=True, total_steps=T, warmup=WARMUP).configure_optimizers()
    o_opt, o_sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    cfg = TrainConfig(warmup_steps=WARMUP[0], backbone_warmup_steps=WARMUP[1], poly_power=0.9)
    opt = build_optimizer(ours, cfg)
    sched = build_lr_scheduler(opt, cfg, T)
    names = {id(p): n for n, p in ours.named_parameters()}
    seen = set()
    # steps 0..T (a run uses 0..T-1). Past T the official factor is a negative number to the power 0.9, a complex
    # lr (a run never gets there: Lightning stops at T); ours clamps it to 0 (docs/official.md).
    for step in range(T + 1):
        mine = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
        for g in o_opt.param_groups:
            assert mine[our_name(g["name"])] == pytest.approx(g["lr"], rel=1e-12, abs=1e-20), (step, g["name"])
        seen.add(round(mine["q.weight"], 12))
        o_opt.step(), opt.step()  # no gradients: the parameters stay, only the schedulers' order matters
        o_sched.step(), sched.step()
    assert len(seen) > T // 2  # the lr moved at most steps


def test_mask_annealing_values_every_step():
    lm = official_module(pair("tiny", img=32)[0], llrd_l2_enabled=True)
    for start, end in [(0, 3), (5, 17), (8, 8)]:
        for step in range(20):
            theirs = lm.mask_annealing(start, step, end).item()
            assert mask_prob(step, start, end, 0.9) == pytest.approx(theirs, rel=1e-7, abs=1e-7), (start, end, step)


@pytest.mark.parametrize("config, total", [
    ("dinov2/coco/panoptic/eomt_large_640.yaml", 6 * 14782),  # COCO: T = 12 epochs, windows in sixths
    ("dinov2/ade20k/semantic/eomt_large_512.yaml", 6 * 6520),
])
def test_sixths_rule_gives_the_official_windows(config, total):
    import yaml

    from official_oracle import OFFICIAL

    args = yaml.safe_load((OFFICIAL / "configs" / config).read_text())["model"]["init_args"]
    windows = annealing_windows(total, 4)
    assert [s for s, _ in windows] == args["attn_mask_annealing_start_steps"]
    assert [e for _, e in windows] == args["attn_mask_annealing_end_steps"]


# ---- when each takes effect: the official module under a real Lightning Trainer vs our trainer

STEPS = 12
# A tiny run on the built-in synthetic set: two micro-batches of one image per step, warm-ups (2, 2) as below.
OUR_RUN = ["model.size=tiny", "model.img_size=32", "model.num_classes=6", "model.num_queries=8",
           "data.dataset=synthetic", "data.synthetic_image_size=32", "data.synthetic_train_images=12",
           "data.synthetic_val_images=2", "data.batch_size=1", "train.batch_size=2", "train.num_points=256",
           "train.warmup_steps=2", "train.backbone_warmup_steps=2", "train.deterministic=true",
           "train.tensorboard=false", f"train.max_steps={STEPS}", "train.mask_annealing=true",
           "train.checkpoint_every=1000"]


def _official_run(windows):
    lightning = pytest.importorskip("lightning")
    lm = official("training.lightning_module")
    off, _ = pair("tiny", img=32)

    class Recording(lm.LightningModule):
        def training_step(self, batch, batch_idx):
            self.probs.append(self.network.attn_mask_probs.tolist())
            opt = self.optimizers()
            self.lrs.append({our_name(g["name"]): g["lr"] for g in opt.param_groups})
            masks, classes = self(batch)
            return sum(m.mean() for m in masks) + sum(c.mean() for c in classes)

    module = Recording(network=off, img_size=(32, 32), num_classes=5, attn_mask_annealing_enabled=True,
                       attn_mask_annealing_start_steps=[s for s, _ in windows],
                       attn_mask_annealing_end_steps=[e for _, e in windows], lr=1e-4, llrd=0.8,
                       llrd_l2_enabled=True, lr_mult=1.0, weight_decay=0.05, poly_power=0.9, warmup_steps=(2, 2))
    module.probs, module.lrs = [], []
    data = torch.utils.data.DataLoader([torch.rand(3, 32, 32) * 255 for _ in range(STEPS)], batch_size=1)
    trainer = lightning.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data)
    return module.probs, module.lrs


def _our_run(tmp_path, monkeypatch):
    """Our whole trainer (study.train.loop.train, its public entry), recording what each forward and each
    optimiser step saw: the model's P_mask buffer and every parameter's lr."""
    from study.models.eomt import EoMT
    from study.runs import RunDir
    from study.config import load_config
    from study.train.loop import train

    probs, lrs, names = [], [], {}
    forward = EoMT.forward

    def recording_forward(self, images):
        if self.training:
            probs.append(self.attn_mask_probs.tolist())
            names.update({id(p): n for n, p in self.named_parameters()})
        return forward(self, images)

    def record_lrs(opt, args, kwargs):
        lrs.append({names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]})

    monkeypatch.setattr(EoMT, "forward", recording_forward)
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(record_lrs)
    try:
        cfg = load_config(None, OUR_RUN + [f"data.root={tmp_path / 'synthetic'}"])
        train(cfg, RunDir(tmp_path / "run"), progress=False)
    finally:
        handle.remove()
    assert len(probs) == 2 * STEPS  # train.batch_size 2 of data.batch_size 1: two forwards per step
    assert probs[::2] == probs[1::2]
    return probs[::2], lrs, cfg


def test_each_schedule_takes_effect_at_the_official_step(tmp_path, monkeypatch, one_thread):
    our_probs, our_lrs, cfg = _our_run(tmp_path, monkeypatch)
    windows = annealing_windows(STEPS, 2)  # the sixths rule, held to the official configs above
    assert windows == [(2, 4), (8, 10)]
    their_probs, their_lrs = _official_run(windows)
    assert len(their_probs) == len(our_probs) == STEPS
    for step, (a, b) in enumerate(zip(their_probs, our_probs)):
        assert a == pytest.approx(b, rel=1e-7, abs=1e-7), f"P_mask used at step {step}"
    assert 0 < their_probs[3][0] < 1 and their_probs[4][0] == 0  # P_mask really moves within the run
    for step, (a, b) in enumerate(zip(their_lrs, our_lrs)):
        assert set(a) == set(b)
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-12, abs=1e-20), f"lr of {name} at step {step}"
