"""Inference protocols of docs/paper.md section 7, for any model of the contract (study/models/contract.py).

- Padded (panoptic, instance): resize the longer side to the input size S, zero-pad bottom/right to S x S,
  run, upsample the mask logits to S x S, crop the padding, resize to the original image (per image and a
  chunk of queries at a time, which bounds the memory without changing the numbers; the post-processing
  consumes the chunks, so one image's queries never exist at full size all at once).
- Windowed (semantic): resize the shorter side to the crop size S, cut ceil(long / short) S x S crops with
  the overlap spread evenly, turn each crop's prediction into per-pixel class logits, average where crops
  overlap, resize to the original image. One crop's queries are upsampled at a time (Q x S x S: the
  per-pixel sum over queries keeps the summation order of the whole-set call only when it sees every query).

Images arrive as the readers give them (uint8 (3, H, W)); the model sees floats in [0, 1]. Images are resized
as the official EoMT code resizes them: Pillow's bilinear filter on the uint8 image (antialiased when it
shrinks), rounded to uint8 (:func:`resize_image`); with ``F.interpolate`` instead, a downscaled image differed
from the official input by up to 97 of 255 levels (COCO samples at 320) and an upscaled one by 1 level in
0.06% of the values (1280; tests/test_official_inference.py). Logits are resized bilinearly without
antialiasing (``F.interpolate``), as there. Only the last prediction set is used.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from study.device import autocast
from study.eval.config import QUERY_CHUNK
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


def resize_image(image: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """An image (3, H, W) resized to ``hw`` as float (3, h, w) in [0, 1].

    uint8 images: Pillow's bilinear resize of the uint8 image, the official EoMT evaluation's resize (its
    ``resize_and_pad_imgs_instance_panoptic`` and ``window_imgs_semantic``); Pillow widens the filter when it
    shrinks (antialiasing) and rounds to uint8, so the model sees exactly the official input. Float images
    (already in [0, 1]) have no uint8 form: bilinear ``F.interpolate`` without antialiasing.
    """
    h, w = hw
    if image.dtype != torch.uint8:
        return F.interpolate(image.float()[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    if tuple(image.shape[-2:]) != (h, w):
        pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).resize((w, h), Image.BILINEAR)
        image = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    return image.float() / 255.0


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
        h, w = img.shape[-2:]
        factor = size / max(h, w)
        nh, nw = min(size, round(h * factor)), min(size, round(w * factor))
        batch[i, :, :nh, :nw] = resize_image(img, (nh, nw))
        kept.append((nh, nw))
    return batch, kept


# Queries upsampled at once to S x S in float32 by the padded protocol: with Q = 200 and S = 1280 all of them
# would take 1.3 GB per image, a chunk of 32 about 210 MB (our choice; ``eval.query_chunk``). The post-processing
# (study/eval/postprocess.py) consumes the chunks as they come, so no (Q, H, W) tensor is ever built.
#
# Why the chunk must be a multiple of 8: bilinear resizing treats each query's map on its own, but the CPU
# kernel computes the maps of a call in groups of 8 planes with SIMD code (fused multiply-adds) and the planes
# left over (Q mod 8) with scalar code, whose rounding differs by 1 ulp. Groups start at a call's first plane,
# so chunks that start at multiples of 8 and hold a multiple of 8 queries (only the last chunk may hold fewer)
# put every query in the same group, or the same leftover, as the whole-set call: bit-identical results, at any
# thread count, with ATen's AVX-512, AVX2 and scalar kernels (tests/test_eval_inference.py; docs/exactness.md). A chunk of 1 or 5 sends every query through the scalar path.
# CUDA computes every element on its own, so any chunk is exact there. The two numbers live in
# study/eval/config.py (QUERY_CHUNK, QUERY_CHUNK_MULTIPLE), which validates ``eval.query_chunk`` against them.


def iter_query_chunks(mask_logits: torch.Tensor, size: int, kept: tuple[int, int], out_hw: tuple[int, int],
                      chunk: int = QUERY_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
    """One image's mask logits (Q, S/4, S/4) at the original resolution, ``chunk`` queries at a time:
    (first query, (c, H, W) float32), each upsampled to S x S, the padding cropped away, resized to (H, W)."""
    nh, nw = kept
    for q in range(0, mask_logits.shape[0], chunk):
        m = F.interpolate(mask_logits[None, q:q + chunk].float(), size=(size, size), mode="bilinear",
                          align_corners=False)[:, :, :nh, :nw]  # (1, c, h, w): the padding cropped away
        yield q, F.interpolate(m, size=out_hw, mode="bilinear", align_corners=False)[0]


def _to_original(mask_logits: torch.Tensor, size: int, kept: tuple[int, int], out_hw: tuple[int, int],
                 chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """One image's mask logits (Q, S/4, S/4) -> (Q, H, W) float32 (every query at once: for small images)."""
    out = torch.empty(mask_logits.shape[0], *out_hw, device=mask_logits.device)
    for q, m in iter_query_chunks(mask_logits, size, kept, out_hw, chunk):
        out[q:q + m.shape[0]] = m
    return out


@dataclass
class PaddedPrediction:
    """The model's last prediction set on a padded batch, before any upsampling: mask logits (B, Q, S/4, S/4)
    and class logits (B, Q, C + 1) on the model's device, the resized (h, w) of each image inside the S x S
    input, and each image's original (H, W)."""

    mask_logits: torch.Tensor
    class_logits: torch.Tensor
    size: int
    kept: list[tuple[int, int]]
    out_hw: list[tuple[int, int]]

    def chunks(self, i: int, chunk: int = QUERY_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
        """Image ``i``'s mask logits at its original resolution, a chunk of queries at a time."""
        return iter_query_chunks(self.mask_logits[i], self.size, self.kept[i], self.out_hw[i], chunk)

    def classes(self, i: int) -> torch.Tensor:
        return self.class_logits[i].float()


@torch.no_grad()
def padded_forward(model, images: list[torch.Tensor], size: int, masked: Optional[bool] = None,
                   device: str | torch.device = "cpu", precision: str = "fp32") -> PaddedPrediction:
    """The padded protocol's model run on a batch of images (one forward); upsampling is left to the
    consumer, image by image and chunk by chunk (:meth:`PaddedPrediction.chunks`)."""
    batch, kept = pad_to_square(images, size)
    with masking(model, masked):
        pred = _final(model, batch.to(device), precision)
    return PaddedPrediction(pred.mask_logits, pred.class_logits, size, kept,
                            [tuple(img.shape[-2:]) for img in images])


@torch.no_grad()
def iter_padded(model, images: list[torch.Tensor], size: int, masked: Optional[bool] = None,
                device: str | torch.device = "cpu", precision: str = "fp32",
                chunk: int = QUERY_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Padded protocol on a batch of images, one image at a time: (mask logits (Q, H, W) at the original
    resolution, class logits (Q, C + 1)). Every query of one image at full size: the evaluation loop uses
    :func:`padded_forward` and the chunked post-processing instead."""
    pred = padded_forward(model, images, size, masked, device, precision)
    for i in range(len(images)):
        yield _to_original(pred.mask_logits[i], size, pred.kept[i], pred.out_hw[i], chunk), pred.classes(i)


def run_padded(model, images: list[torch.Tensor], size: int, masked: Optional[bool] = None,
               device: str | torch.device = "cpu", precision: str = "fp32") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`iter_padded` as a list (every image's masks at once: for a few images)."""
    return list(iter_padded(model, images, size, masked, device, precision))


def window_crops(image: torch.Tensor, size: int) -> tuple[torch.Tensor, list[int], tuple[int, int]]:
    """Shorter side resized to ``size``; ceil(long / short) square crops along the longer side with the
    overlap spread evenly. Returns crops (N, 3, S, S), their start offsets along the long side, and the
    resized (h, w)."""
    h, w = image.shape[-2:]
    factor = size / min(h, w)
    nh, nw = max(size, round(h * factor)), max(size, round(w * factor))
    img = resize_image(image, (nh, nw))
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


@dataclass
class WindowedPrediction:
    """The windowed protocol's model runs on a batch of images: each crop's last prediction set (mask logits
    (Q, S/4, S/4), class logits (Q, C + 1)), in order, and each image's crops (starts, resized (h, w))."""

    crops: list[tuple[torch.Tensor, torch.Tensor]]
    windows: list[tuple[list[int], tuple[int, int]]]
    size: int
    out_hw: list[tuple[int, int]]


@torch.no_grad()
def windowed_forward(model, images: list[torch.Tensor], size: int, batch_size: int = 1,
                     masked: Optional[bool] = None, device: str | torch.device = "cpu",
                     precision: str = "fp32") -> WindowedPrediction:
    """The windowed protocol's model runs: every crop of ``images``, ``batch_size`` crops per forward."""
    windows = [window_crops(img, size) for img in images]
    crops = torch.cat([c for c, _, _ in windows])  # (N, 3, S, S) over all images
    out = []
    with masking(model, masked):
        for i in range(0, len(crops), batch_size):
            pred = _final(model, crops[i:i + batch_size].to(device), precision)
            out.extend(zip(pred.mask_logits, pred.class_logits))
    return WindowedPrediction(out, [(starts, hw) for _, starts, hw in windows], size,
                              [tuple(img.shape[-2:]) for img in images])


def iter_windowed(pred: WindowedPrediction) -> Iterator[torch.Tensor]:
    """Per image, per-pixel class logits (C, H, W) at the original resolution: each crop's masks upsampled to
    S x S (one crop's at a time), turned into class logits, averaged where crops overlap, resized."""
    size, k = pred.size, 0
    for (starts, (nh, nw)), out_hw in zip(pred.windows, pred.out_hw):
        total = count = None
        for s in starts:
            m, c = pred.crops[k]
            m = F.interpolate(m[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
            logits = semantic_logits(m, c)  # (C, S, S)
            if total is None:
                total = torch.zeros(logits.shape[0], nh, nw, device=logits.device)
                count = torch.zeros(1, nh, nw, device=logits.device)
            if nh >= nw:
                total[:, s:s + size, :] += logits
                count[:, s:s + size, :] += 1
            else:
                total[:, :, s:s + size] += logits
                count[:, :, s:s + size] += 1
            k += 1
        avg = (total / count)[None]  # (1, C, h, w): overlapping crops averaged
        yield F.interpolate(avg, size=out_hw, mode="bilinear", align_corners=False)[0]


def run_windowed(model, images: list[torch.Tensor], size: int, batch_size: int = 1,
                 masked: Optional[bool] = None, device: str | torch.device = "cpu",
                 precision: str = "fp32") -> list[torch.Tensor]:
    """Windowed protocol: per image, per-pixel class logits (C, H, W) at the original resolution."""
    return list(iter_windowed(windowed_forward(model, images, size, batch_size, masked, device, precision)))
