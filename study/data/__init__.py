"""Datasets: one reader per official format, the built-in synthetic set, training augmentation.

    build_dataset(data_cfg, split, task)  -> torch Dataset of study.data.types.Sample, with ``.info``
    study.data.synthetic.ensure_synthetic(root) / generate(root, ...)
    study.data.transforms.TrainTransform, collate
"""
from study.data.build import DATASETS, build_dataset
from study.data.source import DataError, DataNotFoundError
from study.data.types import DatasetInfo, Sample

__all__ = ["DATASETS", "build_dataset", "DataError", "DataNotFoundError", "DatasetInfo", "Sample"]
