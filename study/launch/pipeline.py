"""One callable runs a configuration end to end: train, evaluate, benchmark (docs/design.md, "Launching").

The same function runs in-process, under submitit's local executor and as a Slurm job. Every step is
idempotent, so calling it again after a crash, a time limit or a pre-emption picks up where the run stopped:
training resumes from ``checkpoints/last.pt`` (bitwise, see study/train/loop.py), a finished evaluation or
benchmark recorded in ``metrics.json`` is not repeated.

What a step writes into ``metrics.json``:
    train   the trainer's summary (steps, final loss, images/s, world size, precision, device)
    eval    the evaluator's numbers on ``eval.split`` (default ``data.val_split``), without the per-class tables,
            which go to ``eval_<task>_<split>.json`` next to it
    bench   parameters, GFLOPs (and by component), and FPS with its protocol when ``bench.fps`` is on
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Iterable

import submitit

from study.config import Config, build_dataclass, to_dict
from study.io import atomic_write_json
from study.runs import RunDir

STEPS = ("train", "eval", "bench")
FAILURE_FILE = "failure.json"  # the last attempt's error; removed when a new attempt starts


def check_steps(steps: Iterable[str]) -> tuple[str, ...]:
    steps = tuple(steps)
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise ValueError(f"unknown step(s) {unknown}; steps are {', '.join(STEPS)}")
    return steps


# What the results of the eval and bench steps depend on besides the trained weights. Neither section is part
# of a run's identity (study/config.py), so each result records its settings and counts as done only while
# they match the configuration's.
BENCH_SETTINGS = ("fps", "device", "precision", "compile", "warmup", "iters", "scope")


def step_settings(step: str, config: dict) -> dict:
    """The settings a step's result depends on, from a configuration as a dict (``to_dict(cfg)``)."""
    if step == "eval":
        return dict(config.get("eval", {}))
    if step == "bench":
        return {k: config.get("bench", {}).get(k) for k in BENCH_SETTINGS}
    return {}


def pending_steps(run: RunDir, steps: Iterable[str] = STEPS, cfg: Config | None = None) -> list[str]:
    """The steps of ``steps`` that ``run`` has not finished yet for configuration ``cfg`` (default: the one
    saved in the folder): training finished, evaluation and benchmark recorded with the same settings."""
    import yaml

    metrics = run.metrics()
    if cfg is not None:
        config = to_dict(cfg)
    else:
        config = yaml.safe_load(run.config.read_text()) if run.config.is_file() else {}
    trained = run.status().get("state") == "finished"
    todo = []
    for step in steps:
        if step == "train":
            done = trained
        else:
            done = step in metrics and metrics[step].get("settings") == step_settings(step, config)
        if not done:
            todo.append(step)
    return todo


def _untrained_model(cfg: Config):
    """The run's model with no weights loaded (the caller loads the trained ones, or needs none)."""
    from study.models.build import build_model

    return build_model(replace(cfg.model, checkpoint=None, pretrained=None))


def _evaluate(cfg: Config, run: RunDir, progress: bool) -> dict:
    from study.data import build_dataset
    from study.eval.run import evaluate
    from study.models.checkpoint import load_checkpoint

    split = cfg.eval.split or cfg.data.val_split
    dataset = build_dataset(cfg.data, split, cfg.task)
    model = _untrained_model(cfg)
    load_checkpoint(model, run.final_weights)
    result = evaluate(model, dataset, cfg.task, cfg.eval, cfg.eval.input_size or cfg.model.img_size,
                      progress=progress)
    result["split"] = split
    result["weights"] = str(run.final_weights)
    result["settings"] = step_settings("eval", to_dict(cfg))
    atomic_write_json(run.path / f"eval_{cfg.task}_{split}.json", result)
    for detail in ("per_class", "categories", "summary"):  # per-class tables and COCOeval's text stay in the
        result.pop(detail, None)  # eval file above
    return result


def _bench(cfg: Config) -> dict:
    from study.bench.flops import count_flops, count_params
    from study.bench.speed import SpeedProtocol, measure_fps

    b = cfg.bench
    model = _untrained_model(cfg)  # FLOPs and speed do not depend on the weights
    img = cfg.model.img_size
    flops = count_flops(model, img)
    row = {"img_size": img, "params": count_params(model), "gflops": round(flops.gflops, 3),
           "gflops_by_component": {k: round(v / 1e9, 3) for k, v in flops.by_component.items()},
           "uncounted_ops": flops.uncounted}
    row["settings"] = step_settings("bench", to_dict(cfg))
    if b.fps:
        row.update(measure_fps(model, img, SpeedProtocol(b.device, b.precision, b.compile, b.warmup, b.iters,
                                                         b.scope)))
    return row


def run_config(cfg: Config, steps: Iterable[str] = STEPS, run: RunDir | None = None,
               progress: bool = True) -> RunDir:
    """Run the ``steps`` of ``cfg`` that its folder has not finished; returns the folder.

    Under torch.distributed (``WORLD_SIZE`` > 1) every process trains; only rank 0 evaluates and benchmarks.
    An exception is recorded in ``failure.json`` (step and message) and raised again.
    """
    from study.train.loop import train

    steps = check_steps(steps)
    run = run or RunDir.for_config(cfg)
    rank = int(os.environ.get("RANK", "0"))
    failure = run.path / FAILURE_FILE
    if rank == 0:
        run.claim(cfg)  # the folder belongs to this configuration (checked before anything runs)
        failure.unlink(missing_ok=True)  # a new attempt
    todo, step = pending_steps(run, steps, cfg), None
    try:
        if "train" in todo:
            step = "train"
            train(cfg, run)
        if rank != 0:
            return run
        if "eval" in todo:
            step = "eval"
            if not run.final_weights.is_file():
                raise ValueError(f"{run.path} has no trained weights ({run.final_weights}); train it first "
                                 f"(steps include 'train')")
            run.update_metrics(eval=_evaluate(cfg, run, progress))
        if "bench" in todo:
            step = "bench"
            run.update_metrics(bench=_bench(cfg))
    except Exception as e:  # (not SystemExit: a requeued job leaves through it, to resume later)
        if rank == 0:  # what failed where, for `study status` (the trainer's status.json may not know)
            atomic_write_json(failure, {"step": step, "error": f"{type(e).__name__}: {e}",
                                        "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        raise
    return run


class RunJob(submitit.helpers.Checkpointable):
    """The picklable callable submitit runs: ``RunJob()(config_dict, steps)``.

    On a time limit or a pre-emption submitit calls ``checkpoint`` (Checkpointable's: resubmit the same call);
    the trainer then resumes from the run's last checkpoint (saved every ``train.checkpoint_every`` steps).
    With several tasks per job (one per GPU), each task joins torch.distributed from submitit's environment.
    """

    def __call__(self, config: dict, steps: tuple[str, ...] = STEPS) -> str:
        try:
            if submitit.JobEnvironment().num_tasks > 1:
                submitit.helpers.TorchDistributedEnvironment().export()  # RANK, WORLD_SIZE, MASTER_ADDR, ...
        except RuntimeError:  # called directly, outside a submitit job
            pass
        cfg = build_dataclass(Config, config)
        return str(run_config(cfg, steps, progress=False).path)
