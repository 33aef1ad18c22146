"""Submitting runs: Slurm job arrays and local subprocesses through submitit, or in this process (debug).

Only what is missing is submitted: a run whose folder already holds every requested step is skipped, an
interrupted one resumes (its folder name is the hash of its configuration). Slurm specifics live in the
``launch`` section of the configuration (study/launch/config.py) and never change a run's identity.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import submitit

from study.config import to_dict
from study.io import atomic_write_json
from study.launch.collect import job_active, run_failure, run_state
from study.launch.config import LaunchConfig
from study.launch.grid import GridRun
from study.launch.pipeline import STEPS, RunJob, pending_steps
from study.runs import RunDir


def executor_for(launch: LaunchConfig, folder: Path, job_name: str) -> submitit.Executor:
    """A submitit executor for ``launch.cluster`` (local or slurm) with the resources of ``launch``."""
    executor = submitit.AutoExecutor(  # max_num_timeout is a constructor argument (the local executor ignores it)
        folder=folder / "%j", cluster=launch.cluster, slurm_max_num_timeout=launch.max_requeues)
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
    action: str  # "skip" (complete), "active" (its job runs), "submit" (new), "resume" (has progress)
    job: Optional[submitit.Job] = None  # the submitted job (local, slurm)
    ran: bool = False  # run here, in this process (debug), already finished
    error: Optional[str] = None  # of a run that ran here


def plan(runs: list[GridRun], steps=STEPS) -> list[tuple[GridRun, str]]:
    """What launching would do for each run: skip (complete), active (its job is still queued or running),
    submit (new) or resume (has progress)."""
    out = []
    for r in runs:
        folder = RunDir(r.folder)
        if not pending_steps(folder, steps, r.config):
            out.append((r, "skip"))
        elif job_active(folder):
            out.append((r, "active"))
        elif folder.last_checkpoint.is_file() or folder.status().get("state") == "finished":
            out.append((r, "resume"))
        else:
            out.append((r, "submit"))
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _record(r: GridRun, cluster: str, job_id: str, steps, logs: Optional[Path], submitted: str) -> None:
    atomic_write_json(Path(r.folder) / "launch.json",
                      {"job_id": job_id, "cluster": cluster, "steps": list(steps), "submitted": submitted,
                       "logs": str(logs) if logs else None})


def _error_of(r: GridRun, e: BaseException) -> str:
    """The run's own record of what failed (failure.json), else the exception."""
    return run_failure(RunDir(r.folder)).get("error") or f"{type(e).__name__}: {e}"


def launch(runs: list[GridRun], grid_dir: Path, steps=STEPS, dry_run: bool = False,
           progress=print) -> list[Submitted]:
    """Start every run of ``runs`` with pending steps: one job array per launch configuration (local, slurm),
    or one run after another in this process (debug; a failed run is reported and the next one runs)."""
    decided = plan(runs, steps)
    out = {id(r): Submitted(r, a) for r, a in decided}
    todo = [(r, a) for r, a in decided if a in ("submit", "resume")]
    if dry_run or not todo:
        return list(out.values())
    for r, _ in todo:
        RunDir(r.folder).claim(r.config)  # the folder exists, and belongs to this configuration, before the job
    groups: dict[str, list[GridRun]] = {}
    for r, _ in todo:
        groups.setdefault(repr(r.config.launch), []).append(r)
    for members in groups.values():
        launch_cfg = members[0].config.launch
        if launch_cfg.cluster == "debug":
            for r in members:
                _record(r, "debug", f"inline-{os.getpid()}", steps, None, _now())
                progress(f"  running {Path(r.folder).name} here")
                try:
                    RunJob()(to_dict(r.config), tuple(steps))
                except Exception as e:  # noqa: BLE001 - reported; the other runs go on
                    out[id(r)].error = _error_of(r, e)
                out[id(r)].ran = True
            continue
        executor = executor_for(launch_cfg, grid_dir / ".submitit", grid_dir.name)
        submitted = _now()  # before the jobs start: a failure they record is never older than this
        with executor.batch():  # one Slurm job array for the group
            jobs = [executor.submit(RunJob(), to_dict(r.config), tuple(steps)) for r in members]
        for r, job in zip(members, jobs):
            _record(r, launch_cfg.cluster, str(job.job_id), steps, grid_dir / ".submitit" / str(job.job_id),
                    submitted)
            out[id(r)].job = job
    return list(out.values())


def wait(submitted: list[Submitted], progress=print) -> list[tuple[GridRun, Optional[str]]]:
    """Wait for the submitted jobs; returns (run, error or None) for every run that was started (those run here
    included). A failed run does not stop the others: its error is reported."""
    results = []
    for s in submitted:
        if s.job is not None:
            try:
                s.job.results()  # every task of the job (one per process under DDP)
            except Exception as e:  # noqa: BLE001 - a job's failure is reported, not raised
                s.error = _error_of(s.run, e)
        elif not s.ran:
            continue
        results.append((s.run, s.error))
        progress(f"  {Path(s.run.folder).name}: {run_state(RunDir(s.run.folder), active=False)}"
                 + (f" ({s.error})" if s.error else ""))
    return results
