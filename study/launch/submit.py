"""Submitting runs: Slurm job arrays and local subprocesses through submitit, or in this process (debug).

Only what is missing is submitted: a run whose folder already holds every requested step is skipped, an
interrupted one resumes (its folder name is the hash of its configuration). Slurm specifics live in the
``launch`` section of the configuration (study/launch/config.py) and never change a run's identity.

GPUs of local jobs (``launch.cluster=local``): submitit's local executor shows a job only the GPUs it asks
for (it sets ``CUDA_VISIBLE_DEVICES``), and by default every job the same first ones. Here each job is given
``launch.gpus_per_node`` GPUs of its own from the GPUs this process sees (:func:`local_gpu_plan`); when the
runs do not all fit at once, they queue in as many jobs as fit, each running its runs one after another
(:class:`study.launch.pipeline.RunQueue`). Inside a job, ``CUDA_VISIBLE_DEVICES`` is exactly the job's GPUs and
its task of local rank r uses the r-th of them (study/device.py). Without ``gpus_per_node`` the jobs run on
the CPU, with a warning when GPUs are present.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import submitit

from study.config import to_dict
from study.errors import UserError
from study.launch.collect import run_state
from study.launch.config import LaunchConfig
from study.launch.grid import GridRun
from study.launch.config import STEPS
from study.launch.pipeline import RunJob, RunQueue
from study.locks import FolderLock, now
from study.runs import RunDir


def executor_for(launch: LaunchConfig, folder: Path, job_name: str,
                 gpus: Optional[tuple[str, ...]] = None) -> submitit.Executor:
    """A submitit executor for ``launch.cluster`` (local or slurm) with the resources of ``launch``; ``gpus``
    (local only) are the device ids, as this process's ``CUDA_VISIBLE_DEVICES`` names them, its jobs see."""
    if launch.cluster == "slurm":
        check_slurm()
    executor = submitit.AutoExecutor(  # max_num_timeout is a constructor argument (the local executor ignores it)
        folder=folder / "%j", cluster=launch.cluster, slurm_max_num_timeout=launch.max_requeues)
    params = executor_settings(launch, job_name)
    if launch.cluster != "slurm" and gpus:  # submitit would show the job GPUs 0..gpus_per_node-1 (its visible_gpus is not reachable
        # through AutoExecutor, and takes integers only): the job's shell sets them before submitit starts
        params["local_setup"] = [f"export CUDA_VISIBLE_DEVICES={','.join(gpus)}"]
    executor.update_parameters(**params)
    return executor


def executor_settings(launch: LaunchConfig, job_name: str) -> dict:
    """The resources submitit is given (for Slurm: the sbatch settings; a Slurm dry run prints them)."""
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
    return params


def check_slurm() -> str:
    """The path of sbatch; a UserError when this machine cannot submit to Slurm (submitit would say only
    "Could not detect srun")."""
    sbatch = shutil.which("sbatch")
    if sbatch is None or shutil.which("srun") is None:
        raise UserError("launch.cluster=slurm, but this machine has no sbatch/srun on its PATH: launch from a "
                        "Slurm login node, or use --cluster local (processes here) or --cluster debug")
    return sbatch


def visible_gpus() -> list[str]:
    """The GPUs this process sees, as ``CUDA_VISIBLE_DEVICES`` names them (indices when it is unset)."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [g.strip() for g in listed.split(",") if g.strip()][:count]


def local_gpu_plan(num_runs: int, gpus_per_job: int, gpus: list[str]) -> list[tuple[tuple[str, ...], list[int]]]:
    """How local runs share this machine's GPUs: a list of (the job's GPUs, the indices of the runs it
    executes one after another). Jobs never share a GPU: with room for k jobs at once, k jobs, the runs dealt
    round-robin; without GPUs per job, one job per run on the CPU (a warning when GPUs are present)."""
    if gpus_per_job == 0:
        if gpus:
            warnings.warn(f"this machine has {len(gpus)} GPU(s) but launch.gpus_per_node is 0: the local jobs "
                          f"run on the CPU; set launch.gpus_per_node (--set launch.gpus_per_node=1) to use them",
                          stacklevel=2)
        return [((), [i]) for i in range(num_runs)]
    slots = len(gpus) // gpus_per_job
    if slots == 0:
        raise UserError(f"launch.gpus_per_node={gpus_per_job} but this machine shows {len(gpus)} GPU(s) "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); lower "
                        f"launch.gpus_per_node or launch on a cluster")
    lanes = min(slots, num_runs)
    return [(tuple(gpus[j * gpus_per_job:(j + 1) * gpus_per_job]), list(range(j, num_runs, lanes)))
            for j in range(lanes)]


# Slurm states after which a job no longer runs (squeue lists a job until shortly after it ends).
_SLURM_ENDED = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                "OUT_OF_MEMORY", "REVOKED")


def job_active(run: RunDir) -> bool:
    """Whether a process writes ``run`` now (its lock is held) or any job it was ever submitted as (every
    record of launch.json's ``jobs``, not only the latest: a job of an earlier launch may still train) may
    still be queued or running: a second job on the same folder would only be refused by the lock when it
    starts. Raises a UserError when Slurm cannot be asked. Pass it as ``active=`` to study.launch.collect's
    run_state / run_row / collect."""
    if run.writer() == "held":
        return True
    return any(_one_job_active(run, job) for job in run.launch_jobs())


def _pid_alive(pid: str, marker: bytes) -> bool:
    """Whether process ``pid`` of this host lives (not a zombie) and its command line holds ``marker``
    (process ids get reused)."""
    proc = Path("/proc") / pid
    if proc.is_dir():  # Linux
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # it ended meanwhile
            return False
        return state != "Z" and marker in cmdline
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, PermissionError):  # gone, or a reused pid of another user
        return False
    return True


def _one_job_active(run: RunDir, job: dict) -> bool:
    cluster, job_id = job.get("cluster"), str(job.get("job_id", ""))
    if cluster == "slurm":  # squeue knows a job from its submission (sacct may not yet) until it ends
        try:
            out = subprocess.run(["squeue", "--noheader", "--array", "--jobs", job_id, "--format", "%T"],
                                 capture_output=True, text=True)
        except FileNotFoundError:
            raise UserError(f"{run.path} was launched on Slurm (job {job_id}) but this machine has no squeue; "
                            f"ask from a Slurm login node") from None
        if out.returncode != 0:
            if "Invalid job id" in out.stderr:  # ended long enough ago to have left the queue
                return False
            raise UserError(f"cannot tell whether Slurm job {job_id} of {run.path} still runs: squeue says "
                            f"{out.stderr.strip() or out.returncode}")
        return any(state not in _SLURM_ENDED for state in out.stdout.split())
    here = job.get("host") in (None, socket.gethostname())  # records written before hosts were kept: here
    if cluster == "local" and job_id.isdigit() and here:  # the job's process id
        return _pid_alive(job_id, b"submitit")
    if cluster == "debug" and job_id.startswith("inline-") and here:  # the launching process runs it
        pid = job_id.removeprefix("inline-")
        if pid == str(os.getpid()):  # this very process: its runs are done unless one holds the lock now
            return False
        try:
            started = Path("/proc", pid, "stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            return False
        return started == job.get("process_start", started)
    return False  # another host's local job: only its lock (checked first) tells


def check_inputs(r: GridRun, opened: dict | None = None) -> None:
    """The inputs a run names open, at ``--dry-run`` or before submitting, not in a job hours later: the
    weights files load (``model.pretrained``, ``model.checkpoint``, ``model.init_from``: a file, or a run
    folder whose final weights the run starts from; a 0-byte or damaged file is refused) and the data set's
    splits are read in their layout (``data.root``, ``data.dataset``: a folder of another layout is refused).
    ``opened`` caches what was opened already (a grid's runs mostly share them)."""
    from study.data.build import build_dataset
    from study.models.weights import read_weights

    cfg = r.config
    opened = {} if opened is None else opened
    where = ", ".join(f"{k}={v}" for k, v in r.changes.items())

    def refuse(key: str, why: str) -> UserError:
        return UserError(f"run {Path(r.folder).name} ({where}): {key} {why} (relative paths are from "
                         f"{Path.cwd()}); fix {key} in the grid or with --set")

    weights = [("model.pretrained", cfg.model.pretrained), ("model.checkpoint", cfg.model.checkpoint),
               ("model.init_from", cfg.model.init_from)]
    for key, value in weights:
        if not value:
            continue
        path = Path(value)
        if key == "model.init_from" and path.is_dir():
            path = RunDir(path).final_weights
            if not path.is_file():
                raise refuse(key, f"{value} is a folder but not a trained run: it has no {path.relative_to(value)}")
        if path not in opened:
            if not path.is_file():
                raise refuse(key, f"{value} is not an existing file" + (" or run folder" if "init" in key else ""))
            try:
                opened[path] = bool(read_weights(path, key))
            except UserError as e:
                raise refuse(key, f"{value} does not load: {e}") from None
    if cfg.data.root and not Path(cfg.data.root).is_dir():
        raise refuse("data.root", f"{cfg.data.root} is not an existing folder")
    if cfg.data.dataset != "synthetic":  # the synthetic set is generated by the run itself
        for split in dict.fromkeys([cfg.data.train_split, cfg.eval.split or cfg.data.val_split]):
            key = (repr(cfg.data), split, cfg.task)
            if key not in opened:
                try:
                    opened[key] = len(build_dataset(cfg.data, split, cfg.task))
                except UserError as e:
                    raise refuse("data.root", f"{cfg.data.root}: split '{split}' of data.dataset={cfg.data.dataset} "
                                          f"cannot be read in its layout: {e}") from None


@dataclass
class Submitted:
    run: GridRun
    # "skip" (complete), "active" (its job runs), "submit" (new), "resume" (has progress), "damaged" (a file of
    # its folder cannot be read: reported in ``error``, nothing submitted, the other runs go on)
    action: str
    job: Optional[submitit.Job] = None  # the submitted job (local, slurm)
    position: Optional[int] = None  # its place in the job's queue of runs (a local RunQueue job), else None
    ran: bool = False  # run here, in this process (debug), already finished
    error: Optional[str] = None  # of a run that ran here


def plan(runs: list[GridRun], steps=STEPS, errors: dict | None = None) -> list[tuple[GridRun, str]]:
    """What launching would do for each run: skip (complete), active (its job is still queued or running),
    submit (new), resume (has progress) or damaged (a file of its folder cannot be read; its message goes to
    ``errors[id(run)]``): one damaged run never stops the others."""
    out = []
    for r in runs:
        folder = RunDir(r.folder)
        try:
            if not folder.pending_steps(steps, r.config):
                out.append((r, "skip"))
            elif job_active(folder):
                out.append((r, "active"))
            elif folder.last_checkpoint.is_file() or folder.status().get("state") == "finished":
                out.append((r, "resume"))
            else:
                out.append((r, "submit"))
        except UserError as e:
            out.append((r, "damaged"))
            if errors is not None:
                errors[id(r)] = str(e)
    return out


def _error_of(r: GridRun, fallback: str) -> str:
    """The run's own record of what failed (failure.json), else ``fallback``."""
    try:
        return RunDir(r.folder).failure().get("error") or fallback
    except UserError:  # a damaged failure.json
        return fallback


def launch(runs: list[GridRun], grid_dir: Path, steps=STEPS, dry_run: bool = False,
           progress=print) -> list[Submitted]:
    """Start every run of ``runs`` with pending steps: one job array per launch configuration (local, slurm),
    or one run after another in this process (debug; a failed run is reported and the next one runs).

    Every run's input files are checked first (:func:`check_inputs`). Planning and submitting hold the
    grid's launch lock (``<grid>/.launch.lock``): two launches at once never both submit a run (the second
    sees the first one's jobs as active)."""
    opened: dict = {}
    for r in runs:
        check_inputs(r, opened)
    inline: list[GridRun] = []
    if dry_run:  # writes nothing, not even the grid folder
        return list(_launch(runs, grid_dir, steps, True, progress, inline).values())
    with FolderLock(Path(grid_dir) / ".launch.lock", f"grid folder {grid_dir}").hold("launch", wait_s=120):
        out = _launch(runs, grid_dir, steps, dry_run, progress, inline)
    for r in inline:  # debug runs execute here, after the launch lock is released (their own locks stay)
        progress(f"  running {Path(r.folder).name} here")
        try:
            RunJob()(to_dict(r.config), tuple(steps))
        except Exception as e:  # noqa: BLE001 - reported; the other runs go on
            out[id(r)].error = _error_of(r, f"{type(e).__name__}: {e}")
        out[id(r)].ran = True
    return list(out.values())


def _process_start() -> str:
    """This process's start time in clock ticks since boot (/proc/self/stat field 22; '' elsewhere): with the
    pid it names the process, which a reused pid does not match."""
    try:
        return Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _launch(runs: list[GridRun], grid_dir: Path, steps, dry_run: bool, progress,
            inline: list[GridRun]) -> dict[int, Submitted]:
    """Plan and submit (under the launch lock); the debug runs are recorded and appended to ``inline``."""
    errors: dict = {}
    decided = plan(runs, steps, errors)
    out = {id(r): Submitted(r, a, error=errors.get(id(r))) for r, a in decided}
    todo = [(r, a) for r, a in decided if a in ("submit", "resume")]
    if dry_run or not todo:
        return out
    for r, _ in todo:
        RunDir(r.folder).claim(r.config)  # the folder exists, and belongs to this configuration, before the job
    seqs = {id(r): RunDir(r.folder).next_seq() for r, _ in todo}  # taken before any job can record a failure
    groups: dict[str, list[GridRun]] = {}
    for r, _ in todo:
        groups.setdefault(repr(r.config.launch), []).append(r)
    for members in groups.values():
        launch_cfg = members[0].config.launch
        if launch_cfg.cluster == "debug":
            for r in members:
                RunDir(r.folder).write_launch_record(f"inline-{os.getpid()}", "debug", steps, submitted=now(),
                                                     seq=seqs[id(r)], process_start=_process_start())
                inline.append(r)
            continue
        logs = grid_dir / ".submitit"
        submitted = now()  # before the jobs start: a failure they record is never older than this
        if launch_cfg.cluster == "local":
            plan_ = local_gpu_plan(len(members), launch_cfg.gpus_per_node, visible_gpus())
            for gpus, queue in plan_:
                executor = executor_for(launch_cfg, logs, grid_dir.name, gpus)
                if len(queue) == 1:
                    job = executor.submit(RunJob(), to_dict(members[queue[0]].config), tuple(steps))
                else:
                    job = executor.submit(RunQueue(), [to_dict(members[i].config) for i in queue], tuple(steps))
                    progress(f"  GPUs {','.join(gpus)}: {len(queue)} runs one after another in job {job.job_id}")
                for k, i in enumerate(queue):
                    r = members[i]
                    RunDir(r.folder).write_launch_record(str(job.job_id), "local", steps, submitted,
                                                         logs / str(job.job_id), seq=seqs[id(r)])
                    out[id(r)].job, out[id(r)].position = job, (k if len(queue) > 1 else None)
            continue
        executor = executor_for(launch_cfg, logs, grid_dir.name)
        with executor.batch():  # one Slurm job array for the group
            jobs = [executor.submit(RunJob(), to_dict(r.config), tuple(steps)) for r in members]
        for r, job in zip(members, jobs):
            RunDir(r.folder).write_launch_record(str(job.job_id), launch_cfg.cluster, steps, submitted,
                                                 logs / str(job.job_id), seq=seqs[id(r)])
            out[id(r)].job = job
    return out


def wait(submitted: list[Submitted], progress=print) -> list[tuple[GridRun, Optional[str]]]:
    """Wait for the submitted jobs; returns (run, error or None) for every run that was started (those run here
    included). A failed run does not stop the others: its error is reported."""
    results = []
    for s in submitted:
        if s.job is not None:
            try:
                outcome = s.job.results()  # every task of the job (one per process under DDP)
                if s.position is not None:  # a RunQueue job: rank 0's list of errors, one per run
                    error = outcome[0][s.position]
                    if error:
                        s.error = _error_of(s.run, error)
            except Exception as e:  # noqa: BLE001 - a job's failure is reported, not raised
                s.error = _error_of(s.run, f"{type(e).__name__}: {e}")
        elif not s.ran:
            continue
        results.append((s.run, s.error))
        try:
            state = run_state(RunDir(s.run.folder), active=False)
        except UserError as e:  # a file of the run is damaged: said, and the other runs are reported
            state, s.error = "damaged", s.error or str(e)
        progress(f"  {Path(s.run.folder).name}: {state}" + (f" ({s.error})" if s.error else ""))
    return results
