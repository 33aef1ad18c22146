"""Training section of the configuration (docs/paper.md section 6).

Every number of the paper's training recipe is a field here, once, with the section it comes from. The
modules (``loss.py``, ``optim.py``, ``schedules.py``) take plain arguments; ``build_loss``,
``build_optimizer`` and ``build_lr_scheduler`` / ``build_mask_annealing`` map this section to them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from study.errors import UserError


@dataclass
class TrainConfig:
    # ---- length and batch
    # T, the number of optimiser steps. The paper counts epochs (COCO 12 = about 88.7k iterations at batch 16,
    # ADE20K 31, Cityscapes 107; docs/paper.md section 6); ``epochs`` (if set) wins over ``max_steps`` and the
    # loop turns it into steps with ``total_steps(batches_per_epoch)``.
    max_steps: int = 100
    epochs: Optional[int] = None
    batch_size: int = 16  # the effective batch, summed over processes and accumulation (docs/paper.md section 6)
    # Micro-batches per optimiser step. None: derived as batch_size / (data.batch_size * world size), which
    # must divide exactly (study.train.optim.accumulation_steps).
    accumulate: Optional[int] = None

    # ---- optimiser: AdamW (docs/paper.md section 6)
    lr: float = 1e-4  # docs/paper.md section 6
    weight_decay: float = 0.05  # docs/paper.md section 6: on all parameters
    layer_decay: float = 0.8  # docs/paper.md section 6: layer-wise lr decay, backbone block i gets 0.8^(L-1-i)
    # Layer-wise decay on EoMT's last L2 blocks, the ones that see the queries (the paper's DINOv2 recipe: on).
    # The official DINOv3 configs turn it off (``llrd_l2_enabled: False``: those blocks get the full lr); the
    # baselines' queries are in their decoder, so for them this changes nothing.
    layer_decay_query_blocks: bool = True
    # The paper is silent on Adam's betas and eps; the official code uses torch's AdamW defaults.
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: Optional[float] = 0.01  # docs/paper.md section 6: clip by global norm at 0.01; None = no clipping

    # ---- lr schedule: two-stage warm-up, then poly decay (docs/paper.md section 6)
    # New parameters warm up linearly over the first warmup_steps; backbone parameters have lr 0 for those
    # same steps, then warm up over the next backbone_warmup_steps (docs/paper.md section 6: 0-500, 500-1500).
    warmup_steps: int = 500  # docs/paper.md section 6
    backbone_warmup_steps: int = 1000  # docs/paper.md section 6
    # Poly decay power per iteration (docs/paper.md section 6); the official code uses the same power for mask
    # annealing, and so do we (P_mask = (1 - progress)^0.9, docs/paper.md section 6).
    poly_power: float = 0.9

    # ---- loss: Mask2Former's (docs/paper.md section 6)
    class_weight: float = 2.0  # docs/paper.md section 6: matching cost and loss weight of the cross-entropy
    mask_weight: float = 5.0  # docs/paper.md section 6: matching cost and loss weight of the point BCE
    dice_weight: float = 5.0  # docs/paper.md section 6: matching cost and loss weight of the Dice loss
    no_object_weight: float = 0.1  # docs/paper.md section 6: cross-entropy weight of the no-object class
    num_points: int = 12544  # docs/paper.md section 6: points sampled for matching and for the mask losses
    oversample_ratio: float = 3.0  # docs/paper.md section 6: candidates = 3 x num_points
    importance_sample_ratio: float = 0.75  # docs/paper.md section 6: share of points picked by uncertainty

    # ---- mask annealing (docs/paper.md section 6, Table 7)
    # On: P_mask annealed to 0 (Table 1 row 5, EoMT). Off: P_mask stays 1, masked attention throughout
    # training (rows 0-4, which keep masking at inference). None: annealed exactly when the model does not
    # keep masked attention at inference (so eomt anneals, eomt_masked and the baselines do not; Table C's
    # annealed baseline is mask_annealing=true with masked_inference=false). model.mask_setting (Tables 7 and C
    # by name, study/models/config.py) decides this for the model it sets; leave this key null then.
    mask_annealing: Optional[bool] = None
    mask_annealing_starts: Optional[list[int]] = None
    mask_annealing_ends: Optional[list[int]] = None

    # ---- how the loop runs (no paper numbers; they do not change the recipe)
    # auto (cuda if available, else cpu), cpu, cuda, cuda:1, ... Under torchrun or submitit, auto and cuda give
    # each process its own GPU (study/device.py states the rule); cuda:N is for single-process runs.
    device: str = "auto"
    # docs/paper.md section 6: mixed precision. auto = bf16 autocast on CUDA, fp32 on the CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the model for training
    # torch.use_deterministic_algorithms: bitwise-repeatable runs (and resumes), slower. CPU only: on CUDA the
    # loss's point sampling (grid_sample backward), nll_loss2d and bilinear interpolation backward have no
    # deterministic kernels, so the run could not keep the promise; it is refused there with a UserError
    # (our choice, rather than warn_only=True, which would silently give a non-repeatable run).
    deterministic: bool = False
    checkpoint_every: int = 1000  # optimiser steps between checkpoints (and always at the end)
    tensorboard: bool = True  # also log to TensorBoard (the CSV log is always written)
    # ---- following a run (our choices; docs/training.md). A line to stdout and logs/train.log every log_every
    # steps or log_every_s seconds, whichever comes first (0 turns that criterion off; the first and last step
    # are always logged).
    log_every: int = 0
    log_every_s: float = 30.0
    # Evaluation during training every eval_every optimiser steps (0 = off), on eval.split with the eval
    # section's settings, at most eval_max_images images (None: eval.max_images); metrics.json's eval_history.
    eval_every: int = 0
    eval_max_images: Optional[int] = None

    def total_steps(self, batches_per_epoch: Optional[int] = None) -> int:
        """T: ``epochs * batches_per_epoch`` (optimiser steps) when ``epochs`` is set, else ``max_steps``."""
        if self.epochs is None:
            return self.max_steps
        if batches_per_epoch is None or batches_per_epoch < 1:
            raise UserError("train.epochs is set: the number of optimiser steps per epoch is needed")
        return self.epochs * batches_per_epoch

    def validate(self) -> None:
        if self.max_steps < 1:
            raise UserError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"train.epochs must be >= 1 (or null), got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"train.batch_size must be >= 1, got {self.batch_size}")
        for key in ("log_every", "eval_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"train.{key} must be a whole number of steps >= 0 (0 = off), got {value!r}")
        if isinstance(self.log_every_s, bool) or not isinstance(self.log_every_s, (int, float)) \
                or not math.isfinite(self.log_every_s) or self.log_every_s < 0:
            raise UserError(f"train.log_every_s must be a finite number of seconds >= 0 (0 = off), got "
                            f"{self.log_every_s!r}")
        if self.eval_max_images is not None and (isinstance(self.eval_max_images, bool) or self.eval_max_images < 1):
            raise UserError(f"train.eval_max_images must be >= 1 (or null for eval.max_images), got "
                            f"{self.eval_max_images!r}")
        if self.checkpoint_every < 1:
            raise UserError(f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.accumulate is not None and self.accumulate < 1:
            raise UserError(f"train.accumulate must be >= 1 (or null to derive it), got {self.accumulate}")
        if self.lr <= 0:
            raise UserError(f"train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise UserError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.layer_decay <= 1:
            raise UserError(f"train.layer_decay must be in (0, 1], got {self.layer_decay}")
        if not all(0 <= b < 1 for b in self.betas) or self.eps <= 0:
            raise UserError(f"train.betas must be in [0, 1) and eps > 0, got betas={self.betas}, eps={self.eps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise UserError(f"train.grad_clip must be > 0 (or null for no clipping), got {self.grad_clip}")
        if self.warmup_steps < 0 or self.backbone_warmup_steps < 0:
            raise UserError("train.warmup_steps and train.backbone_warmup_steps must be >= 0")
        if self.poly_power <= 0:
            raise UserError(f"train.poly_power must be > 0, got {self.poly_power}")
        weights = (self.class_weight, self.mask_weight, self.dice_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise UserError("train.class_weight, train.mask_weight and train.dice_weight must be >= 0 and not all 0")
        if self.no_object_weight < 0:
            raise UserError(f"train.no_object_weight must be >= 0, got {self.no_object_weight}")
        if self.num_points < 1:
            raise UserError(f"train.num_points must be >= 1, got {self.num_points}")
        if self.oversample_ratio < 1:
            raise UserError(f"train.oversample_ratio must be >= 1, got {self.oversample_ratio}")
        if not 0 <= self.importance_sample_ratio <= 1:
            raise UserError(f"train.importance_sample_ratio must be in [0, 1], got {self.importance_sample_ratio}")
        starts, ends = self.mask_annealing_starts, self.mask_annealing_ends
        if (starts is None) != (ends is None):
            raise UserError("set both train.mask_annealing_starts and train.mask_annealing_ends, or neither")
        if starts is not None:
            if len(starts) != len(ends):
                raise UserError(f"train.mask_annealing_starts has {len(starts)} entries but train.mask_annealing_ends "
                                 f"has {len(ends)}; give one start and one end per masked layer")
            for j, (s, e) in enumerate(zip(starts, ends)):
                if not 0 <= s <= e:
                    raise UserError(f"train mask annealing window {j} must satisfy 0 <= start <= end, got "
                                     f"[{s}, {e}]")
