"""Launcher section of the configuration: where and how a run executes (never changes its result)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class LaunchConfig:
    cluster: Literal["local", "debug", "slurm"] = "local"
    partition: Optional[str] = None
    gpus_per_node: int = 0
    nodes: int = 1
    timeout_min: int = 60
    mem_gb: int = 16
    cpus_per_task: int = 2
    array_parallelism: int = 64
    slurm_extra: dict[str, str] = field(default_factory=dict)
