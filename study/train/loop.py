"""One trainer for every variant: ``train(cfg)`` runs or resumes the run folder of a configuration.

The loop is short; everything else is a hook around the step:

- study/train/trainer.py: :func:`setup` builds what one process needs into a :class:`Trainer`,
  :func:`batches` gives the data order, :func:`run_step` is one optimiser step;
- study/train/state.py saves and restores the state (one place each);
- the hooks, called in this order after each step (study/train/hooks.py describes the protocol):
  mask annealing (before the step), evaluation during training (validation.py), the CSV/TensorBoard log, the
  progress bar and the followable text log (logs.py), divergence, checkpoint, status, signals (hooks.py).

:func:`run_loop` is the whole loop: ``before_train``; per step ``before_step``, :func:`run_step`, the values
read once (:func:`log_values`) and agreed by every process (:func:`agree`: finite, stop), ``after_step``;
``after_train``. Anything raised goes to every hook's ``on_exception`` and is raised again; ``close`` always
runs.

A run that fails before its first step (the data, the model, a contradiction between settings, a damaged
checkpoint) is marked failed with its error, like one that fails later; so is one whose evaluation set cannot
be built. Rank 0 holds the run's writer lock (study/runs.py) for the whole training, so a second trainer of
the same folder is refused, and a killed one (SIGKILL, the OOM killer) shows as interrupted.

Resuming restores model, optimiser, lr schedule, gradient scaler, step, the random states of every process
and the data order (the sampler and the augmentation are pure functions of seed, epoch and position), so on
the CPU in deterministic mode a resumed run ends bitwise identical to an uninterrupted one.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from study.config import Config
from study.data.sampler import ShardedSampler
from study.device import (ProcessEnv, check_distinct_devices, init_distributed, resolve_process_device,
                          set_deterministic)
from study.errors import UserError
from study.runs import RunDir
from study.train.hooks import (AnnealingHook, CheckpointHook, Diverged, DivergenceHook, Hook, SignalHook,
                               StatusHook, Stopped)
from study.train.logs import CsvLogHook, LogLineHook, ProgressBarHook, log_line, progress_wanted
from study.train.state import restore_state
from study.train.trainer import (StepOutput, StepResult, Trainer, agree, batches, log_values, run_step,
                                 setup)

__all__ = ["ShardedSampler", "Trainer", "StepResult", "StepOutput", "setup", "batches", "run_step",
           "log_values", "train", "run_loop", "default_hooks", "Hook", "Diverged", "Stopped", "progress_wanted"]


def default_hooks(tr: Trainer, progress: bool) -> list[Hook]:
    """The hooks of a training run, in the order they are called."""
    t = tr.cfg.train
    hooks: list[Hook] = [AnnealingHook()]
    columns: tuple[str, ...] = ()
    if t.eval_every:
        from study.train.validation import EvalHook

        hooks.append(EvalHook(t.eval_every, tr.cfg.task))
        columns = (hooks[-1].column,)
    hooks += [CsvLogHook(t.tensorboard, columns), ProgressBarHook(progress), LogLineHook(t.log_every, t.log_every_s),
              DivergenceHook(), CheckpointHook(), StatusHook(), SignalHook()]
    return hooks


def run_loop(tr: Trainer, hooks: Sequence[Hook]) -> None:
    """Train ``tr`` from ``tr.step`` to ``tr.total`` with ``hooks`` (see the module docstring)."""
    import time

    tr.model.train()
    tr.started = time.perf_counter()
    try:
        for h in hooks:
            h.before_train(tr)
        for epoch, micro in batches(tr, tr.step):
            if tr.step >= tr.total:
                break
            for h in hooks:
                h.before_step(tr)
            result = run_step(tr, micro)
            values = log_values(tr, result)
            finite, stop = agree(tr, result, values)
            out = StepOutput(epoch, result, values, finite, stop)
            for h in hooks:
                h.after_step(tr, out)
        for h in hooks:
            h.after_train(tr)
    except BaseException as e:
        for h in hooks:
            h.on_exception(tr, e)
        raise
    finally:
        for h in reversed(hooks):
            h.close(tr)


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
        if env.rank == 0 and run.weights_missing():
            raise UserError(f"{run.path} finished training but its final weights {run.final_weights} are gone; "
                            f"`study launch GRID --steps train,eval` trains it again (the old results set aside)")
        if env.rank == 0:
            print(f"study train: {run.path} is finished already; nothing to do", flush=True)
        return run
    try:
        tr = setup(cfg, run, env, device)
        if restore_state(tr):
            tr.saved_step = tr.step  # the step of the last good checkpoint
    except Exception as e:  # before step 1: the run must not look pending (or still running)
        if env.rank == 0:
            before = run.status()
            run.write_status("failed", step=before.get("step", 0), total_steps=before.get("total_steps"),
                             error=f"{type(e).__name__}: {e}")
            log_line(run, f"failed before its first step: {type(e).__name__}: {e}")
        raise
    run_loop(tr, default_hooks(tr, progress))
    return run
