"""Training section of the configuration (paper.md section 6)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    max_steps: int = 100
    lr: float = 1e-4  # paper.md section 6
    weight_decay: float = 0.05  # paper.md section 6
    layer_decay: float = 0.8  # paper.md section 6: layer-wise lr decay
