"""Schedules of training, as pure functions of the optimiser step (docs/paper.md section 6).

Learning rate: the official EoMT ``TwoStageWarmupPolySchedule``. With warm-ups w (new parameters) and
w_b (backbone) and T steps, at step t:

- new parameters: ``t / w`` for t < w, then ``(1 - (t - w) / (T - w)) ** power``;
- backbone parameters: 0 for t < w, ``(t - w) / w_b`` for w <= t < w + w_b, then
  ``(1 - (t - w - w_b) / (T - w - w_b)) ** power``.

Each factor multiplies the group's own lr (base lr x layer-decay scale). Step t is the index of the optimiser
update (0 for the first), so ``scheduler.step()`` goes after ``optimizer.step()``, as in the official code.

Mask annealing: block j keeps its masks with probability 1 before s_j, ``(1 - (t - s_j) / (e_j - s_j)) **
power`` in between, 0 from e_j on (the official ``mask_annealing``). The windows come from T by the sixths
rule of the official configs (``annealing_windows``) unless given per block. The official code sets the
probabilities at the end of each batch from the updated step counter, so the forward pass of update t
sees P(t): call ``set_mask_probs(probs(t))`` before the forward pass of update t.
"""
from __future__ import annotations

import functools
from fractions import Fraction
from math import floor
from typing import Optional, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from study.errors import UserError
from study.models.config import annealing_enabled, check_annealing_agrees
from study.train.config import TrainConfig

_DEFAULTS = TrainConfig()  # the paper's numbers live once, in TrainConfig

# ------------------------------------------------------------------------------------------ learning rate


def _poly(step: int, start: int, total_steps: int, power: float) -> float:
    """(1 - (step - start) / (T - start)) ** power, clamped to [0, 1]."""
    span = max(1, total_steps - start)
    return max(0.0, 1.0 - max(0, step - start) / span) ** power


def lr_factor(step: int, total_steps: int, backbone: bool, warmup_steps: int = _DEFAULTS.warmup_steps,
              backbone_warmup_steps: int = _DEFAULTS.backbone_warmup_steps,
              poly_power: float = _DEFAULTS.poly_power) -> float:
    """Multiplier of a group's lr at optimiser step ``step`` (two-stage warm-up, then poly decay)."""
    if not backbone:
        if step < warmup_steps:
            return step / warmup_steps
        return _poly(step, warmup_steps, total_steps, poly_power)
    if step < warmup_steps:  # the backbone is frozen while the new parameters warm up
        return 0.0
    if step < warmup_steps + backbone_warmup_steps:
        return (step - warmup_steps) / backbone_warmup_steps
    return _poly(step, warmup_steps + backbone_warmup_steps, total_steps, poly_power)


def build_lr_scheduler(optimizer: Optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to each group of ``optimizer``.

    Groups must carry a ``backbone`` flag (``study.train.optim.build_optimizer`` sets it). The scheduler's
    ``state_dict`` holds the step counter, so a resumed run continues the schedule where it stopped.
    """
    lambdas = []
    for i, group in enumerate(optimizer.param_groups):
        if "backbone" not in group:
            raise ValueError(f"optimizer group {i} has no 'backbone' flag; build the optimiser with "
                             "study.train.optim.build_optimizer")
        lambdas.append(functools.partial(lr_factor, total_steps=total_steps, backbone=bool(group["backbone"]),
                                         warmup_steps=cfg.warmup_steps,
                                         backbone_warmup_steps=cfg.backbone_warmup_steps,
                                         poly_power=cfg.poly_power))
    return LambdaLR(optimizer, lambdas)


# ------------------------------------------------------------------------------------------ mask annealing

# The sixths rule of the official configs (docs/paper.md section 6): with T steps, everything is masked during
# the first sixth, block j of L2 = 4 anneals during [(j+1)/6, (j+2)/6] of T, nothing is masked in the last.
_SIXTH = Fraction(1, 6)
_FIRST_START = _SIXTH  # the first block starts annealing after one sixth
_LAST_START = 4 * _SIXTH  # the last block starts at four sixths and ends at five


def annealing_windows(total_steps: int, num_layers: int) -> list[tuple[int, int]]:
    """(start, end) step of each masked layer's annealing, from T by the sixths rule.

    Every window lasts T/6; the starts are spread evenly from T/6 (first layer) to 4T/6 (last layer), so
    the first sixth is fully masked and the last sixth unmasked for any number of layers. L2 = 4 gives the
    official [(j+1)/6, (j+2)/6]; L2 = 3 gives starts at 1, 2.5 and 4 sixths (the three-block EoMT-B
    Cityscapes configs circulating in forks of the official repository use exactly these steps); the
    9-layer Mask2Former decoder gets overlapping windows 3/48 T apart. One layer anneals over [T/6, 2T/6].
    Steps are floored, as the official configs' integers are.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    gap = (_LAST_START - _FIRST_START) / (num_layers - 1) if num_layers > 1 else Fraction(0)
    windows = []
    for j in range(num_layers):
        start = _FIRST_START + j * gap
        windows.append((floor(total_steps * start), floor(total_steps * (start + _SIXTH))))
    return windows


def mask_prob(step: int, start: int, end: int, power: float = _DEFAULTS.poly_power) -> float:
    """P_mask of one layer: 1 before ``start``, (1 - progress) ** power in between, 0 from ``end`` on."""
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    return (1.0 - (step - start) / (end - start)) ** power


def mask_annealing_probs(step: int, total_steps: int, num_layers: int,
                         windows: Optional[Sequence[tuple[int, int]]] = None,
                         power: float = _DEFAULTS.poly_power) -> list[float]:
    """P_mask of every masked layer at ``step``; ``windows`` overrides the sixths rule."""
    windows = annealing_windows(total_steps, num_layers) if windows is None else list(windows)
    if len(windows) != num_layers:
        raise ValueError(f"{len(windows)} annealing windows given for {num_layers} masked layers")
    return [mask_prob(step, s, e, power) for s, e in windows]


class MaskAnnealing:
    """The annealing of one run: fixed windows and power; ``probs(step)`` and ``apply(model, step)``."""

    def __init__(self, windows: Sequence[tuple[int, int]], power: float = _DEFAULTS.poly_power,
                 explicit: bool = False):
        self.windows = [(int(s), int(e)) for s, e in windows]
        self.power = power
        self.explicit = explicit  # train.mask_annealing was set to true (not the default rule)

    def probs(self, step: int) -> list[float]:
        return [mask_prob(step, s, e, self.power) for s, e in self.windows]

    def apply(self, model, step: int) -> list[float]:
        """Set ``model.attn_mask_probs`` for the forward pass of optimiser step ``step``.

        A model whose mask setting says "not annealed" (``model.mask_annealing is False``, e.g. Table 7's
        ``masked_train_only``) keeps P_mask = 1: its setting decides, also when the schedule was built without
        it (``build_mask_annealing(..., model_annealing=None)``); with ``train.mask_annealing: true`` set as
        well the two contradict, a UserError."""
        if getattr(model, "mask_annealing", None) is False:
            check_annealing_agrees(True if self.explicit else None, False)
            probs = [1.0] * len(self.windows)
        else:
            probs = self.probs(step)
        model.set_mask_probs(probs)
        return probs


def build_mask_annealing(cfg: TrainConfig, total_steps: int, num_layers: int,
                         masked_inference: bool = False,
                         model_annealing: Optional[bool] = None) -> Optional[MaskAnnealing]:
    """The annealing a :class:`TrainConfig` describes for a model with ``num_layers`` masked layers.

    None when annealing is off (masks stay on, P_mask = 1) or the model has no masked layer. Who decides:
    ``model_annealing`` (the model's ``mask_annealing``, from ``model.mask_setting``) when not None, else
    ``cfg.mask_annealing``, else the rule that a model keeping masked attention at inference is not annealed.
    ``cfg.mask_annealing`` contradicting ``model_annealing`` is a UserError.
    """
    enabled = annealing_enabled(model_annealing, cfg.mask_annealing, masked_inference)  # study/models/config.py
    if not enabled or num_layers == 0:
        return None
    explicit = bool(cfg.mask_annealing)
    if cfg.mask_annealing_starts is None:
        return MaskAnnealing(annealing_windows(total_steps, num_layers), cfg.poly_power, explicit)
    if len(cfg.mask_annealing_starts) != num_layers:
        raise UserError(f"train.mask_annealing_starts/ends give {len(cfg.mask_annealing_starts)} windows but "
                        f"the model has {num_layers} masked layers; give one per layer or leave them null")
    return MaskAnnealing(list(zip(cfg.mask_annealing_starts, cfg.mask_annealing_ends)), cfg.poly_power, explicit)
