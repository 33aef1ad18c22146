"""The hooks around the optimiser step that keep a run safe: mask annealing, divergence, checkpoints, the run's
status and signals. Each is a :class:`Hook`; study/train/loop.py calls them in order around
:func:`study.train.trainer.run_step` (the pattern of detectron2's ``HookBase``, and of the official EoMT code's
``on_train_batch_end``). The logging hooks are in study/train/logs.py, evaluation during training in
study/train/validation.py.

A hook may implement any of:

- ``before_train(tr)``: once, after the state is restored (``tr.step`` is where the run resumes);
- ``before_step(tr)``: before each optimiser step (``tr.step`` is the number of steps done);
- ``after_step(tr, out)``: after each step (``tr.step`` counts it; ``out`` is a
  :class:`study.train.trainer.StepOutput`); raising here stops the run;
- ``after_train(tr)``: once, when every step is done;
- ``on_exception(tr, exc)``: when anything of the above or the step raised (then it is raised again);
- ``close(tr)``: always, last, in reverse order.

Faults (docs/design.md): SIGTERM (what Slurm and ``scancel`` send before SIGKILL) and, inside a submitit job,
its time-limit signal (USR2) are deferred to the next safe point, between optimiser steps: the state is saved,
the run marked interrupted, then the process exits (for USR2 through submitit's own handler, which requeues
the job). A non-finite loss stops the run as failed before anything of that step is saved (:class:`Diverged`
names the step and the loss terms); the last good checkpoint stays.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Any, Optional

from study.errors import UserError
from study.train.state import save_state

if TYPE_CHECKING:
    from study.train.trainer import StepOutput, Trainer

__all__ = ["Hook", "AnnealingHook", "DivergenceHook", "CheckpointHook", "StatusHook", "SignalHook", "Diverged",
           "Stopped", "write_status"]


class Hook:
    """Base class: every method does nothing."""

    def before_train(self, tr: "Trainer") -> None:
        pass

    def before_step(self, tr: "Trainer") -> None:
        pass

    def after_step(self, tr: "Trainer", out: "StepOutput") -> None:
        pass

    def after_train(self, tr: "Trainer") -> None:
        pass

    def on_exception(self, tr: "Trainer", exc: BaseException) -> None:
        pass

    def close(self, tr: "Trainer") -> None:
        pass


class Diverged(UserError):
    """A non-finite loss: the run stops as failed; its last good checkpoint is kept."""


class Stopped(SystemExit):
    """Raised at a safe point after a deferred signal (the state is saved and the status written)."""


def write_status(tr: "Trainer", state: str, **fields) -> None:
    """The one place that writes the run's status during training (rank 0 only)."""
    if tr.main:
        tr.run.write_status(state, step=tr.step, total_steps=tr.total, world_size=tr.env.world_size, **fields)


class AnnealingHook(Hook):
    """Mask annealing: P_mask of each masked layer for the coming step (``tr.probs``, and the model's buffer).
    Without a schedule (a model that keeps its masks) ``tr.probs`` stays what the model was built with."""

    def before_step(self, tr: "Trainer") -> None:
        if tr.annealing is not None:
            tr.probs = tr.annealing.apply(tr.model, tr.step)


class DivergenceHook(Hook):
    """A non-finite loss term (on any process) fails the run at that step, before anything of it is saved:
    ``last.pt`` stays the last good state."""

    def after_step(self, tr: "Trainer", out: "StepOutput") -> None:
        if out.finite:
            return
        parts = ", ".join(f"{k}={v:.4g}" for k, v in (out.values or {}).items())
        kept = (f"its last good checkpoint {tr.run.last_checkpoint} (step {tr.saved_step}) is kept"
                if tr.saved_step is not None else "no checkpoint was written yet")
        raise Diverged(f"non-finite loss at step {tr.step} of {tr.run.path} ({parts or 'on another rank'}); "
                       f"training stopped, {kept}. Lower train.lr (now {tr.cfg.train.lr:g}) or train.grad_clip, "
                       f"or check the data")


class CheckpointHook(Hook):
    """``last.pt`` every ``train.checkpoint_every`` steps, at the end (with the final weights), and when a
    deferred signal asks to stop (study/train/state.py writes it)."""

    def after_step(self, tr: "Trainer", out: "StepOutput") -> None:
        if tr.step % tr.cfg.train.checkpoint_every == 0 or tr.step == tr.total or out.stop:
            save_state(tr, final=tr.step == tr.total)
            tr.saved_step = tr.step


class StatusHook(Hook):
    """status.json: running (with the step of each checkpoint), finished (after the training summary in
    metrics.json), failed (with the error) or interrupted (with the reason)."""

    def before_train(self, tr: "Trainer") -> None:
        write_status(tr, "running")

    def after_step(self, tr: "Trainer", out: "StepOutput") -> None:
        if tr.saved_step == tr.step:  # a checkpoint of this step was just written
            write_status(tr, "running")

    def after_train(self, tr: "Trainer") -> None:
        if tr.main:
            seconds = tr.train_seconds()
            tr.run.update_metrics(train={"steps": tr.total, "final_loss": (tr.last or {}).get("loss"),
                                         "images_per_s": tr.images_seen / seconds if seconds > 0 else None,
                                         "world_size": tr.env.world_size, "precision": tr.precision,
                                         "device": str(tr.device)})
        write_status(tr, "finished")

    def on_exception(self, tr: "Trainer", exc: BaseException) -> None:
        if isinstance(exc, Stopped):  # the signal hook saved and wrote "interrupted" already
            return
        if isinstance(exc, Exception):
            write_status(tr, "failed", error=f"{type(exc).__name__}: {exc}")
        else:  # SystemExit (a job's time limit or pre-emption, requeued) or Ctrl-C: resumable
            got = tr.stop_signal  # submitit's handler, chained after our save, exits through SystemExit
            write_status(tr, "interrupted", reason=signal.Signals(got).name if got else type(exc).__name__)


class SignalHook(Hook):
    """Defers SIGTERM (and, when someone already handles it, submitit's time-limit signal) to a safe point:
    the handler only records the signal in ``tr.stop_signal``; after the step that sees it (the checkpoint
    hook saves), the run is marked interrupted and the signal handed to the handler it replaced (submitit's
    requeues and exits; its SIGTERM handler only logs), then the process exits with 128 + the signal."""

    def __init__(self):
        self.previous: dict[int, Any] = {}
        self.tr: Optional["Trainer"] = None

    def before_train(self, tr: "Trainer") -> None:
        self.tr = tr
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            return
        wanted = [signal.SIGTERM]
        usr = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
        if usr is not None and callable(signal.getsignal(usr)):  # submitit's checkpoint-and-requeue handler
            wanted.append(usr)
        for sig in wanted:
            self.previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        self.tr.stop_signal = signum

    def after_step(self, tr: "Trainer", out: "StepOutput") -> None:
        if not out.stop or tr.step >= tr.total:
            return
        got = tr.stop_signal
        name = signal.Signals(got).name if got else "a signal on another rank"
        write_status(tr, "interrupted", reason=name)
        if tr.main:
            print(f"study train: {name} received; {tr.run.path} saved at step {tr.step} and marked interrupted "
                  f"(launch again to resume)", flush=True)
        if got is None:
            raise Stopped(1)
        handler = self.previous.get(got)
        self.close(tr)
        if callable(handler):
            handler(got, None)
        raise Stopped(128 + got)

    def close(self, tr: "Trainer") -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
