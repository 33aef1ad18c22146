"""From configuration to a dataset: the one place that maps ``data.dataset`` names to readers (``READERS``)."""
from __future__ import annotations

from torch.utils.data import Dataset

from study.errors import UserError

from study.data.coco import CocoInstance, CocoPanoptic, build_ade20k_panoptic
from study.data.config import DATASETS, DataConfig
from study.data.semantic import build_ade20k, build_cityscapes, build_list
from study.data.source import require_root
from study.data.synthetic import ensure_synthetic

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

    return READERS[name](require_root(c.root, name), split, c, drop_empty)


# data.dataset name -> its reader (root, split, data config, drop_empty) -> Dataset; the names and their tasks
# are listed once, in study/data/config.py (DATASETS). The synthetic set is built above (it makes its root).
READERS = {
    "coco_panoptic": lambda root, split, c, drop: CocoPanoptic(root, split, c.image_dir, c.ann_file, c.ann_dir,
                                                              drop_empty=drop),
    "ade20k_panoptic": lambda root, split, c, drop: build_ade20k_panoptic(root, split, c.image_dir, c.ann_file,
                                                                         c.ann_dir, drop_empty=drop),
    "coco_instance": lambda root, split, c, drop: CocoInstance(root, split, c.image_dir, c.ann_file,
                                                              drop_empty=drop),
    "ade20k": lambda root, split, c, drop: build_ade20k(root, split, c.image_dir, c.ann_dir),
    "cityscapes": lambda root, split, c, drop: build_cityscapes(root, split, c.image_dir, c.ann_dir),
    "list": lambda root, split, c, drop: build_list(root, split, c.ann_file, c.class_names or None,
                                                    c.ignore_value),
}
