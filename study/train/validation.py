"""Evaluation during training (``train.eval_every`` steps; 0 = off), a hook (study/train/hooks.py).

Every ``train.eval_every`` optimiser steps, rank 0 scores the model as it is at that step on ``eval.split``
(default ``data.val_split``) through the evaluation of ``study eval`` (:func:`study.eval.run.evaluate`, with
the ``eval`` section's settings, on the training device, without exporting predictions, at most
``train.eval_max_images`` images when set). The result is recorded at once, so that an interrupted run keeps
it:

- ``metrics.json``'s ``eval_history``: a list of entries ``{"step", "seconds", "split", "PQ" | "AP" | "mIoU",
  "eval"}``: the task's headline metric in percent under its name in the paper's tables, and under ``eval`` the
  fields of ``metrics.json``'s final ``eval`` (the evaluation result without its per-class tables);
- ``logs/train.csv``'s ``val_PQ`` / ``val_AP`` / ``val_mIoU`` column (percent) at that step, which the
  training-curve figure plots (analysis/plots.py ``training_curves``), and one line of the text log.

The evaluation leaves the training as it would have been without it: every random state (Python, NumPy,
torch, this process's CUDA generator) is restored afterwards and the model put back in training mode, so a
run with evaluations ends with the same weights as one without; its time is left out of images/s and the
ETA. On resume, history entries after the checkpoint's step are dropped (they are redone). Under DDP only
rank 0 evaluates; the other ranks wait for it in the next step's gradient all-reduce (a long evaluation must
stay inside the process group's timeout).
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

from study.errors import UserError
from study.runs import EVAL_DETAILS
from study.train.hooks import Hook
from study.train.state import rng_state, set_rng_state

if TYPE_CHECKING:
    from study.train.trainer import StepOutput, Trainer

__all__ = ["EvalHook", "VALIDATION_METRIC"]

# The number a training curve follows per task (percent, named as the paper's tables name it), from the
# evaluation result of study.eval.run.evaluate.
VALIDATION_METRIC: dict[str, tuple[str, Callable[[dict], float]]] = {
    "panoptic": ("PQ", lambda r: 100 * r["All"]["pq"]),
    "instance": ("AP", lambda r: 100 * r["AP"]),
    "semantic": ("mIoU", lambda r: 100 * r["miou"]),
}


class EvalHook(Hook):
    """See the module docstring; ``column`` is the log's validation column."""

    def __init__(self, every: int, task: str):
        if task not in VALIDATION_METRIC:
            raise UserError(f"train.eval_every is set but task '{task}' has no validation metric; choose one of "
                            f"{', '.join(VALIDATION_METRIC)}")
        self.every = every
        self.name, self.metric = VALIDATION_METRIC[task]
        self.column = f"val_{self.name}"
        self.dataset: Any = None
        self.history: list[dict] = []

    def before_train(self, tr: "Trainer") -> None:
        if not tr.main:
            return
        from study.data import build_dataset

        cfg = tr.cfg
        self.split = cfg.eval.split or cfg.data.val_split
        self.dataset = build_dataset(cfg.data, self.split, cfg.task)  # a missing split fails before step 1
        kept = [e for e in tr.run.metrics().get("eval_history", []) if e.get("step", 0) <= tr.step]
        self.history = kept
        tr.run.update_metrics(eval_history=kept)

    def after_step(self, tr: "Trainer", out: "StepOutput") -> None:
        if not (tr.main and out.finite and not out.stop and tr.step % self.every == 0):  # a stop signal: save first
            return
        from study.eval.run import evaluate

        cfg = tr.cfg
        settings = replace(cfg.eval, device=str(tr.device), export_dir=None,
                           max_images=cfg.train.eval_max_images or cfg.eval.max_images)
        saved = rng_state(tr.device)
        t0 = time.perf_counter()
        try:
            result = evaluate(tr.model, self.dataset, cfg.task, settings, cfg.eval.input_size or cfg.model.img_size,
                              progress=False)
        finally:
            set_rng_state(saved, tr.device)
            tr.model.train()
        seconds = time.perf_counter() - t0
        tr.paused_s += seconds
        value = self.metric(result)
        self.history.append({"step": tr.step, "seconds": round(seconds, 3), "split": self.split, self.name: value,
                             "eval": {k: v for k, v in result.items() if k not in EVAL_DETAILS}})
        tr.run.update_metrics(eval_history=self.history)
        out.extra[self.column] = value
