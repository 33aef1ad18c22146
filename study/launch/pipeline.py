"""One callable runs a configuration end to end: train, evaluate, benchmark (docs/design.md, "Launching").

The same function runs in-process, under submitit's local executor and as a Slurm job. Every step is
idempotent, so calling it again after a crash, a time limit or a pre-emption picks up where the run stopped:
training resumes from ``checkpoints/last.pt`` (bitwise, see study/train/loop.py), a finished evaluation or
benchmark recorded in ``metrics.json`` is not repeated.

What each step writes into the run folder is described in study/runs.py (:class:`RunDir` owns the layout).
"""
from __future__ import annotations

import os
import platform
from dataclasses import replace
from typing import Iterable, Optional

import submitit

from study.config import Config, build_dataclass, to_dict
from study.errors import UserError
from study.io import atomic_write_json
from study.launch.config import STEPS, check_steps
from study.runs import RunDir, step_settings


def _untrained_model(cfg: Config):
    """The run's model with no weights loaded (FLOPs and speed do not depend on them)."""
    from study.models.build import build_model

    return build_model(replace(cfg.model, checkpoint=None, pretrained=None, init_from=None,
                               reinit_class_head=False))


# Threads of a local job's bench step when bench.threads is unset: the grid's other jobs run on the same machine
# at the same time (our choice; the paper timed one process on an H100).
LOCAL_JOB_THREADS = 1


def _bench_threads(threads: Optional[int]) -> tuple[Optional[int], str]:
    """The thread count the bench step times with, and why (recorded beside the FPS)."""
    if threads is not None:
        return threads, "bench.threads"
    if os.environ.get("SUBMITIT_LOCAL_JOB_ID"):
        return LOCAL_JOB_THREADS, "a local job shares the machine with the grid's other jobs (bench.threads unset)"
    return None, "bench.threads unset: every core this process may use"


def _load_check(row: dict, before: Optional[float], after: Optional[float]) -> None:
    """Record the machine's load around the timing (os.getloadavg, 1-minute) and whether the FPS can be trusted:
    not when other processes wanted more cores than the timing left free (the load besides our own threads,
    the larger of before and after-minus-ours, plus our threads, above the cores we may use)."""
    from study.device import available_cores

    cores, threads = available_cores(), row.get("threads") or 1
    row.update(load_before=before, load_after=after, cores=cores)
    if before is None or after is None:
        row["fps_trusted"] = None  # no load average on this system: unknown
        return
    others = max(before, after - threads)
    row["fps_trusted"] = others + threads <= cores
    if not row["fps_trusted"]:
        row["fps_warning"] = (f"the machine was busy: load {before:.1f} before and {after:.1f} after timing with "
                              f"{threads} thread(s) on {cores} core(s); this FPS cannot be trusted, bench again on "
                              f"a quiet machine (study launch GRID --steps bench)")


def _loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _bench(cfg: Config) -> dict:
    """Parameters, GFLOPs by component (``bench.counter``) and, with ``bench.fps``, the speed under the
    protocol of docs/speed.md (study/bench/speed.py ``measure_fps``) and (``bench.breakdown``) the milliseconds
    per component of one forward
    (``breakdown_ms``, which analysis/plots.py draws); ``host`` names the machine the times were taken on.
    The timing states its thread count (:func:`_bench_threads`: 1 in a local job unless bench.threads says
    otherwise) and records the machine's load, flagging an FPS that cannot be trusted (:func:`_load_check`)."""
    from study.bench.flops import count_flops, count_params
    from study.bench.protocol import SpeedProtocol
    from study.bench.speed import measure_fps

    b = cfg.bench
    threads, why = _bench_threads(b.threads)
    model = _untrained_model(cfg)  # FLOPs and speed do not depend on the weights
    img = cfg.model.img_size
    flops = count_flops(model, img, counter=b.counter)
    row = {"img_size": img, "params": count_params(model), "gflops": round(flops.gflops, 3),
           "gflops_by_component": {k: round(v / 1e9, 3) for k, v in flops.by_component.items()},
           "uncounted_ops": flops.uncounted, "flop_counter": b.counter}
    row["settings"] = step_settings("bench", to_dict(cfg))
    if b.fps:
        protocol = SpeedProtocol(device=b.device, precision=b.precision, compile=b.compile, warmup=b.warmup,
                                 iters=b.iters, scope=b.scope, batch=b.batch, threads=threads,
                                 min_time=b.min_time, compile_mode=b.compile_mode, runtime=b.runtime,
                                 freezing=b.freezing)
        before = _loadavg()
        # the breakdown comes from the timed iterations themselves, when they can give one (eager PyTorch)
        timed = measure_fps(model, img, protocol, breakdown=b.breakdown)
        row.update(timed)
        row["threads"], row["threads_why"] = timed.get("env", {}).get("threads", threads), why
        _load_check(row, before, _loadavg())
    row["host"] = platform.node()
    return row


def run_config(cfg: Config, steps: Iterable[str] = STEPS, run: RunDir | None = None,
               progress: Optional[bool] = None) -> RunDir:
    """Run the ``steps`` of ``cfg`` that its folder has not finished; returns the folder.

    ``progress``: bars for training and evaluation (study/train/loop.py :func:`progress_wanted`: None shows
    them when stderr is a terminal or ``STUDY_PROGRESS=1``; a job's log gets none).

    Under torch.distributed (``WORLD_SIZE`` > 1) every process trains; only rank 0 evaluates and benchmarks.
    Rank 0 holds the run's writer lock throughout (:meth:`RunDir.writing`): a second job on the same folder is
    refused before it writes anything, failure.json included. An exception is recorded in ``failure.json``
    (step and message) and raised again.
    """
    from study.train.loop import progress_wanted

    steps = check_steps(steps)
    progress = progress_wanted(progress)
    run = run or RunDir.for_config(cfg)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        return _run_steps(cfg, steps, run, rank, progress)
    with run.writing("+".join(steps)):
        return _run_steps(cfg, steps, run, rank, progress)


def _run_steps(cfg: Config, steps: tuple[str, ...], run: RunDir, rank: int, progress: bool) -> RunDir:
    from study.eval.run import evaluate_run
    from study.train.loop import train

    if rank == 0:
        run.claim(cfg)  # the folder belongs to this configuration (checked before anything runs)
        run.clear_failure()  # a new attempt
    if rank == 0 and "train" in steps and run.weights_missing():
        _train_again(run)  # before planning: the results of the lost weights are set aside, so they are redone
    todo, step = run.pending_steps(steps, cfg), None
    try:
        if "train" in todo:
            step = "train"
            train(cfg, run, progress=progress)
        if rank != 0:
            return run
        if "eval" in todo:
            step = "eval"
            if not run.final_weights.is_file():
                raise UserError(f"{run.path} has no trained weights ({run.final_weights}); launch it with steps "
                                f"that include train (study launch GRID --steps train,{','.join(steps)}), which "
                                f"trains it again")
            evaluate_run(cfg, run.final_weights, run, progress=progress)
        if "bench" in todo:
            step = "bench"
            run.update_metrics(bench=_bench(cfg))
    except Exception as e:  # (not SystemExit: a requeued job leaves through it, to resume later)
        if rank == 0:  # what failed where, for `study status` (the trainer's status.json may not know)
            run.write_failure(step, f"{type(e).__name__}: {e}")
        raise
    return run


def _train_again(run: RunDir) -> None:
    """A run whose training finished but whose final weights are gone trains again from step 0: its status
    becomes interrupted, and its last checkpoint (at the final step, from which resuming would do nothing) is
    kept beside, renamed, never deleted."""
    kept = ""
    if run.last_checkpoint.is_file():
        aside = run.last_checkpoint.with_name(f"last.pt.before-retrain-{run.next_seq()}")
        os.replace(run.last_checkpoint, aside)
        kept = f"; its last checkpoint is kept as {aside.name}"
    # what described the lost weights (their evaluation, its history, the training summary) is moved aside too,
    # so that no number of a model that no longer exists is reported beside the new weights
    metrics = run.metrics()
    stale = {k: metrics.pop(k) for k in ("train", "eval", "eval_history") if k in metrics}
    if stale:
        atomic_write_json(run.path / f"metrics.before-retrain-{run.next_seq()}.json", stale)
        atomic_write_json(run.metrics_file, metrics)
    for f in run.path.glob("eval_*.json"):
        os.replace(f, f.with_name(f"{f.stem}.before-retrain.json"))
    run.write_status("interrupted", step=0, reason="final weights missing: training again")
    print(f"{run.path.name}: its final weights {run.final_weights} are missing; training it again{kept}")


def join_submitit_job() -> Optional[int]:
    """Inside a submitit job of several tasks, export torch.distributed's variables (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, ...) for this task; returns the job's number of tasks, or None outside a
    submitit job (a direct call, a test, torchrun).

    The job's visible GPUs are left as they are (``set_cuda_visible_devices=False``): submitit would narrow
    ``CUDA_VISIBLE_DEVICES`` to the physical index LOCAL_RANK, which is another job's GPU when this one was
    given, say, GPUs 2 and 3 (study/launch/submit.py). Each task then uses GPU LOCAL_RANK of the job's
    visible set (study/device.py).
    """
    try:
        job = submitit.JobEnvironment()
    except RuntimeError as e:  # submitit 1.5.4 (core/plugins.py) raises this when no job environment is active
        if not str(e).startswith(_NOT_IN_A_JOB):
            raise
        return None
    if job.num_tasks > 1:  # anything going wrong here (a variable already set, ...) is raised: swallowing it
        # would turn one DDP job into several world-size-1 runs writing the same folder
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return job.num_tasks


_NOT_IN_A_JOB = "Could not figure out which environment the job is runnning in"  # submitit's wording (sic)


class RunJob(submitit.helpers.Checkpointable):
    """The picklable callable submitit runs: ``RunJob()(config_dict, steps)``.

    On a time limit or a pre-emption submitit calls ``checkpoint`` (Checkpointable's: resubmit the same call);
    the trainer then resumes from the run's last checkpoint (saved every ``train.checkpoint_every`` steps).
    With several tasks per job (one per GPU), each task joins torch.distributed from submitit's environment.
    """

    def __call__(self, config: dict, steps: tuple[str, ...] = STEPS) -> str:
        join_submitit_job()
        return self.run_one(config, steps)

    @staticmethod
    def run_one(config: dict, steps: tuple[str, ...]) -> str:
        cfg = build_dataclass(Config, config)
        return str(run_config(cfg, steps).path)  # bars only in a terminal (a debug launch)


class RunQueue(RunJob):
    """One job that runs several configurations one after another: ``RunQueue()([config, ...], steps)``.

    Used by local launches when the runs would not each get GPUs of their own at once (study/launch/submit.py).
    A failed run is recorded in its folder (failure.json) and the next one runs; returns one error message
    (or None) per configuration. A requeue calls it again from the start: finished runs are skipped.
    """

    def __call__(self, configs: list[dict], steps: tuple[str, ...] = STEPS) -> list[Optional[str]]:  # type: ignore[override]
        join_submitit_job()
        errors: list[Optional[str]] = []
        for config in configs:
            try:
                self.run_one(config, steps)
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - recorded in the run's folder; the next run goes on
                errors.append(f"{type(e).__name__}: {e}")
        return errors
