"""Inference protocols of docs/paper.md section 7, for any model of the contract (study/models/contract.py).

- Padded (panoptic, instance): resize the longer side to the input size S, zero-pad bottom/right to S x S,
  run, upsample the mask logits to S x S, crop the padding, resize to the original image (per image and a
  chunk of queries at a time, which bounds the memory without changing the numbers).
- Windowed (semantic): resize the shorter side to the crop size S, cut ceil(long / short) S x S crops with
  the overlap spread evenly, turn each crop's prediction into per-pixel class logits, average where crops
  overlap, resize to the original image.

Images arrive as the readers give them (uint8 (3, H, W)); the model sees floats in [0, 1]. Resizing is
bilinear without antialiasing (``F.interpolate``), as in the official EoMT code. Only the last
prediction set is used.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch.nn import functional as F

from study.device import autocast
from study.eval.postprocess import semantic_logits


@contextlib.contextmanager
def masking(model, masked: Optional[bool]) -> Iterator[None]:
    """Temporarily set ``model.masked_inference`` (None: leave the model's own setting)."""
    if masked is None:
        yield
        return
    old = model.masked_inference
    model.masked_inference = masked
    try:
        yield
    finally:
        model.masked_inference = old


def _to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float (3, H, W) in [0, 1]; float images are taken as already in [0, 1]."""
    return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()


def _final(model, batch: torch.Tensor, precision: str):
    """The last prediction set: mask logits (B, Q, S/4, S/4), class logits (B, Q, C + 1); only the model
    runs under autocast, post-processing stays in float32."""
    with autocast(batch.device, precision):
        return model(batch)[-1]


def pad_to_square(images: list[torch.Tensor], size: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Resize each image's longer side to ``size`` and zero-pad bottom/right: (B, 3, S, S) and the resized
    (h, w) of each image (the part to keep after inference)."""
    batch = torch.zeros(len(images), 3, size, size)
    kept = []
    for i, img in enumerate(images):
        img = _to_float(img)
        h, w = img.shape[-2:]
        factor = size / max(h, w)
        nh, nw = min(size, round(h * factor)), min(size, round(w * factor))
        batch[i, :, :nh, :nw] = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        kept.append((nh, nw))
    return batch, kept


# Queries upsampled at once to S x S in float32 by the padded protocol: with Q = 200 and S = 1280 all of them
# would take 1.3 GB per image, a chunk of 32 about 210 MB (our choice). Bilinear resizing treats each query's
# map on its own; a chunk that is a multiple of the CPU's vector width (8 or 16 floats) keeps even the rounding
# of the whole-set call, and CUDA computes every element on its own (tests/test_eval_inference.py checks
# equality).
QUERY_CHUNK = 32


def _to_original(mask_logits: torch.Tensor, size: int, kept: tuple[int, int], out_hw: tuple[int, int],
                 chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """One image's mask logits (Q, S/4, S/4) -> (Q, H, W) float32: upsampled to S x S, the padding cropped
    away, resized to the original image; ``chunk`` queries at a time."""
    nh, nw = kept
    out = torch.empty(mask_logits.shape[0], *out_hw, device=mask_logits.device)
    for q in range(0, mask_logits.shape[0], chunk):
        m = F.interpolate(mask_logits[None, q:q + chunk].float(), size=(size, size), mode="bilinear",
                          align_corners=False)[:, :, :nh, :nw]  # (1, c, h, w): the padding cropped away
        out[q:q + chunk] = F.interpolate(m, size=out_hw, mode="bilinear", align_corners=False)[0]
    return out


@torch.no_grad()
def iter_padded(model, images: list[torch.Tensor], size: int, masked: Optional[bool] = None,
                device: str | torch.device = "cpu", precision: str = "fp32",
                chunk: int = QUERY_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Padded protocol on a batch of images, one image at a time: (mask logits (Q, H, W) at the original
    resolution, class logits (Q, C + 1)). The model runs once on the batch; only one image's full-resolution
    masks exist at a time."""
    batch, kept = pad_to_square(images, size)
    with masking(model, masked):
        pred = _final(model, batch.to(device), precision)
    for i, img in enumerate(images):
        yield (_to_original(pred.mask_logits[i], size, kept[i], tuple(img.shape[-2:]), chunk),
               pred.class_logits[i].float())


def run_padded(model, images: list[torch.Tensor], size: int, masked: Optional[bool] = None,
               device: str | torch.device = "cpu", precision: str = "fp32") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`iter_padded` as a list (every image's masks at once: for a few images)."""
    return list(iter_padded(model, images, size, masked, device, precision))


def window_crops(image: torch.Tensor, size: int) -> tuple[torch.Tensor, list[int], tuple[int, int]]:
    """Shorter side resized to ``size``; ceil(long / short) square crops along the longer side with the
    overlap spread evenly. Returns crops (N, 3, S, S), their start offsets along the long side, and the
    resized (h, w)."""
    img = _to_float(image)
    h, w = img.shape[-2:]
    factor = size / min(h, w)
    nh, nw = max(size, round(h * factor)), max(size, round(w * factor))
    img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    long_side = max(nh, nw)
    n = math.ceil(long_side / size)
    overlap = (n * size - long_side) / (n - 1) if n > 1 else 0.0  # per pair of neighbouring crops
    starts = [int(i * (size - overlap)) for i in range(n)]
    starts[-1] = long_side - size  # guard against float rounding: the last crop ends at the border
    if nh >= nw:
        crops = torch.stack([img[:, s:s + size, :] for s in starts])
    else:
        crops = torch.stack([img[:, :, s:s + size] for s in starts])
    return crops, starts, (nh, nw)


@torch.no_grad()
def run_windowed(model, images: list[torch.Tensor], size: int, batch_size: int = 1,
                 masked: Optional[bool] = None, device: str | torch.device = "cpu",
                 precision: str = "fp32") -> list[torch.Tensor]:
    """Windowed protocol: per image, per-pixel class logits (C, H, W) at the original resolution."""
    windows = [window_crops(img, size) for img in images]
    crops = torch.cat([c for c, _, _ in windows])  # (N, 3, S, S) over all images
    logits = []
    with masking(model, masked):
        for i in range(0, len(crops), batch_size):
            pred = _final(model, crops[i:i + batch_size].to(device), precision)
            for m, c in zip(pred.mask_logits, pred.class_logits):  # one crop's (Q, S, S) at a time
                m = F.interpolate(m[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
                logits.append(semantic_logits(m, c))  # (C, S, S)
    out, k = [], 0
    for img, (_, starts, (nh, nw)) in zip(images, windows):
        num_classes = logits[k].shape[0]
        total = torch.zeros(num_classes, nh, nw, device=logits[k].device)
        count = torch.zeros(1, nh, nw, device=logits[k].device)
        for s in starts:
            if nh >= nw:
                total[:, s:s + size, :] += logits[k]
                count[:, s:s + size, :] += 1
            else:
                total[:, :, s:s + size] += logits[k]
                count[:, :, s:s + size] += 1
            k += 1
        avg = (total / count)[None]  # (1, C, h, w): overlapping crops averaged
        out.append(F.interpolate(avg, size=tuple(img.shape[-2:]), mode="bilinear", align_corners=False)[0])
    return out
