"""Training you can follow: the logging hooks (study/train/hooks.py describes hooks), all on rank 0.

- :class:`CsvLogHook`: one row per optimiser step in ``logs/train.csv`` (and TensorBoard with
  ``train.tensorboard``): loss and its terms, gradient norm, lr, mean P_mask, images/s, and the validation
  metric at the steps that evaluated (``val_PQ`` / ``val_AP`` / ``val_mIoU``, empty elsewhere). On resume,
  rows after the checkpoint's step are dropped (they are redone).
- :class:`LogLineHook`: every ``train.log_every`` steps or ``train.log_every_s`` seconds, whichever comes
  first, and at the first and last step, one line to stdout and to ``logs/train.log`` in the run folder:
  step/total, the loss terms, lr, P_mask per masked layer, images/s since the last line and the ETA. It also
  writes when the run starts or resumes, each evaluation during training, the summary at the end and the error
  of a failed run. Under Slurm and in local submitit jobs stdout is the job's log file, so the same lines land
  there. stdout is flushed after each line.
- :class:`ProgressBarHook`: the interactive bar (tqdm, on stderr) when :func:`progress_wanted`.
"""
from __future__ import annotations

import csv
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from study.errors import UserError
from study.runs import RunDir
from study.train.hooks import Hook

if TYPE_CHECKING:
    from study.train.trainer import StepOutput, Trainer

__all__ = ["CsvLogHook", "LogLineHook", "ProgressBarHook", "progress_wanted", "log_file", "log_line"]


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


def log_file(run: RunDir) -> Path:
    """The run's text log, ``logs/train.log`` (appended to by every attempt, never truncated)."""
    return run.path / "logs" / "train.log"


def log_line(run: RunDir, text: str, stdout: bool = True) -> None:
    """One time-stamped line (UTC) appended to the run's text log and, with ``stdout``, printed and flushed
    (through tqdm, so that an interactive bar is redrawn below it)."""
    line = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} {run.path.name}: {text}"
    path = log_file(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")
    if stdout:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class LogLineHook(Hook):
    """The lines a person (or a job's log file) follows; see the module docstring."""

    def __init__(self, every: int, every_s: float):
        self.every, self.every_s = every, every_s
        self.first: Optional[int] = None  # the first step of this process
        self.mark = (0.0, 0, 0.0)  # (time, images seen, paused seconds) at the last line

    def before_train(self, tr: "Trainer") -> None:
        if not tr.main:
            return
        self.first = tr.step + 1
        self.mark = (time.perf_counter(), tr.images_seen, tr.paused_s)
        what = f"resuming at step {tr.step} of {tr.total}" if tr.step else f"starting, {tr.total} steps"
        images = tr.per_process * tr.accumulate * tr.env.world_size
        log_line(tr.run, f"{what}; {images} images per step, {tr.steps_per_epoch} steps per epoch, on "
                         f"{tr.device} ({tr.precision}, {tr.env.world_size} process(es))")

    def _due(self, tr: "Trainer", now: float) -> bool:
        if tr.step in (self.first, tr.total):
            return True
        if self.every and tr.step % self.every == 0:
            return True
        return bool(self.every_s) and now - self.mark[0] >= self.every_s

    def after_step(self, tr: "Trainer", out: "StepOutput") -> None:
        if not tr.main:
            return
        now = time.perf_counter()
        if out.extra:  # an evaluation of this step: always told
            log_line(tr.run, "validation at step {}: {}".format(
                tr.step, ", ".join(f"{k} {v:.2f}" for k, v in out.extra.items())))
        if not self._due(tr, now):
            return
        v = out.values
        terms = " ".join(f"{k} {x:.4f}" for k, x in v.items() if k not in ("loss", "grad_norm"))
        then, seen, paused = self.mark
        window = (now - then) - (tr.paused_s - paused)
        rate = (tr.images_seen - seen) / window if window > 0 else float("nan")
        done = tr.step - self.first + 1
        eta = tr.train_seconds() / done * (tr.total - tr.step)
        probs = "/".join(f"{p:.2f}" for p in out.result.probs) or "-"
        lr = max(g["lr"] for g in tr.optimizer.param_groups)
        log_line(tr.run, f"step {tr.step}/{tr.total} ({100 * tr.step / tr.total:.0f}%) loss {v['loss']:.4f} "
                         f"[{terms}] grad_norm {v['grad_norm']:.3g} lr {lr:.3e} P_mask {probs} | "
                         f"{rate:.2f} img/s | ETA {_duration(eta)}")
        self.mark = (now, tr.images_seen, tr.paused_s)

    def after_train(self, tr: "Trainer") -> None:
        if not tr.main:
            return
        seconds = tr.train_seconds()
        loss = (tr.last or {}).get("loss")
        rate = f"{tr.images_seen / seconds:.2f} img/s" if seconds > 0 else "no step run"
        log_line(tr.run, f"finished {tr.total} steps; this process trained {_duration(seconds)} ({rate}), "
                         f"evaluated {_duration(tr.paused_s)}; final loss "
                         f"{'-' if loss is None else f'{loss:.4f}'}")

    def on_exception(self, tr: "Trainer", exc: BaseException) -> None:
        if tr.main:
            kind = "failed" if isinstance(exc, Exception) else "stopped"
            log_line(tr.run, f"{kind} at step {tr.step} of {tr.total}: {type(exc).__name__}: {exc}")


def _row(tr: "Trainer", out: "StepOutput") -> dict:
    groups = tr.optimizer.param_groups
    values = out.values
    seconds = tr.train_seconds()
    return {"step": tr.step, "epoch": out.epoch, "loss": values["loss"], "grad_norm": values["grad_norm"],
            "lr": max(g["lr"] for g in groups),
            "lr_backbone_top": max((g["lr"] for g in groups if g["backbone"]), default=0.0),
            "mask_prob_mean": float(np.mean(out.result.probs)) if out.result.probs else 0.0,
            "images_per_s": tr.images_seen / seconds if seconds > 0 else float("nan"),
            **{k: v for k, v in values.items() if k not in ("loss", "grad_norm")}}


class CsvLogHook(Hook):
    """``logs/train.csv`` (and TensorBoard), one row per step; ``columns``: extra columns every row has (the
    validation metric), empty where a step did not evaluate."""

    def __init__(self, tensorboard: bool, columns: tuple[str, ...] = ()):
        self.tensorboard, self.columns = tensorboard, tuple(columns)
        self.path: Optional[Path] = None
        self.rows: list[dict] = []
        self.fields: Optional[list[str]] = None
        self.tb = None

    def before_train(self, tr: "Trainer") -> None:
        if not tr.main:
            return
        self.path = tr.run.csv_log
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            with open(self.path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= tr.step]
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tr.run.tb_dir), purge_step=tr.step + 1 if tr.step else None)

    def after_step(self, tr: "Trainer", out: "StepOutput") -> None:
        if not tr.main:
            return
        row = {**_row(tr, out), **{c: out.extra.get(c) for c in self.columns}}
        tr.last = row
        self.rows.append(row)
        if self.fields is None:
            self.fields = list(row)
            with open(self.path, "w", newline="") as f:  # rewrite once: drops rows past a resumed step
                w = csv.DictWriter(f, self.fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(self.rows)
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self, tr: "Trainer") -> None:
        if self.tb is not None:
            self.tb.close()


class ProgressBarHook(Hook):
    """tqdm's bar of the optimiser steps on rank 0, with the loss and lr (``STUDY_PROGRESS=1`` or a terminal)."""

    def __init__(self, shown: bool):
        self.shown, self.bar = shown, None

    def before_train(self, tr: "Trainer") -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=tr.total, initial=tr.step, disable=not (tr.main and self.shown),
                        desc=f"train {tr.run.path.name}", dynamic_ncols=True)

    def after_step(self, tr: "Trainer", out: "StepOutput") -> None:
        if tr.main and self.bar is not None:
            self.bar.set_postfix(loss=f"{out.values['loss']:.3f}", lr=f"{tr.last['lr']:.2e}" if tr.last else "")
            self.bar.update(1)

    def close(self, tr: "Trainer") -> None:
        if self.bar is not None:
            self.bar.close()
