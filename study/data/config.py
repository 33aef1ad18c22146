"""Data section of the configuration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    # Dataset format: coco_panoptic, coco_instance, ade20k, cityscapes, list (image/label list files, CamVid),
    # or synthetic (the built-in procedural data set, generated on first use).
    dataset: str = "synthetic"
    root: Optional[str] = None  # dataset folder (or folder holding the official zip files)
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 1  # per process; the paper's effective batch is 16 in total (see train.accumulate)
    num_workers: int = 0
