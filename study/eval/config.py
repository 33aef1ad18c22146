"""Evaluation section of the configuration (paper.md section 7)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    batch_size: int = 1
