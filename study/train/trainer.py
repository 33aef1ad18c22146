"""The core of the trainer: what one process needs (:class:`Trainer`, built by :func:`setup`), the data order
(:func:`batches`) and one optimiser step (:func:`run_step`). Everything around the step (logging,
checkpoints, status, signals, divergence, mask annealing, evaluation during training) is a hook
(study/train/hooks.py, logs.py, validation.py) that study/train/loop.py strings together.

- :func:`setup` builds data, model, DDP wrapper, optimiser, schedules and loss; the device comes from
  ``study.device.resolve_process_device`` (one convention for plain runs, torchrun and submitit).
- :func:`run_step` runs the micro-batches (forward under autocast, loss in float32, backward; DDP synchronises
  gradients on the last one), unscales, clips, steps the optimiser and the lr schedule. The masking
  probabilities it trains with are ``Trainer.probs``, which the annealing hook sets before each step. It
  returns the losses as device tensors, averaged over the micro-batches; :func:`log_values` averages them over
  processes and reads them with one host sync, and :func:`agree` makes every process take the same decision
  (stop, diverged) at the same step.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from study.config import Config
from study.data.sampler import ShardedSampler
from study.device import ProcessEnv, autocast, resolve_precision
from study.errors import UserError
from study.runs import RunDir

__all__ = ["Trainer", "StepResult", "StepOutput", "setup", "batches", "run_step", "log_values", "agree"]


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Trainer:
    """Everything one process needs to run optimiser steps; built by :func:`setup`."""
    cfg: Config
    run: RunDir
    env: ProcessEnv
    device: torch.device
    precision: str
    model: nn.Module  # the bare model: state dict, masking probabilities
    net: nn.Module  # what runs the forward: the model, DDP-wrapped (world size > 1) and/or compiled
    ddp: Optional[nn.parallel.DistributedDataParallel]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    annealing: Any  # study.train.schedules.MaskAnnealing or None (P_mask stays as the model has it)
    dataset: Any  # the augmented training set
    sampler: ShardedSampler
    per_process: int  # images per micro-batch and process (data.batch_size)
    accumulate: int  # micro-batches per optimiser step
    steps_per_epoch: int
    total: int  # T, optimiser steps of the run
    step: int = 0  # optimiser steps done
    images_seen: int = field(default=0)  # over every process, since this process started
    # P_mask of the next step: the annealing hook sets it before each step; without annealing it stays what the
    # model had when built (read once: no host sync per step)
    probs: list[float] = field(default_factory=list)
    saved_step: Optional[int] = None  # the step of the last good checkpoint (None: none yet)
    stop_signal: Optional[int] = None  # a deferred stop signal received by this process (the signal hook)
    started: float = 0.0  # time.perf_counter() when this process's loop began
    paused_s: float = 0.0  # seconds of that spent outside training (evaluation), left out of images/s
    last: Optional[dict] = None  # the last step's logged values (rank 0)

    @property
    def main(self) -> bool:
        return self.env.rank == 0

    def train_seconds(self) -> float:
        """Seconds this process spent training since its loop began (evaluation left out)."""
        return time.perf_counter() - self.started - self.paused_s


@dataclass
class StepResult:
    """One optimiser step, still on the device (reading it is a host sync; see :func:`log_values`)."""
    names: list[str]  # "loss", then the final prediction set's loss terms
    values: torch.Tensor  # (len(names),) this process's mean over the micro-batches
    grad_norm: torch.Tensor  # the global gradient norm before clipping (equal on every process)
    probs: list[float]  # P_mask per masked layer in this step


@dataclass
class StepOutput:
    """What the hooks see after a step: its epoch, the step's tensors, the values rank 0 read (None on the
    other ranks), whether every loss term was finite and whether to stop, both agreed by every process, and
    what hooks add to the step's log row (the validation metric, from the evaluation hook)."""
    epoch: int
    result: StepResult
    values: Optional[dict]
    finite: bool
    stop: bool
    extra: dict = field(default_factory=dict)


def setup(cfg: Config, run: RunDir, env: ProcessEnv, device: torch.device) -> Trainer:
    """Build data, model, optimiser, schedules and loss of this process (no state is read here)."""
    from study.data import build_dataset
    from study.data.transforms import AugmentedDataset, TrainTransform
    from study.models.build import build_model
    from study.train.loss import build_loss
    from study.train.optim import accumulation_steps, build_optimizer
    from study.train.schedules import build_lr_scheduler, build_mask_annealing

    t = cfg.train
    precision = resolve_precision(t.precision, device)
    _seed(cfg.seed + env.rank)
    dataset = build_dataset(cfg.data, cfg.data.train_split, cfg.task)
    if dataset.info.num_classes != cfg.model.num_classes:
        raise UserError(f"model.num_classes={cfg.model.num_classes} but the {cfg.data.dataset} data set has "
                        f"{dataset.info.num_classes} classes; set model.num_classes={dataset.info.num_classes}")
    augmented = AugmentedDataset(dataset, TrainTransform.from_config(cfg.data, cfg.task, cfg.model.img_size),
                                 seed=cfg.seed)
    sampler = ShardedSampler(len(augmented), env.rank, env.world_size, cfg.seed)
    per_process = cfg.data.batch_size
    accumulate = accumulation_steps(t.batch_size, per_process, env.world_size, t.accumulate)
    steps_per_epoch = (len(augmented) // env.world_size) // (per_process * accumulate)
    if steps_per_epoch < 1:
        raise UserError(f"the training split has {len(augmented)} images: too few for one step of "
                        f"{per_process * accumulate * env.world_size} images (train.batch_size)")
    total = t.total_steps(steps_per_epoch)

    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = build_model(cfg.model).to(device)
    _seed(cfg.seed + env.rank)
    ddp = None
    net = model
    if env.distributed:
        # A model that needs a change for DDP says so (e.g. the ViT-Adapter's BatchNorm -> SyncBatchNorm).
        prepare = getattr(model, "prepare_distributed", None)
        net = prepare(device) if prepare is not None else model
        ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        net = ddp
    optimizer = build_optimizer(model, t)
    annealing = build_mask_annealing(t, total, model.num_masked_layers, model.masked_inference,
                                     getattr(model, "mask_annealing", None))
    if t.compile:
        # Each annealed layer's P_mask passes 1 -> (0, 1) -> 0, and the forward branches on those host flags,
        # so dynamo compiles up to 2 * L2 + 1 versions (11 at ViT-g); past its limit (8) it would silently run
        # the rest uncompiled.
        import torch._dynamo as dynamo

        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 2 * model.num_masked_layers + 2)
    return Trainer(
        cfg=cfg, run=run, env=env, device=device, precision=precision, model=model,
        net=torch.compile(net) if t.compile else net, ddp=ddp, optimizer=optimizer,
        scheduler=build_lr_scheduler(optimizer, t, total),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        criterion=build_loss(t, cfg.model.num_classes), annealing=annealing,
        probs=model.attn_mask_probs.tolist(), dataset=augmented, sampler=sampler,
        per_process=per_process, accumulate=accumulate, steps_per_epoch=steps_per_epoch, total=total)


def batches(tr: Trainer, start: int) -> Iterator[tuple[int, list]]:
    """(epoch, micro-batches) of every optimiser step from step ``start`` on, the same after a resume."""
    epoch, within = divmod(start, tr.steps_per_epoch)
    while True:
        tr.sampler.set_epoch(epoch, start=within * tr.accumulate * tr.per_process)
        tr.dataset.set_epoch(epoch)
        from study.data.transforms import collate

        # Its own generator: a DataLoader iterator otherwise draws its base seed from the global RNG, which
        # would shift every later random draw depending on where an epoch's iterator was made.
        loader = DataLoader(tr.dataset, tr.per_process, sampler=tr.sampler, collate_fn=collate, drop_last=True,
                            num_workers=tr.cfg.data.num_workers, pin_memory=tr.device.type == "cuda",
                            generator=torch.Generator().manual_seed(tr.cfg.seed * 7919 + epoch))
        it = iter(loader)
        for _ in range(tr.steps_per_epoch - within):
            yield epoch, [next(it) for _ in range(tr.accumulate)]
        epoch, within = epoch + 1, 0


def _final_terms(parts: dict) -> list[str]:
    """The loss terms of the final prediction set (``loss_ce``, not the per-layer ``loss_ce_3``)."""
    return [k for k in parts if "_" not in k.removeprefix("loss_")]


def run_step(tr: Trainer, micro: list) -> StepResult:
    """One optimiser step over the micro-batches ``micro`` [(images, targets), ...] with the masking
    probabilities ``tr.probs`` (set by the annealing hook); advances ``tr.step``."""
    from study.train.optim import clip_gradients

    probs = tr.probs
    n, device, names, total = len(micro), tr.device, None, None
    for i, (images, targets) in enumerate(micro):
        # DDP all-reduces the gradients once, in the backward of the last micro-batch.
        sync = tr.ddp.no_sync() if tr.ddp is not None and i < n - 1 else nullcontext()
        with sync:
            with autocast(device, tr.precision):
                sets = tr.net(images.to(device, non_blocking=True))
            loss, parts = tr.criterion(sets, [{k: v.to(device, non_blocking=True) for k, v in tg.items()}
                                              for tg in targets])
            tr.scaler.scale(loss / n).backward()
        if names is None:
            names = ["loss", *_final_terms(parts)]
        values = torch.stack([loss.detach().float(), *(parts[k].detach().float() for k in names[1:])])
        total = values if total is None else total + values
        tr.images_seen += images.shape[0] * tr.env.world_size
    tr.scaler.unscale_(tr.optimizer)
    grad_norm = clip_gradients(tr.optimizer, tr.cfg.train.grad_clip)
    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.scheduler.step()
    tr.step += 1
    return StepResult(names, total / n, grad_norm.detach(), list(probs))


def log_values(tr: Trainer, result: StepResult) -> Optional[dict[str, float]]:
    """The step's losses averaged over processes (an all-reduce) and its gradient norm, read with one host
    sync on rank 0; None on the other ranks (which take part in the all-reduce only)."""
    values = result.values
    if tr.env.distributed:
        values = values.clone()
        dist.all_reduce(values)
        values /= tr.env.world_size
    if not tr.main:
        return None
    read = torch.cat([values, result.grad_norm.reshape(1).to(values)]).tolist()  # the one sync of a step
    return {**dict(zip(result.names, read[:-1])), "grad_norm": read[-1]}


def agree(tr: Trainer, result: StepResult, values: Optional[dict]) -> tuple[bool, bool]:
    """(every loss term finite, stop), the same on every process; stop: a deferred signal reached some
    process (``tr.stop_signal``). One process: from the values rank 0 already read. Under DDP: one small
    all-reduce (MAX) and host read per step on each rank, so that all ranks stop, or fail, at the same step
    (the checkpoint save is collective)."""
    stop = tr.stop_signal is not None
    if not tr.env.distributed:
        return all(math.isfinite(v) for k, v in values.items() if k != "grad_norm"), stop
    flags = torch.stack([(~torch.isfinite(result.values)).any().float(),
                         torch.tensor(float(stop), device=result.values.device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop_any = flags.tolist()
    return bad == 0, stop_any > 0
