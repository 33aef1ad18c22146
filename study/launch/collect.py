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
import os
import subprocess
from pathlib import Path

import pandas as pd
import yaml

from study.launch.pipeline import FAILURE_FILE, STEPS, pending_steps
from study.runs import RunDir


def _launch_record(run: RunDir) -> dict:
    path = run.path / "launch.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_failure(run: RunDir) -> dict:
    """The run's failure.json (step, error, time) when it belongs to the latest submission, else {}: a job
    that dies before its first step cannot remove the previous attempt's record."""
    path = run.path / FAILURE_FILE
    if not path.is_file():
        return {}
    failure = json.loads(path.read_text())
    submitted = _launch_record(run).get("submitted")
    if submitted and failure.get("time", "") < submitted:  # ISO times compare as strings
        return {}
    return failure


# Slurm states after which a job no longer runs (squeue lists a job until shortly after it ends).
_SLURM_ENDED = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                "OUT_OF_MEMORY", "REVOKED")


def job_active(run: RunDir) -> bool:
    """Whether the job last submitted for ``run`` may still be queued or running: a second job on the same
    folder would race the first one's checkpoints. Raises RuntimeError when Slurm cannot be asked."""
    record = _launch_record(run)
    cluster, job_id = record.get("cluster"), str(record.get("job_id", ""))
    if cluster == "slurm":  # squeue knows a job from its submission (sacct may not yet) until it ends
        out = subprocess.run(["squeue", "--noheader", "--array", "--jobs", job_id, "--format", "%T"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            if "Invalid job id" in out.stderr:  # ended long enough ago to have left the queue
                return False
            raise RuntimeError(f"cannot tell whether Slurm job {job_id} of {run.path} still runs: squeue says "
                               f"{out.stderr.strip() or out.returncode}")
        return any(state not in _SLURM_ENDED for state in out.stdout.split())
    if cluster == "local" and job_id.isdigit():  # the job's process id
        proc = Path("/proc") / job_id
        if proc.is_dir():  # Linux: alive (not a zombie) and still a submitit job (pids get reused)
            try:
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:  # it ended meanwhile
                return False
            return state != "Z" and b"submitit" in cmdline
        try:
            os.kill(int(job_id), 0)
        except (ProcessLookupError, PermissionError):  # gone, or a reused pid of another user
            return False
        return True
    return False  # debug runs execute inside the launching process, which has returned


def run_state(run: RunDir, steps=None, active=None) -> str:
    """The state of a run folder, from its files and, for a launched run, whether its job still lives:

    pending (nothing submitted), submitted (queued, nothing written yet), running, interrupted (stopped by a
    time limit, a pre-emption, Ctrl-C or a job that died: a requeued job, or launching again, resumes it),
    lost (its job ended before writing anything), failed, trained (training done, evaluation or benchmark
    missing), complete (every step done: of ``steps``, else of the steps the run was launched with, else
    train, eval and bench). ``active`` replaces the job check (tests, or a caller that knows)."""
    record = _launch_record(run)
    status = run.status().get("state")  # the trainer's: running, interrupted, failed, finished (or none)
    if run_failure(run) or status == "failed":
        return "failed"
    if not pending_steps(run, steps or record.get("steps") or STEPS):
        return "complete"
    if record:
        alive = job_active(run) if active is None else active
        if alive:
            return "running" if status else "submitted"
        if status in (None, "running"):  # its job is gone without a word (SIGKILL, OOM, scancel, a lost node)
            return "interrupted" if status == "running" or run.last_checkpoint.is_file() else "lost"
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
    row.update(_flatten(metrics, "metrics."))
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
