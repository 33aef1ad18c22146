"""Submitting runs through submitit: Slurm, local subprocesses, or in-process (debug).

Only what is missing is submitted: a run whose folder already holds every requested step is skipped, an
interrupted one resumes (its folder name is the hash of its configuration). Slurm specifics live in the
``launch`` section of the configuration (study/launch/config.py) and never change a run's identity.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import submitit

from study.config import to_dict
from study.io import atomic_write_json
from study.launch.collect import run_failure, run_state
from study.launch.config import LaunchConfig
from study.launch.grid import GridRun
from study.launch.pipeline import STEPS, RunJob, pending_steps
from study.runs import RunDir


def executor_for(launch: LaunchConfig, folder: Path, job_name: str) -> submitit.Executor:
    """A submitit executor for ``launch.cluster`` with the resources of ``launch``."""
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=launch.cluster)
    params = dict(name=job_name, timeout_min=launch.timeout_min, nodes=launch.nodes,
                  tasks_per_node=launch.tasks(), gpus_per_node=launch.gpus_per_node,
                  cpus_per_task=launch.cpus_per_task, mem_gb=launch.mem_gb)
    if launch.cluster == "slurm":
        params.update(slurm_array_parallelism=launch.array_parallelism,
                      # USR2 shortly before the time limit: submitit checkpoints and requeues (RunJob resumes)
                      slurm_signal_delay_s=launch.signal_delay_s)
        if launch.partition:
            params["slurm_partition"] = launch.partition
        if launch.slurm_extra:
            params["slurm_additional_parameters"] = dict(launch.slurm_extra)
    executor.update_parameters(**params)
    return executor


@dataclass
class Submitted:
    run: GridRun
    job: Optional[submitit.Job]  # None: nothing submitted (complete, still active, or a dry run)
    action: str  # "skip" (complete), "active" (its job runs), "submit" (new), "resume" (has progress)


# Slurm states of a job that may still write into its run folder.
_SLURM_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")


def job_active(run: RunDir) -> bool:
    """Whether the job last submitted for ``run`` may still be queued or running: a second job on the same
    folder would race the first one's checkpoints."""
    path = run.path / "launch.json"
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    cluster, job_id = record.get("cluster"), str(record.get("job_id", ""))
    if cluster == "slurm":  # squeue knows a job from its submission (sacct may not yet) until it ends
        out = subprocess.run(["squeue", "--noheader", "--array", "--jobs", job_id, "--format", "%T"],
                             capture_output=True, text=True)
        return out.returncode == 0 and any(st in _SLURM_ACTIVE for st in out.stdout.split())
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
    return False  # debug jobs run inside the launching process


def plan(runs: list[GridRun], steps=STEPS) -> list[tuple[GridRun, str]]:
    """What launching would do for each run: skip (complete), active (its job is still queued or running),
    submit (new) or resume (has progress)."""
    out = []
    for r in runs:
        folder = RunDir(r.folder)
        if not pending_steps(folder, steps):
            out.append((r, "skip"))
        elif job_active(folder):
            out.append((r, "active"))
        elif folder.last_checkpoint.is_file() or folder.status().get("state") == "finished":
            out.append((r, "resume"))
        else:
            out.append((r, "submit"))
    return out


def launch(runs: list[GridRun], grid_dir: Path, steps=STEPS, dry_run: bool = False) -> list[Submitted]:
    """Submit every run of ``runs`` with pending steps, as one job array per launch configuration."""
    decided = plan(runs, steps)
    todo = [(r, a) for r, a in decided if a in ("submit", "resume")]
    out = [Submitted(r, None, a) for r, a in decided if a in ("skip", "active")]
    if dry_run or not todo:
        return out + [Submitted(r, None, a) for r, a in todo]
    for r, _ in todo:
        RunDir(r.folder).claim(r.config)  # the folder exists, and belongs to this configuration, before the job
    groups: dict[str, list] = {}
    for r, a in todo:
        groups.setdefault(repr(r.config.launch), []).append((r, a))
    for members in groups.values():
        launch_cfg = members[0][0].config.launch
        executor = executor_for(launch_cfg, grid_dir / ".submitit", grid_dir.name)
        jobs = []
        with executor.batch():  # one Slurm job array for the group
            for r, _ in members:
                jobs.append(executor.submit(RunJob(), to_dict(r.config), tuple(steps)))
        for (r, a), job in zip(members, jobs):
            atomic_write_json(Path(r.folder) / "launch.json",
                              {"job_id": str(job.job_id), "cluster": launch_cfg.cluster, "steps": list(steps),
                               "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "logs": str(grid_dir / ".submitit" / str(job.job_id))})
            out.append(Submitted(r, job, a))
    order = {id(r): i for i, r in enumerate(runs)}
    return sorted(out, key=lambda s: order[id(s.run)])


def wait(submitted: list[Submitted], progress=print) -> list[tuple[GridRun, Optional[str]]]:
    """Wait for the jobs; returns (run, error or None) for every submitted run. A failed run does not stop the
    others: its error is reported (and its status.json says 'failed' when training raised)."""
    results = []
    for s in submitted:
        if s.job is None:
            continue
        try:
            s.job.results()  # every task of the job (one per process under DDP)
            error = None
        except Exception as e:  # noqa: BLE001 - a job's failure is reported, not raised
            # the run's own record names the error; submitit's exception ends with the log's path
            failure = run_failure(RunDir(s.run.folder)).get("error")
            logs = getattr(s.job, "paths", None)
            error = failure or f"{type(e).__name__} (see {logs.stderr if logs else 'the job log'})"
        results.append((s.run, error))
        progress(f"  {Path(s.run.folder).name}: {run_state(RunDir(s.run.folder))}"
                 + (f" ({error})" if error else ""))
    return results
