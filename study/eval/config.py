"""Evaluation section of the configuration (docs/paper.md section 7).

The paper's inference numbers live here, once; post-processing functions take them as arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from study.errors import UserError


# The padded protocol's chunk of queries and the multiple every chunk must be (the reason is in
# study/eval/inference.py, where the chunks are made; our choice, not the paper's).
QUERY_CHUNK = 32
QUERY_CHUNK_MULTIPLE = 8


@dataclass
class EvalConfig:
    # Images per forward of the padded protocol; crops per forward of the windowed one (our choice: the
    # paper's inference setting does not depend on it, and neither do the scores).
    batch_size: int = 1
    # DataLoader worker processes that read and decode the images (0: in the evaluating process).
    num_workers: int = 0
    # Post-process and score batch i in a thread of its own while the model runs batch i + 1.
    overlap: bool = True
    # Predictions waiting for post-processing at most (bounds the memory of the overlap).
    queue_size: int = 2
    # Queries upsampled to full size at once by the padded protocol (a multiple of QUERY_CHUNK_MULTIPLE: see
    # study/eval/inference.py, where the chunks are made).
    query_chunk: int = QUERY_CHUNK
    split: Optional[str] = None  # data split to score; None means data.val_split
    # Square input side of the padded protocol and crop side of the windowed protocol; None means
    # model.img_size (COCO 640, ADE20K semantic 512; docs/paper.md section 6).
    input_size: Optional[int] = None
    # Panoptic merge (docs/paper.md section 7): keep a query when its top class is not no-object and its score
    # exceeds this.
    score_threshold: float = 0.8
    # Panoptic merge (docs/paper.md section 7): drop a query whose won area / area with sigmoid >= mask_threshold
    # is below this.
    overlap_threshold: float = 0.8
    # Panoptic merge (docs/paper.md section 7): a segment is the query's pixels with sigmoid >= this.
    mask_threshold: float = 0.5
    # Instance (docs/paper.md section 7): the top this-many (query, class) pairs per image.
    top_k: int = 100
    # Score at most this many images (None: all), for quick checks.
    max_images: Optional[int] = None
    # Write predictions in the official formats under this folder (None: do not export).
    export_dir: Optional[str] = None
    # The scoring engine of segm AP (study/eval/engines.py): hotcoco, pycocotools or faster-coco-eval, equal
    # numbers. Panoptic PQ during evaluation streams through our accumulator (hotcoco reads only files).
    engine: str = "hotcoco"
    # standard (panopticapi / pycocotools / mIoU over classes present), or official: the paper's protocol
    # (study/eval/protocol.py) reported beside the standard one.
    protocol: str = "standard"
    device: str = "auto"  # auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on the CPU), fp32, bf16, fp16

    def validate(self) -> None:
        def bad(key: str, what: str) -> UserError:
            return UserError(f"eval.{key} {what}, got {getattr(self, key)!r}")

        if self.batch_size < 1:
            raise bad("batch_size", "must be >= 1")
        if self.num_workers < 0:
            raise bad("num_workers", "must be >= 0")
        if self.queue_size < 1:
            raise bad("queue_size", "must be >= 1")
        if self.query_chunk < 1 or self.query_chunk % QUERY_CHUNK_MULTIPLE:
            raise bad("query_chunk", f"must be a positive multiple of {QUERY_CHUNK_MULTIPLE} (see "
                                     "study/eval/inference.py, above iter_query_chunks)")
        if self.input_size is not None and self.input_size < 1:
            raise bad("input_size", "must be positive")
        for name in ("score_threshold", "overlap_threshold", "mask_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be in [0, 1]")
        if self.top_k < 1:
            raise bad("top_k", "must be >= 1")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise bad("precision", "must be auto, fp32, bf16 or fp16")
        if self.engine not in ("hotcoco", "pycocotools", "faster-coco-eval"):
            raise bad("engine", "must be hotcoco, pycocotools or faster-coco-eval")
        if self.protocol not in ("standard", "official"):
            raise bad("protocol", "must be standard or official")
        if self.max_images is not None and self.max_images < 1:
            raise bad("max_images", "must be >= 1")
