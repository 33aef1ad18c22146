"""Training augmentation (docs/paper.md section 6) and collate."""
from __future__ import annotations

import colorsys

import pytest
import torch

from study.data.config import DataConfig
from study.data.transforms import AugmentedDataset, TrainTransform, collate
from study.data.types import Sample


def _sample(h=40, w=60) -> Sample:
    """Left half segment 0 (white), right half segment 1 (black, crowd), a small square segment 2 (grey)."""
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, :, : w // 2] = True
    masks[1, :, w // 2:] = True
    masks[2, 5:15, w // 2 + 5: w // 2 + 15] = True
    masks[1] &= ~masks[2]
    image[:, masks[0]] = 255
    image[:, masks[2]] = 128
    return Sample(image=image, masks=masks, labels=torch.tensor([4, 7, 2]), is_crowd=torch.tensor([False, True, False]),
                  image_id=1, file_name="x.png", segment_ids=torch.tensor([10, 11, 12]))


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_per_dataset_defaults_from_the_paper():
    t = TrainTransform.from_config(DataConfig(dataset="coco_panoptic"), "panoptic", 640)
    assert (t.crop_size, t.scale_range, t.color_jitter) == (640, (0.1, 2.0), False)
    assert TrainTransform.from_config(DataConfig(dataset="coco_instance"), "instance", 64).scale_range == (0.1, 2.0)
    for name in ("ade20k", "cityscapes"):
        t = TrainTransform.from_config(DataConfig(dataset=name), "semantic", 512)
        assert (t.scale_range, t.color_jitter) == ((0.5, 2.0), True)
    t = TrainTransform.from_config(DataConfig(dataset="list"), "semantic", 512)
    assert (t.scale_range, t.color_jitter) == ((0.5, 2.0), False)
    t = TrainTransform.from_config(DataConfig(dataset="ade20k", scale_range=(1.0, 1.0), color_jitter=False),
                                   "semantic", 32)
    assert (t.scale_range, t.color_jitter) == ((1.0, 1.0), False)


def test_deterministic_from_the_generator_and_never_touches_global_rng():
    t = TrainTransform(48, (0.1, 2.0), color_jitter=True)
    state = torch.get_rng_state()
    a, b, c = t(_sample(), _g(1)), t(_sample(), _g(1)), t(_sample(), _g(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.image, b.image) and torch.equal(a.masks, b.masks)
    assert not (torch.equal(a.image, c.image) and torch.equal(a.masks, c.masks))


def test_crowd_dropped_shapes_and_no_empty_masks():
    t = TrainTransform(32, (0.1, 2.0))
    for seed in range(20):
        s = t(_sample(), _g(seed))
        assert s.image.shape == (3, 32, 32) and s.image.dtype == torch.uint8
        assert s.masks.shape == (len(s.labels), 32, 32) and s.masks.dtype == torch.bool
        assert 11 not in s.segment_ids.tolist() and 7 not in s.labels.tolist()  # the crowd segment is gone
        assert not s.is_crowd.any() and len(s.labels) >= 1
        assert bool(s.masks.flatten(1).any(1).all())  # masks emptied by the crop are dropped


def test_scale_then_zero_pad_bottom_right():
    # 40x60 into a 120 crop at scale 1: r = min(120/40, 120/60) = 2 -> 80x120, padded with 40 zero rows below
    t = TrainTransform(120, (1.0, 1.0), flip_prob=0.0)
    s = t(_sample(), _g(0))
    assert s.image.shape == (3, 120, 120)
    assert (s.image[:, 80:] == 0).all() and not s.masks[:, 80:].any()
    assert s.masks[0, :80, :60].all() and not s.masks[0, :80, 60:].any()  # left half stays left, scaled x2
    assert s.masks[1].sum() == 20 * 20  # the 10x10 square scaled by 2
    # at scale 0.5 the image is 40x60 in a 120 crop: padding on the right as well
    s = TrainTransform(120, (0.5, 0.5), flip_prob=0.0)(_sample(), _g(0))
    assert (s.image[:, :, 60:] == 0).all() and (s.image[:, :40, :30] == 255).all()


def test_flip_moves_image_and_masks_together():
    t = TrainTransform(60, (1.0, 1.0), flip_prob=1.0)
    s = t(_sample(60, 60), _g(0))
    ref = _sample(60, 60)
    assert torch.equal(s.image, ref.image.flip(-1))
    assert torch.equal(s.masks, ref.masks[[0, 2]].flip(-1))


def test_random_crop_keeps_image_and_masks_aligned():
    t = TrainTransform(24, (2.0, 2.0))
    offsets = set()
    for seed in range(10):
        s = t(_sample(), _g(seed))
        white = (s.image[0] > 200)
        seg0 = s.masks[s.labels == 4].any(0) if (s.labels == 4).any() else torch.zeros(24, 24, dtype=torch.bool)
        assert (white == seg0).float().mean() > 0.97  # bilinear edges may differ by a pixel
        offsets.add(int(white.sum()))
    assert len(offsets) > 3  # different crops


def test_empty_crop_is_redrawn_until_a_mask_survives():
    h = w = 200
    masks = torch.zeros(1, h, w, dtype=torch.bool)
    masks[0, :10, :10] = True  # a small segment (2x2 pixels after scaling): most crops miss it
    s = Sample(image=torch.zeros(3, h, w, dtype=torch.uint8), masks=masks, labels=torch.tensor([1]),
               is_crowd=torch.tensor([False]))
    t = TrainTransform(20, (2.0, 2.0), crop_retries=1000)
    for seed in range(5):
        assert len(t(s, _g(seed)).labels) == 1
    # no redraws allowed: some crops come back without targets instead of looping forever
    t0 = TrainTransform(20, (2.0, 2.0), crop_retries=0)
    assert any(len(t0(s, _g(seed)).labels) == 0 for seed in range(10))
    # only crowd segments: nothing to keep, no endless redraws
    s.is_crowd[:] = True
    assert len(t(s, _g(0)).labels) == 0


def test_colour_jitter_ranges_of_the_paper():
    """Brightness factor in 1 +- 32/255 and hue shift within +-18 degrees, each applied about half the time;
    masks are never touched."""
    t = TrainTransform(8, (1.0, 1.0), color_jitter=True, flip_prob=0.0)
    grey = Sample(image=torch.full((3, 8, 8), 128, dtype=torch.uint8), masks=torch.ones(1, 8, 8, dtype=torch.bool),
                  labels=torch.tensor([0]), is_crowd=torch.tensor([False]))
    values = torch.tensor([int(t(grey, _g(k)).image[0, 0, 0]) for k in range(300)])
    # on grey, contrast, saturation and hue change nothing: only brightness moves the value
    # (hue and saturation round through float and back: +-1 on top of 128 * (1 +- 32/255) = 111.9 .. 144.1)
    assert values.min() >= 110 and values.max() <= 146
    assert values.min() <= 116 and values.max() >= 140
    assert 0.35 < ((values - 128).abs() <= 1).float().mean() < 0.7
    red = Sample(image=torch.zeros(3, 8, 8, dtype=torch.uint8), masks=grey.masks, labels=grey.labels,
                 is_crowd=grey.is_crowd)
    red.image[0] = 200
    red.image[1] = 40
    red.image[2] = 40
    hues = []
    for k in range(300):
        r, g, b = (t(red, _g(k)).image[:, 0, 0].float() / 255).tolist()
        hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
        hues.append(hue if hue < 180 else hue - 360)
    hues = torch.tensor(hues)
    assert hues.abs().max() <= 18.5 and hues.abs().max() >= 14
    assert 0.35 < (hues.abs() < 0.5).float().mean() < 0.65
    assert torch.equal(t(red, _g(3)).masks, red.masks)
    # without jitter the pixels are untouched
    assert torch.equal(TrainTransform(8, (1.0, 1.0), flip_prob=0.0)(red, _g(0)).image, red.image)


def test_collate_and_augmented_dataset():
    t = TrainTransform(32, (0.5, 2.0))
    data = [_sample(), _sample(50, 30)]
    aug = AugmentedDataset(data, t, seed=5)
    images, targets = collate([aug[0], aug[1]])
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0 and float(images.max()) == 1.0
    assert set(targets[0]) == {"masks", "labels", "is_crowd"}
    assert targets[0]["masks"].shape[1:] == (32, 32) and targets[0]["labels"].dtype == torch.int64
    # the random state of an item depends on (seed, epoch, index) only: order does not matter
    again = AugmentedDataset(data, t, seed=5)
    assert torch.equal(again[1].image, aug[1].image) and torch.equal(again[0].masks, aug[0].masks)
    aug.set_epoch(1)
    assert not torch.equal(aug[0].image, again[0].image) or not torch.equal(aug[0].masks, again[0].masks)
    with pytest.raises(ValueError, match="one size"):
        collate([_sample(), _sample(50, 30)])


def test_mask_resize_by_index_equals_resize_pad_crop():
    """resize_crop_masks (only the crop's pixels) == flip, torchvision nearest resize, pad, crop in full."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from study.data.transforms import resize_crop_masks

    g = _g(0)
    for _ in range(60):
        h, w = (int(v) for v in torch.randint(5, 90, (2,), generator=g))
        nh, nw = (int(v) for v in torch.randint(1, 150, (2,), generator=g))
        size = int(torch.randint(4, 100, (), generator=g))
        flip = bool(torch.rand((), generator=g) < 0.5)
        masks = torch.rand(3, h, w, generator=g) < 0.3
        ref = TF.resize((masks.flip(-1) if flip else masks).to(torch.uint8), [nh, nw],
                        interpolation=InterpolationMode.NEAREST).bool()
        ref = torch.nn.functional.pad(ref, (0, max(0, size - nw), 0, max(0, size - nh)))
        top = int(torch.randint(0, ref.shape[1] - size + 1, ()))
        left = int(torch.randint(0, ref.shape[2] - size + 1, ()))
        ref = ref[:, top:top + size, left:left + size]
        assert torch.equal(resize_crop_masks(masks, nh, nw, top, left, size, flip), ref), (h, w, nh, nw, size)
