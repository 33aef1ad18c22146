"""One trainer for every variant: ``train(cfg)`` runs or resumes the run folder of a configuration.

Three parts, each visible on its own:

- :func:`setup` builds what one process needs (data, model, DDP wrapper, optimiser, schedules, loss) into a
  :class:`Trainer`; the device comes from ``study.device.resolve_process_device`` (one convention for plain
  runs, torchrun and submitit).
- :func:`run_step` is one optimiser step: set the masking probabilities (mask annealing), run the micro-batches
  (forward under autocast, loss in float32, backward; DDP synchronises gradients on the last one), unscale,
  clip, step the optimiser and the lr schedule. It returns the losses as device tensors, averaged over the
  micro-batches; :func:`log_values` averages them over processes and reads them with one host sync.
- ``study.train.state`` saves and restores the state (one place each).

:func:`train` strings them together: per step ``run_step`` and a log row; a checkpoint every
``train.checkpoint_every`` steps and at the end; the run's status (:func:`_status`, one place) says running,
finished, failed or interrupted.

Faults (docs/design.md): rank 0 holds the run's writer lock (study/runs.py) for the whole training, so a
second trainer of the same folder is refused, and a killed one (SIGKILL, the OOM killer) shows as
interrupted. SIGTERM (what Slurm and ``scancel`` send before SIGKILL) and, inside a submitit job, its
time-limit signal (USR2) are deferred to the next safe point, between optimiser steps: the state is saved,
the run marked interrupted, then the process exits (for USR2 through submitit's own handler, which
requeues the job). A non-finite loss stops the run as failed before anything of that step is saved
(:class:`Diverged` names the step and the loss terms); the last good checkpoint stays.

Resuming restores model, optimiser, lr schedule, gradient scaler, step, the random states of every process
and the data order (the sampler and the augmentation are pure functions of seed, epoch and position), so on
the CPU in deterministic mode a resumed run ends bitwise identical to an uninterrupted one.
"""
from __future__ import annotations

import csv
import math
import os
import random
import signal
import sys
import threading
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
from study.device import (ProcessEnv, autocast, check_distinct_devices, init_distributed, resolve_precision,
                          resolve_process_device, set_deterministic)
from study.errors import UserError
from study.runs import RunDir
from study.train.state import restore_state, save_state

__all__ = ["ShardedSampler", "Trainer", "StepResult", "setup", "batches", "run_step", "log_values", "train"]


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
    fixed_probs: list[float]  # P_mask without annealing (read once: no host sync per step)
    dataset: Any  # the augmented training set
    sampler: ShardedSampler
    per_process: int  # images per micro-batch and process (data.batch_size)
    accumulate: int  # micro-batches per optimiser step
    steps_per_epoch: int
    total: int  # T, optimiser steps of the run
    step: int = 0  # optimiser steps done
    images_seen: int = field(default=0)  # over every process, since this process started

    @property
    def main(self) -> bool:
        return self.env.rank == 0


@dataclass
class StepResult:
    """One optimiser step, still on the device (reading it is a host sync; see :func:`log_values`)."""
    names: list[str]  # "loss", then the final prediction set's loss terms
    values: torch.Tensor  # (len(names),) this process's mean over the micro-batches
    grad_norm: torch.Tensor  # the global gradient norm before clipping (equal on every process)
    probs: list[float]  # P_mask per masked layer in this step


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
        fixed_probs=model.attn_mask_probs.tolist(), dataset=augmented, sampler=sampler,
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
    """One optimiser step over the micro-batches ``micro`` [(images, targets), ...]; advances ``tr.step``."""
    from study.train.optim import clip_gradients

    probs = tr.annealing.apply(tr.model, tr.step) if tr.annealing is not None else tr.fixed_probs
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


def _row(tr: Trainer, epoch: int, result: StepResult, values: dict, started: float) -> dict:
    groups = tr.optimizer.param_groups
    return {"step": tr.step, "epoch": epoch, "loss": values["loss"], "grad_norm": values["grad_norm"],
            "lr": max(g["lr"] for g in groups),
            "lr_backbone_top": max((g["lr"] for g in groups if g["backbone"]), default=0.0),
            "mask_prob_mean": float(np.mean(result.probs)) if result.probs else 0.0,
            "images_per_s": tr.images_seen / (time.perf_counter() - started),
            **{k: v for k, v in values.items() if k not in ("loss", "grad_norm")}}


class Diverged(UserError):
    """A non-finite loss: the run stops as failed; its last good checkpoint is kept."""


class Stopped(SystemExit):
    """Raised at a safe point after a deferred signal (the state is saved and the status written)."""


class _Signals:
    """Defers SIGTERM (and, when someone already handles it, submitit's time-limit signal) to a safe point:
    the handler only records the signal; :meth:`chain` later hands it to the handler it replaced."""

    def __init__(self):
        self.received: Optional[int] = None
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            return
        wanted = [signal.SIGTERM]
        usr = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
        if usr is not None and callable(signal.getsignal(usr)):  # submitit's checkpoint-and-requeue handler
            wanted.append(usr)
        for sig in wanted:
            self.previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def chain(self) -> None:
        """Give the recorded signal to the handler it replaced (submitit's requeues and exits; its SIGTERM
        handler only logs), then exit."""
        signum = self.received
        handler = self.previous.get(signum)
        self.restore()
        if callable(handler):
            handler(signum, None)
        raise Stopped(128 + signum)


def _verdict(tr: Trainer, result: StepResult, values: Optional[dict], signals: _Signals) -> tuple[bool, bool]:
    """(every loss term finite, a stop signal received), the same on every process. One process: from the
    values rank 0 already read. Under DDP: one small all-reduce (MAX) and host read per step on each rank,
    so that all ranks stop, or fail, at the same step (the checkpoint save is collective)."""
    stop = signals.received is not None
    if not tr.env.distributed:
        return all(math.isfinite(v) for k, v in values.items() if k != "grad_norm"), stop
    flags = torch.stack([(~torch.isfinite(result.values)).any().float(),
                         torch.tensor(float(stop), device=result.values.device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop_any = flags.tolist()
    return bad == 0, stop_any > 0


def _status(tr: Trainer, state: str, **fields) -> None:
    """The one place that writes the run's status (rank 0 only)."""
    if tr.main:
        tr.run.write_status(state, step=tr.step, total_steps=tr.total, **fields)


def progress_wanted(asked: Optional[bool] = None) -> bool:
    """Whether to draw progress bars: ``asked`` when given, else ``STUDY_PROGRESS`` (1 or 0) when set, else
    whether stderr, where tqdm draws, is a terminal (a job's log file gets no bar)."""
    if asked is not None:
        return bool(asked)
    env = os.environ.get("STUDY_PROGRESS", "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise UserError(f"STUDY_PROGRESS={env!r}: set it to 1 (bars) or 0 (none), or unset it")
    return sys.stderr.isatty()


def train(cfg: Config, run: RunDir | None = None, progress: Optional[bool] = None) -> RunDir:
    """Train (or resume, or skip when finished) the run of ``cfg``; returns its folder. ``progress``: a bar
    of the optimiser steps on rank 0 (None: :func:`progress_wanted` decides)."""
    run = run or RunDir.for_config(cfg)
    env = ProcessEnv.from_env()
    device = resolve_process_device(cfg.train.device)
    set_deterministic(cfg.train.deterministic, device)  # refused settings fail before the folder exists
    if env.rank != 0:  # rank 0 holds the run's lock for every process of the job
        return _train(cfg, run, env, device, False)
    with run.writing("train"):
        return _train(cfg, run, env, device, progress_wanted(progress))


def _train(cfg: Config, run: RunDir, env: ProcessEnv, device: torch.device, progress: bool) -> RunDir:
    init_distributed(device, env)
    check_distinct_devices(device, env)
    if env.rank == 0:
        run.claim(cfg)  # the folder must belong to this very configuration
    if run.status().get("state") == "finished":
        if env.rank == 0:
            print(f"study train: {run.path} is finished already; nothing to do")
        return run
    tr = setup(cfg, run, env, device)
    saved = tr.step if restore_state(tr) else None  # the step of the last good checkpoint
    if saved is not None and tr.main:
        print(f"study train: resuming {run.path} at step {tr.step} of {tr.total}")

    from tqdm import tqdm

    logger = _Logger(run, tr.step, tr.main, cfg.train.tensorboard)
    bar = tqdm(total=tr.total, initial=tr.step, disable=not (tr.main and progress), desc=f"train {run.path.name}",
               dynamic_ncols=True)
    _status(tr, "running", world_size=env.world_size)
    tr.model.train()
    started, row = time.perf_counter(), {}
    signals = _Signals()
    try:
        for epoch, micro in batches(tr, tr.step):
            if tr.step >= tr.total:
                break
            result = run_step(tr, micro)
            values = log_values(tr, result)
            if tr.main:
                row = _row(tr, epoch, result, values, started)
                logger.log(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
                bar.update(1)
            finite, stop = _verdict(tr, result, values, signals)
            if not finite:  # nothing of this step is saved: last.pt stays the last good state
                parts = ", ".join(f"{k}={v:.4g}" for k, v in (values or {}).items())
                kept = (f"its last good checkpoint {run.last_checkpoint} (step {saved}) is kept"
                        if saved is not None else "no checkpoint was written yet")
                raise Diverged(f"non-finite loss at step {tr.step} of {run.path} ({parts or 'on another rank'});"
                               f" training stopped, {kept}. Lower train.lr (now {cfg.train.lr:g}) or "
                               f"train.grad_clip, or check the data")
            if tr.step % cfg.train.checkpoint_every == 0 or tr.step == tr.total or stop:
                save_state(tr, final=tr.step == tr.total)
                saved = tr.step
                _status(tr, "running", world_size=env.world_size)
            if stop and tr.step < tr.total:
                name = signal.Signals(signals.received).name if signals.received else "a signal on another rank"
                _status(tr, "interrupted", reason=name, world_size=env.world_size)
                if tr.main:
                    print(f"study train: {name} received; {run.path} saved at step {tr.step} and marked "
                          f"interrupted (launch again to resume)")
                if signals.received is None:
                    raise Stopped(1)
                signals.chain()
    except Stopped:
        raise
    except Exception as e:
        _status(tr, "failed", error=f"{type(e).__name__}: {e}")
        raise
    except BaseException as e:  # SystemExit (a job's time limit or pre-emption, requeued) or Ctrl-C: resumable
        got = signals.received  # submitit's handler, chained after our save, exits through SystemExit
        _status(tr, "interrupted", reason=signal.Signals(got).name if got else type(e).__name__)
        raise
    finally:
        signals.restore()
        bar.close()
        logger.close()
    if tr.main:
        seconds = time.perf_counter() - started
        run.update_metrics(train={"steps": tr.total, "final_loss": row.get("loss"),
                                  "images_per_s": tr.images_seen / seconds if seconds else None,
                                  "world_size": env.world_size, "precision": tr.precision,
                                  "device": str(device)})
    _status(tr, "finished", world_size=env.world_size)
    return run


class _Logger:
    """CSV (and TensorBoard) per-step log; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, run: RunDir, step: int, main: bool, tensorboard: bool):
        self.main, self.csv, self.tb, self.fields = main, None, None, None
        if not main:
            return
        path = run.csv_log
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file():
            with open(path) as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        self.rows = kept
        self._path = path
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.tb_dir), purge_step=step + 1 if step else None)

    def log(self, row: dict) -> None:
        if not self.main:
            return
        self.rows.append(row)
        if self.fields is None:
            self.fields = list(row)
            with open(self._path, "w", newline="") as f:  # rewrite once: drops rows past a resumed step
                w = csv.DictWriter(f, self.fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(self.rows)
        else:
            with open(self._path, "a", newline="") as f:
                csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
