"""The results table: one row per run folder, built by scanning folders (never by jobs writing one shared file).

Columns: ``run`` (folder name), ``path``, ``state`` (see :func:`run_state`), ``step``/``total_steps``, every
configuration key in dotted form (``model.variant``, ``train.lr``, ...), every number of ``metrics.json`` in
dotted form (``eval.All.pq``, ``bench.gflops``, ...), and the headline metrics in percent as the paper prints
them: ``PQ``, ``PQ_th``, ``PQ_st`` (panoptic), ``AP`` (instance), ``mIoU`` (semantic), plus ``params_M``,
``GFLOPs`` and ``FPS``. ``analysis/`` reads only this table.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from study.runs import RunDir

# What a run folder's state is, from its files (a submitted job that has not started has only config.yaml
# and launch.json).
STATES = ("pending", "submitted", "running", "interrupted", "failed", "trained", "complete")


def _launch_record(run: RunDir) -> dict:
    path = run.path / "launch.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_failure(run: RunDir) -> dict:
    """The run's failure.json (step, error, time), or {} when its last attempt has not failed."""
    from study.launch.pipeline import FAILURE_FILE

    path = run.path / FAILURE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run_state(run: RunDir, steps=None) -> str:
    """pending (no record), submitted (a job id, no progress yet), running, interrupted (stopped by a time
    limit, a pre-emption or Ctrl-C: the requeued job, or launching again, resumes it), failed, trained
    (training done, evaluation or benchmark missing), complete (every step done: of ``steps``, else of the
    steps the run was launched with, else train, eval and bench)."""
    from study.launch.pipeline import STEPS, pending_steps

    steps = steps or _launch_record(run).get("steps") or STEPS
    status = run.status().get("state")
    if status == "failed" or run_failure(run):
        return "failed"
    if not pending_steps(run, steps):
        return "complete"
    if status in ("running", "interrupted"):
        return status
    if status == "finished":
        return "trained"
    return "submitted" if _launch_record(run) else "pending"


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
    """The numbers a paper table prints, in percent (PQ, AP, mIoU) and in its units (M, GFLOPs, FPS)."""
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
    return out


def run_row(run: RunDir) -> dict:
    """One table row for one run folder."""
    config = yaml.safe_load(run.config.read_text()) or {}
    metrics = run.metrics()
    status = run.status()
    launch, failure = _launch_record(run), run_failure(run)
    row = {"run": run.path.name, "path": str(run.path), "state": run_state(run),
           "step": status.get("step"), "total_steps": status.get("total_steps"), "job_id": launch.get("job_id"),
           "error": failure.get("error") or status.get("error")}
    row.update(headline(metrics))
    row.update(_flatten(config))
    row.update(_flatten(metrics))
    return row


def find_runs(root: str | Path) -> list[RunDir]:
    """Every run folder (one holding config.yaml) under ``root``, ``root`` itself included, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    return [RunDir(p.parent) for p in sorted(root.rglob("config.yaml"))]


def collect(root: str | Path) -> pd.DataFrame:
    """The results table of every run under ``root`` (empty, with the fixed columns, when there is none)."""
    rows = [run_row(r) for r in find_runs(root)]
    fixed = ["run", "state", "step", "total_steps"]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=fixed)
