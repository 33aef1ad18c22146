"""The data set names are listed once (study/data/config.py ``DATASETS``): every name has a reader, and config
validation and the builder refuse the same unknown name."""
from __future__ import annotations

import pytest

from study.data.build import READERS, build_dataset
from study.data.config import DATASETS, DataConfig
from study.errors import UserError


def test_every_listed_data_set_has_a_reader():
    assert set(READERS) | {"synthetic"} == set(DATASETS)


def test_an_unknown_name_is_refused_naming_the_choices():
    with pytest.raises(UserError, match="unknown dataset 'cocoo'.*coco_panoptic"):
        DataConfig(dataset="cocoo").validate()


def test_a_data_set_serves_only_its_tasks(tmp_path):
    with pytest.raises(UserError, match="serves the task"):
        build_dataset(DataConfig(dataset="ade20k", root=str(tmp_path)), "train", "panoptic")
