"""The one target form every dataset reader yields, whatever the format on disk."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Sample:
    """One image with its segments.

    image: uint8 (3, H, W). masks: bool (N, H, W), one binary mask per segment. labels: int64 (N,),
    contiguous class ids 0..C-1 (readers map dataset category ids to these). is_crowd: bool (N,).
    """

    image: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    is_crowd: torch.Tensor
    image_id: int | str = 0
    file_name: str = ""
    segment_ids: Optional[torch.Tensor] = None  # int64 (N,): panoptic segment ids / instance annotation ids


@dataclass
class DatasetInfo:
    """What evaluators and heads need to know about a dataset's classes."""

    name: str
    num_classes: int
    class_names: list[str]
    # contiguous id -> dataset category id (COCO ids are not contiguous); identity for semantic sets
    category_ids: list[int]
    is_thing: list[bool]  # per contiguous id; all False for semantic data sets
    ignore_index: int = 255
    extra: dict = field(default_factory=dict)
