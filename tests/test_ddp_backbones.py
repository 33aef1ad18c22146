"""DDP with ``find_unused_parameters=False`` on the rotary-embedding backbones (issue 17 item 4).

timm builds EVA-02 with its final LayerNorm as ``fc_norm`` (average pooling); a head that read ``vit.norm``
left it without a gradient, and DDP failed at the second step. Here tiny EoMT on the tiny EVA-02 and DINOv3
widths trains for 3 steps on 2 gloo processes through the public entry (``study train`` under torchrun).
"""
from __future__ import annotations

import csv

import pytest

from test_train_ddp import run_ddp_training


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.mark.parametrize("backbone", ["tiny_eva02", "tiny_dinov3"])
def test_ddp_trains_on_rope_backbones(tmp_path, synthetic_root, backbone):
    run = run_ddp_training(tmp_path, synthetic_root, backbone, 3)
    status = run.status()
    assert status["state"] == "finished" and status["world_size"] == 2
    with open(run.csv_log) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]  # steps 2 and 3 follow a gradient all-reduce
    assert all(float(r["grad_norm"]) > 0 for r in rows)
