"""A run's identity (study/config.py ``config_hash``) survives new settings that do not change what a run computes.

The hashes below were computed by the code at 2e792d6, before the trainer's logging and in-training evaluation
keys (train.log_every, log_every_s, eval_every, eval_max_images) and the scoring engine and protocol existed: a
grid launched again finds the runs it made then, instead of training them all again under new names.
"""
from __future__ import annotations

import pytest

from study.config import config_hash, load_config

BEFORE = [
    ([], "29ec376c"),
    (["model.variant=eomt_masked", "model.size=tiny", "train.lr=3e-4", "seed=1"], "dcba5b04"),
    (["task=instance", "model.num_queries=50"], "dfa6b5ac"),
]


@pytest.mark.parametrize("overrides,expected", BEFORE)
def test_hash_of_runs_made_before_the_new_keys(overrides, expected):
    assert config_hash(load_config(None, overrides)) == expected


def test_following_settings_leave_the_identity_and_results_do_not():
    base = config_hash(load_config(None, []))
    follow = ["train.log_every=5", "train.log_every_s=2", "train.eval_every=3", "train.eval_max_images=4",
              "eval.engine=pycocotools", "eval.protocol=official"]
    assert config_hash(load_config(None, follow)) == base
    assert config_hash(load_config(None, ["train.lr=1e-3"])) != base
    assert config_hash(load_config(None, ["train.max_steps=7"])) != base
