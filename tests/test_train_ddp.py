"""The trainer under DDP on 2 CPU processes (gloo): a whole tiny run per backbone with
find_unused_parameters=False (a parameter without gradient fails it at the second step), and the logged loss,
which is the mean over processes."""
from __future__ import annotations

import csv
import json
import os
import sys

import pytest

from study.config import load_config, save_config
from study.runs import RunDir
from conftest import REPO

TINY = ["model.size=tiny", "model.img_size=64", "model.num_classes=6", "model.num_queries=8",
        "data.dataset=synthetic", "data.synthetic_image_size=64", "data.synthetic_train_images=12",
        "data.synthetic_val_images=2", "data.batch_size=1", "train.batch_size=2", "train.num_points=256",
        "train.warmup_steps=2", "train.backbone_warmup_steps=2", "train.deterministic=true",
        "train.tensorboard=false"]

# model.backbone values to train under DDP; None = the built-in tiny ViT. Other backbones (tiny EVA-02,
# DINOv3, ...) are added here, or in a test of their own that calls run_ddp_training.
BACKBONES = [None]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def torchrun(*args, timeout=300):
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path, root, *extra):
    cfg = load_config(None, TINY + [f"data.root={root}"] + list(extra))
    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)
    return path


def run_ddp_training(tmp_path, root, backbone=None, steps=3, *extra) -> RunDir:
    """`study train` on 2 gloo processes for ``steps`` steps; returns the finished run folder."""
    extra = list(extra) + ([f"model.backbone={backbone}"] if backbone else [])
    cfg_file = write_config(tmp_path, root, f"train.max_steps={steps}", f"train.checkpoint_every={steps}", *extra)
    run = RunDir(tmp_path / "ddp")
    proc = torchrun("-m", "study.cli", "train", str(cfg_file), "--run-dir", str(run.path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.parametrize("backbone", BACKBONES)
def test_ddp_two_cpu_processes(tmp_path, synthetic_root, backbone):
    run = run_ddp_training(tmp_path, synthetic_root, backbone)
    status = run.status()
    assert status["state"] == "finished" and status["world_size"] == 2
    assert run.metrics()["train"]["world_size"] == 2
    with open(run.csv_log) as f:
        rows = list(csv.DictReader(f))
    # 2 processes x 1 image reach the effective batch of 2 without accumulation; 3 steps, 2 of them after a
    # first gradient synchronisation (where an unused parameter would have failed DDP)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["grad_norm"]) > 0 for r in rows)


def test_logged_loss_is_the_mean_over_processes(tmp_path, synthetic_root):
    cfg_file = write_config(tmp_path, synthetic_root, "train.max_steps=2")
    out = tmp_path / "step.json"
    proc = torchrun(str(REPO / "tests" / "ddp_step_worker.py"), str(cfg_file), str(tmp_path / "run"), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["find_unused_parameters"] is False
    ranks = got["processes"]
    assert ranks[0]["loss"] != pytest.approx(ranks[1]["loss"])  # different images: rank 0 alone would be wrong
    for name, value in got["logged"].items():
        if name != "grad_norm":
            assert value == pytest.approx((ranks[0][name] + ranks[1][name]) / 2, rel=1e-6), name
