"""From configuration to a dataset: the one place that maps ``data.dataset`` names to readers."""
from __future__ import annotations

from torch.utils.data import Dataset

from study.errors import UserError

from study.data.coco import CocoInstance, CocoPanoptic, build_ade20k_panoptic
from study.data.config import DataConfig
from study.data.semantic import build_ade20k, build_cityscapes, build_list
from study.data.source import require_root
from study.data.synthetic import ensure_synthetic

# dataset name -> the tasks its reader serves (the paper trains each task on its own data set).
DATASETS = {
    "coco_panoptic": ("panoptic",),
    "coco_instance": ("instance",),
    "ade20k_panoptic": ("panoptic",),  # the COCO panoptic format (Table 4; study/data/coco.py)
    "ade20k": ("semantic",),
    "cityscapes": ("semantic",),
    "list": ("semantic",),
    "synthetic": ("panoptic", "instance", "semantic"),
}


def build_dataset(data_cfg: DataConfig, split: str, task: str) -> Dataset:
    """The raw (untransformed) dataset of ``split`` for ``task``.

    Items are :class:`study.data.types.Sample`; ``.info`` is a :class:`study.data.types.DatasetInfo`
    (COCO panoptic also sets ``info.extra['panoptic_json']`` / ``['panoptic_dir']``, COCO instance
    ``info.extra['instances_json']``, the official files evaluators read). ``split`` is a name such as
    ``data_cfg.train_split``; images without any non-crowd segment are left out of the training split when
    ``data_cfg.drop_empty_train_images`` is set.
    """
    name = data_cfg.dataset
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    if task not in DATASETS[name]:
        raise UserError(f"dataset '{name}' serves the task(s) {', '.join(DATASETS[name])}, not '{task}'")
    drop_empty = data_cfg.drop_empty_train_images and split == data_cfg.train_split
    c = data_cfg

    if name == "synthetic":
        root = ensure_synthetic(c.root, c.synthetic_image_size, c.synthetic_train_images,
                                c.synthetic_val_images, c.synthetic_seed)
        if task == "panoptic":
            return CocoPanoptic(root, split, drop_empty=drop_empty, name="synthetic")
        if task == "instance":
            return CocoInstance(root, split, drop_empty=drop_empty, name="synthetic")
        return build_ade20k(root, split, name="synthetic")

    root = require_root(c.root, name)
    if name == "coco_panoptic":
        return CocoPanoptic(root, split, c.image_dir, c.ann_file, c.ann_dir, drop_empty=drop_empty)
    if name == "ade20k_panoptic":
        return build_ade20k_panoptic(root, split, c.image_dir, c.ann_file, c.ann_dir, drop_empty=drop_empty)
    if name == "coco_instance":
        return CocoInstance(root, split, c.image_dir, c.ann_file, drop_empty=drop_empty)
    if name == "ade20k":
        return build_ade20k(root, split, c.image_dir, c.ann_dir)
    if name == "cityscapes":
        return build_cityscapes(root, split, c.image_dir, c.ann_dir)
    return build_list(root, split, c.ann_file, c.class_names or None, c.ignore_value)
