"""Launcher section of the configuration: where and how a run executes (never changes its result, so it is
left out of the run's identity hash)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional

from study.errors import UserError

# The steps of a run, in the order a job runs them (what each writes: study/runs.py).
STEPS = ("train", "eval", "bench")


def check_steps(steps: Iterable[str]) -> tuple[str, ...]:
    steps = tuple(steps)
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise UserError(f"unknown step(s) {unknown}; steps are {', '.join(STEPS)}")
    return steps


@dataclass
class LaunchConfig:
    # slurm: sbatch job arrays; local: one subprocess per run, all started at once (submitit's LocalExecutor);
    # debug: in the launching process, one run after another (submitit's DebugExecutor).
    cluster: Literal["local", "debug", "slurm"] = "local"
    partition: Optional[str] = None  # Slurm partition (None: the cluster's default)
    gpus_per_node: int = 0
    # Processes per node, each joining torch.distributed; None = one per GPU (one process without GPUs).
    tasks_per_node: Optional[int] = None
    nodes: int = 1
    timeout_min: int = 60  # the job's time limit; a run that hits it is checkpointed and requeued (Slurm)
    mem_gb: int = 16
    cpus_per_task: int = 2
    array_parallelism: int = 64  # Slurm: at most this many jobs of a grid's array run at once
    # Slurm: seconds before the time limit at which the job is signalled to checkpoint and requeue. Our
    # trainer saves every train.checkpoint_every steps; the signal only triggers the requeue.
    signal_delay_s: int = 120
    # Slurm: how many time limits a run may hit (each one requeues it) before submitit gives up; submitit's
    # default of 3 would fail a long training after 3 x timeout_min.
    max_requeues: int = 50
    slurm_extra: dict[str, str] = field(default_factory=dict)  # more sbatch options, e.g. {account: ..., qos: ...}
    # The steps each job runs, in this order (STEPS: train, eval, bench); `study launch --steps`.
    steps: list[str] = field(default_factory=lambda: ["train", "eval", "bench"])

    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    def validate(self) -> None:
        check_steps(self.steps)  # its message names "steps", which study/config.py turns into launch.steps
        for name in ("nodes", "timeout_min", "mem_gb", "cpus_per_task", "array_parallelism", "max_requeues"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0 or self.signal_delay_s < 0:
            raise ValueError("gpus_per_node and signal_delay_s must be >= 0")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ValueError(f"tasks_per_node must be >= 1, got {self.tasks_per_node}")
