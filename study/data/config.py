"""Data section of the configuration."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from study.errors import UserError

# The data sets, listed once: name -> the tasks its reader serves (the paper trains each task on its own data
# set). Config validation reads the names here; study/data/build.py maps each to its reader
# (tests/test_data_names.py holds the two together).
DATASETS = {
    "coco_panoptic": ("panoptic",),
    "coco_instance": ("instance",),
    "ade20k_panoptic": ("panoptic",),  # the COCO panoptic format (Table 4; study/data/coco.py)
    "ade20k": ("semantic",),
    "cityscapes": ("semantic",),
    "list": ("semantic",),
    "synthetic": ("panoptic", "instance", "semantic"),
}


@dataclass
class DataConfig:
    # Dataset format: coco_panoptic, coco_instance, ade20k_panoptic (COCO panoptic format, Mask2Former's
    # conversion; Table 4), ade20k, cityscapes, list (image/label list files, CamVid),
    # or synthetic (the built-in procedural data set, generated on first use).
    dataset: str = "synthetic"
    root: Optional[str] = None  # dataset folder (or folder holding the official zip files)
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 1  # per process; the paper's effective batch is 16 in total (see train.accumulate)
    num_workers: int = 0

    # Overrides of the official layout, relative to root; '{split}' is replaced by the split name. Unset
    # means the official place (COCO: '{split}2017', 'annotations/panoptic_{split}2017.json',
    # 'annotations/panoptic_{split}2017'; ADE20K: 'images/{training|validation}'; list: '{split}.txt').
    image_dir: Optional[str] = None
    ann_file: Optional[str] = None  # COCO JSON, or the list file of the 'list' format
    ann_dir: Optional[str] = None  # COCO panoptic PNG folder, ADE20K label folder

    # 'list' format only (CamVid is the preset): names of label values 0..C-1; empty means CamVid's 11.
    class_names: list[str] = field(default_factory=list)
    # 'list' format: the label value meaning void (besides 255); None means len(class_names) (CamVid: 11).
    ignore_value: Optional[int] = None

    # Training images without any non-crowd segment are left out of the training split, as the official
    # code does (its check_empty_targets); the paper is silent. Evaluation splits keep every image.
    drop_empty_train_images: bool = True

    # Augmentation (docs/paper.md section 6). None takes the per-dataset default of study/data/transforms.py:
    # scale range 0.1-2.0 for COCO panoptic/instance, 0.5-2.0 for semantic; colour jitter only for ADE20K
    # and Cityscapes.
    scale_range: Optional[tuple[float, float]] = None
    color_jitter: Optional[bool] = None
    # When a crop leaves no mask the augmentation is redrawn (docs/paper.md section 6); the official code retries
    # without limit, we stop after this many redraws and return no targets (our choice).
    crop_retries: int = 50

    # The built-in synthetic data set (study/data/synthetic.py); root unset means a folder under
    # $STUDY_CACHE (default ~/.cache/study) named after these parameters.
    synthetic_image_size: int = 128
    synthetic_train_images: int = 400
    synthetic_val_images: int = 100
    synthetic_seed: int = 0

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise UserError(f"unknown dataset '{self.dataset}'; choose one of {', '.join(DATASETS)}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise UserError("batch_size must be >= 1 and num_workers >= 0")
        if self.scale_range is not None:
            lo, hi = self.scale_range
            if not 0 < lo <= hi:
                raise UserError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        if self.crop_retries < 0:
            raise UserError("crop_retries must be >= 0")
        if self.synthetic_image_size < 32:
            raise UserError("synthetic_image_size must be at least 32 pixels")
        if self.synthetic_train_images < 1 or self.synthetic_val_images < 1:
            raise UserError("synthetic_train_images and synthetic_val_images must be >= 1")
        if self.ignore_value is not None and not 0 <= self.ignore_value <= 255:
            raise UserError(f"ignore_value must be a label value 0..255, got {self.ignore_value}")
        if self.class_names and self.ignore_value is not None and self.ignore_value < len(self.class_names):
            raise UserError(f"ignore_value {self.ignore_value} is one of the {len(self.class_names)} class values")
        if self.class_names and len(self.class_names) > 255:
            raise UserError("the 'list' format holds at most 255 classes (8-bit label PNGs)")
