"""Training augmentation (docs/paper.md section 6), mask-aware, driven by an explicit random generator.

Order, as in the official EoMT code: drop crowd segments; colour jitter (ADE20K and Cityscapes only);
horizontal flip; scale jitter of the crop size; zero-pad bottom/right to the crop; random crop; drop masks
that became empty; when none remain, redraw the whole augmentation of the same image.

Every random draw comes from the ``torch.Generator`` passed to :meth:`TrainTransform.__call__`, never from
the global generator, so a trainer that saves and restores that generator (or derives it from the step,
as :class:`AugmentedDataset` does) resumes bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as nnf
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from study.data.types import Sample

# docs/paper.md section 6, colour jitter. Brightness: the official code scales pixels by a factor drawn from
# 1 +- 32/255 (torchvision's adjust_brightness) rather than adding a delta; we follow the official code.
BRIGHTNESS_DELTA = 32 / 255  # docs/paper.md section 6: brightness +-32/255
CONTRAST_SATURATION_RANGE = (0.5, 1.5)  # docs/paper.md section 6: contrast and saturation 0.5-1.5
HUE_DELTA = 18 / 360  # docs/paper.md section 6: hue +-18 degrees (torchvision measures hue in turns)
JITTER_PROB = 0.5  # docs/paper.md section 6: each colour operation applied with p 0.5
# docs/paper.md section 6: colour jitter only for ADE20K and Cityscapes (ADE20K panoptic too, as the official
# ADE20K panoptic data module's color_jitter_enabled=True; its scale range is COCO's, as below)
COLOR_JITTER_DATASETS = ("ade20k", "ade20k_panoptic", "cityscapes")
# docs/paper.md section 6: scale jitter of the crop size
SCALE_RANGE_COCO = (0.1, 2.0)  # COCO panoptic and instance
SCALE_RANGE_SEMANTIC = (0.5, 2.0)  # semantic data sets
# Our choice, paper silent: the synthetic set's objects are small already; 0.1x would erase them.
SCALE_RANGE_SYNTHETIC = (0.5, 1.5)
FLIP_PROB = 0.5  # paper silent on the probability; the official code uses torchvision's default 0.5
ORDER_PROB = 0.5  # paper silent; the official code puts contrast first or last by a fair coin


def default_scale_range(dataset: str, task: str) -> tuple[float, float]:
    """The per-dataset scale-jitter range (docs/paper.md section 6)."""
    if dataset == "synthetic":
        return SCALE_RANGE_SYNTHETIC
    if dataset in ("coco_panoptic", "coco_instance"):
        return SCALE_RANGE_COCO
    return SCALE_RANGE_SEMANTIC if task == "semantic" else SCALE_RANGE_COCO


def default_color_jitter(dataset: str) -> bool:
    return dataset in COLOR_JITTER_DATASETS


class TrainTransform:
    """Augment one :class:`Sample` to a ``crop_size`` square.

    Args:
        crop_size: side S of the square training crop (the model's input size, e.g. 640 for COCO).
        scale_range: the crop size is scaled by a factor drawn uniformly from this range before the image is
            resized to fit it (torchvision's ScaleJitter, as in the official code).
        color_jitter: apply brightness, contrast, saturation and hue jitter.
        crop_retries: redraws of the whole augmentation when a crop keeps no mask; after that the sample is
            returned without targets (the official code retries without limit).
    """

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = SCALE_RANGE_COCO,
                 color_jitter: bool = False, crop_retries: int = 50, flip_prob: float = FLIP_PROB):
        self.crop_size = int(crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.color_jitter = bool(color_jitter)
        self.crop_retries = int(crop_retries)
        self.flip_prob = float(flip_prob)

    @classmethod
    def from_config(cls, data_cfg, task: str, crop_size: int) -> "TrainTransform":
        """Per-dataset defaults (docs/paper.md section 6) unless ``data.scale_range`` / ``data.color_jitter`` are
        set."""
        scale = data_cfg.scale_range or default_scale_range(data_cfg.dataset, task)
        jitter = default_color_jitter(data_cfg.dataset) if data_cfg.color_jitter is None else data_cfg.color_jitter
        return cls(crop_size, scale, jitter, data_cfg.crop_retries)

    def __repr__(self) -> str:
        return (f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, "
                f"color_jitter={self.color_jitter}, crop_retries={self.crop_retries})")

    # ------------------------------------------------------------------------------------ random draws

    @staticmethod
    def _rand(g: torch.Generator) -> float:
        return float(torch.rand((), generator=g))

    def _uniform(self, lo: float, hi: float, g: torch.Generator) -> float:
        return lo + (hi - lo) * self._rand(g)

    # ------------------------------------------------------------------------------------------ steps

    def _jitter(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Brightness, then contrast before or after saturation+hue (order drawn), each with p 0.5."""
        lo, hi = CONTRAST_SATURATION_RANGE

        def contrast(img):
            return TF.adjust_contrast(img, self._uniform(lo, hi, g)) if self._rand(g) < JITTER_PROB else img

        def saturation_hue(img):
            if self._rand(g) < JITTER_PROB:
                img = TF.adjust_saturation(img, self._uniform(lo, hi, g))
            if self._rand(g) < JITTER_PROB:
                img = TF.adjust_hue(img, self._uniform(-HUE_DELTA, HUE_DELTA, g))
            return img

        if self._rand(g) < JITTER_PROB:
            image = TF.adjust_brightness(image, self._uniform(1 - BRIGHTNESS_DELTA, 1 + BRIGHTNESS_DELTA, g))
        if self._rand(g) < ORDER_PROB:  # contrast first, or saturation and hue first
            return saturation_hue(contrast(image))
        return contrast(saturation_hue(image))

    def _once(self, image: torch.Tensor, masks: torch.Tensor, g: torch.Generator):
        """One draw of jitter, flip, scale, pad, crop. image uint8 (3, H, W), masks bool (N, H, W)."""
        s = self.crop_size
        if self.color_jitter:
            image = self._jitter(image, g)
        flip = self._rand(g) < self.flip_prob
        if flip:
            image = image.flip(-1)  # the masks are flipped by index in resize_crop_masks
        h, w = image.shape[1:]
        r = min(s / h, s / w) * self._uniform(*self.scale_range, g)  # fit the jittered crop size
        nh, nw = max(1, int(h * r)), max(1, int(w * r))
        image = TF.resize(image, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True)
        image = nnf.pad(image, (0, max(0, s - nw), 0, max(0, s - nh)))  # zero-pad bottom/right to the crop
        h, w = image.shape[1:]
        top = int(torch.randint(0, h - s + 1, (), generator=g)) if h > s else 0
        left = int(torch.randint(0, w - s + 1, (), generator=g)) if w > s else 0
        return image[:, top:top + s, left:left + s], resize_crop_masks(masks, nh, nw, top, left, s, flip)

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        """Augmented copy of ``sample``: image uint8 (3, S, S), masks bool (N', S, S), crowd dropped."""
        keep = ~sample.is_crowd
        masks, labels = sample.masks[keep], sample.labels[keep]
        seg_ids = sample.segment_ids[keep] if sample.segment_ids is not None else None
        for _ in range(self.crop_retries + 1):
            image, m = self._once(sample.image, masks, generator)
            valid = m.flatten(1).any(1)  # (N,) segments still visible in the crop
            if valid.any() or len(masks) == 0:
                break
        return Sample(image=image.contiguous(), masks=m[valid].contiguous(), labels=labels[valid],
                      is_crowd=torch.zeros(int(valid.sum()), dtype=torch.bool), image_id=sample.image_id,
                      file_name=sample.file_name, segment_ids=None if seg_ids is None else seg_ids[valid])


def resize_crop_masks(masks: torch.Tensor, nh: int, nw: int, top: int, left: int, size: int,
                      flip: bool = False) -> torch.Tensor:
    """(Flip,) nearest-resize bool masks (N, H, W) to (nh, nw), zero-pad bottom/right and crop the ``size``
    square at (top, left) -- computing only the pixels inside the crop.

    Same result as flip, ``TF.resize(..., NEAREST)``, pad, crop one after the other (a test checks it): PyTorch's nearest rule
    reads output index i from source index floor(i * (in / out)) in float32, clamped to in - 1. Resizing every
    mask in full first would cost up to 4x the crop's pixels per mask at scale 2.
    """
    n, h, w = masks.shape

    def source(start: int, out: int, inp: int) -> torch.Tensor:
        idx = torch.arange(start, min(start + size, out), dtype=torch.float32)
        scale = torch.tensor(inp, dtype=torch.float32) / out
        return (idx * scale).floor().long().clamp_(max=inp - 1)

    rows, cols = source(top, nh, h), source(left, nw, w)
    if flip:
        cols = w - 1 - cols
    out = masks.new_zeros(n, size, size)
    out[:, :len(rows), :len(cols)] = masks[:, rows][:, :, cols]
    return out


def collate(batch: list[Sample]) -> tuple[torch.Tensor, list[dict]]:
    """Same-size samples -> images float (B, 3, S, S) in [0, 1] and per-image targets
    ``{"masks": bool (N, S, S), "labels": int64 (N,), "is_crowd": bool (N,)}``."""
    sizes = {tuple(s.image.shape) for s in batch}
    if len(sizes) != 1:
        raise ValueError(f"collate needs images of one size (apply TrainTransform first), got {sorted(sizes)}")
    images = torch.stack([s.image for s in batch]).float().div_(255)
    targets = [{"masks": s.masks, "labels": s.labels, "is_crowd": s.is_crowd} for s in batch]
    return images, targets


class AugmentedDataset(Dataset):
    """``dataset`` augmented by ``transform`` with a generator seeded from (seed, epoch, index).

    The random state of each item depends only on those three numbers, not on the worker that loads it or
    on what was loaded before, so training resumes bit for bit after :meth:`set_epoch` (call it before
    creating each epoch's DataLoader iterator; persistent workers keep the old epoch).
    """

    def __init__(self, dataset: Dataset, transform: TrainTransform, seed: int = 0):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, int(seed), 0
        self.info = getattr(dataset, "info", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def generator(self, index: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(2, np.uint64)
        return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        return self.transform(self.dataset[index], self.generator(index))


def build_train_transform(data_cfg, task: str, crop_size: int) -> TrainTransform:
    """Alias of :meth:`TrainTransform.from_config` for builders that prefer functions."""
    return TrainTransform.from_config(data_cfg, task, crop_size)


__all__ = ["TrainTransform", "AugmentedDataset", "collate", "build_train_transform", "default_scale_range",
           "default_color_jitter"]
