"""The results table: one row per run folder, built by scanning folders (never by jobs writing one shared file).

Columns: ``run`` (folder name), ``path``, ``state`` (see :func:`run_state`), ``step``/``total_steps``, every
configuration key in dotted form (``model.variant``, ``train.lr``, ...), every number of ``metrics.json`` in
dotted form under ``metrics.`` (``metrics.eval.All.pq``, ``metrics.bench.gflops``, ...; the prefix keeps them
from overwriting configuration keys such as ``bench.fps``), and the headline metrics in percent as the paper
prints them: ``PQ``, ``PQ_th``, ``PQ_st`` (panoptic), ``AP`` (instance), ``mIoU`` (semantic), plus ``params_M``,
``GFLOPs`` and ``FPS``. ``analysis/`` reads only this table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Union

import pandas as pd

from study.errors import UserError
from study.runs import STEPS, RunDir, display_name


def run_failure(run: RunDir) -> dict:
    """:meth:`RunDir.failure` (kept for callers of the results table)."""
    return run.failure()


# Whether a run's job still lives: a value, a check per run (study.launch.submit.job_active), or None when
# nobody asks (the state then comes from the run's files alone).
Active = Union[None, bool, Callable[[RunDir], bool]]


def run_state(run: RunDir, steps=None, active: Active = None) -> str:
    """The state of a run folder, from its files, its writer's lock and, for a launched run, whether its job
    still lives:

    pending (nothing submitted), submitted (queued or starting: its job lives but nothing holds the run's
    lock yet), running (a process holds the run's lock), interrupted (stopped by a time limit, a
    pre-emption, SIGTERM, Ctrl-C, or killed: SIGKILL, the OOM killer, a lost node; a requeued job, or
    launching again, resumes it), lost (its job ended before writing anything), failed, trained (training
    done, evaluation or benchmark missing), complete (every step done: of ``steps``, else of the steps the
    run was launched with, else train, eval and bench).

    The lock (:meth:`RunDir.writer`) is the robust test: whoever writes a run holds it, and the kernel
    releases it when the holder dies, so a status.json that says "running" under a free lock is a dead
    run. ``active`` says whether the run's job is still queued or running: True/False, or a callable asked
    with the run (``study.launch.submit.job_active`` asks Slurm or the local process table); with None the
    job is not asked. Where the file system cannot lock, only the job tells."""
    record = run.launch_record()
    status = run.status().get("state")  # the trainer's: running, interrupted, failed, finished (or none)
    if run.failure() or status == "failed":
        return "failed"
    if run.weights_missing() and run.writer() != "held":
        return "weights missing"
    if not run.pending_steps(steps or record.get("steps") or STEPS):
        return "complete"
    lock = run.writer()  # "held", "free", or None (cannot tell)
    if lock == "held":
        return "running"
    alive = (active(run) if callable(active) else active) if record else None
    if alive:
        return "running" if lock is None and status else "submitted"
    if record and alive is None and status is None:
        return "submitted"
    gone = lock == "free" or alive is False  # nothing writes it, or its job ended
    if gone and status == "running":  # it died without a word (SIGKILL, OOM, scancel, a lost node)
        return "interrupted"
    if gone and record and status is None:
        return "interrupted" if run.last_checkpoint.is_file() else "lost"
    return {"running": "running", "interrupted": "interrupted", "finished": "trained"}.get(status, "pending")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)  # one cell: lists of sizes, stats, ...
        else:
            out[key] = v
    return out


def headline(metrics: dict) -> dict:
    """The numbers a paper table prints, in percent (PQ, AP, mIoU) and in its units (M, GFLOPs, FPS). A
    ``metrics.json`` missing one of them (an eval entry without "All") raises a UserError naming it."""
    try:
        return _headline(metrics)
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"metrics.json is damaged or partial: {type(e).__name__} {e} in its "
                        f"{'eval' if 'eval' in metrics else 'bench'} entry; evaluate the run again (study eval, "
                        f"or launch it) to rewrite it") from None


def _headline(metrics: dict) -> dict:
    out = {}
    ev = metrics.get("eval") or {}
    if ev.get("task") == "panoptic":
        out.update(PQ=100 * ev["All"]["pq"], PQ_th=100 * ev["Things"]["pq"], PQ_st=100 * ev["Stuff"]["pq"])
    elif ev.get("task") == "instance":
        out["AP"] = 100 * ev["AP"]
    elif ev.get("task") == "semantic":
        out["mIoU"] = 100 * ev["miou"]
    b = metrics.get("bench") or {}
    if "params" in b:
        out.update(params_M=b["params"] / 1e6, GFLOPs=b["gflops"])
    if b.get("fps") is not None:
        out["FPS"] = b["fps"]
        if b.get("fps_trusted") is not None:  # False: the machine was busy while timing (bench.fps_warning)
            out["FPS_trusted"] = b["fps_trusted"]
    return out


def run_row(run: RunDir, active: Active = None) -> dict:
    """One table row for one run folder (``active``: see :func:`run_state`). A run whose files are damaged
    is a row of state "damaged" naming the file in ``error``; the other runs go on."""
    try:
        return _run_row(run, active)
    except UserError as e:
        text = str(e) if str(run.path) in str(e) else f"{run.path}: {e}"
        return {"run": run.path.name, "name": display_name(run), "path": str(run.path), "state": "damaged",
                "error": text}


def _run_row(run: RunDir, active: Active) -> dict:
    if not run.config.is_file():
        raise UserError(f"{run.config} is missing: the run's configuration (and identity) is unknown; restore it, "
                        f"or remove the folder")
    config = run.saved_config()
    metrics = run.metrics()
    status = run.status()
    launch, failure = run.launch_record(), run.failure()
    row = {"run": run.path.name, "name": display_name(run), "path": str(run.path),
           "state": run_state(run, active=active),
           "step": status.get("step"), "total_steps": status.get("total_steps"), "job_id": launch.get("job_id"),
           "error": failure.get("error") or status.get("error")}
    row.update(headline(metrics))
    row.update(_flatten(config))
    row.update(_flatten(metrics, "metrics."))
    return row


# Files only a run folder holds: a folder with any of them is a run, even when its config.yaml is gone.
_RUN_FILES = ("config.yaml", "status.json", "metrics.json", "launch.json", "failure.json", "writer.lock")


def find_runs(root: str | Path) -> list[RunDir]:
    """Every run folder under ``root`` (``root`` itself included), sorted by path: a folder holding one of a
    run's own files, so that a run whose config.yaml was deleted is listed (as damaged), never dropped."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"no such folder: {root}; give a folder of runs (e.g. runs/<grid>)")
    folders = {p.parent for name in _RUN_FILES for p in root.rglob(name) if ".submitit" not in p.parts}
    return [RunDir(p) for p in sorted(folders)]


def collect(root: str | Path, active: Active = None) -> pd.DataFrame:
    """The results table of every run under ``root`` (empty, with the fixed columns, when there is none).
    ``active`` tells whether each run's job still lives (see :func:`run_state`); by default no job is asked."""
    rows = [run_row(r, active) for r in find_runs(root)]
    fixed = ["run", "state", "step", "total_steps"]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=fixed)
