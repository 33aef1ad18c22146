"""The trainer: bitwise resume after a real kill, skip when finished, DDP on 2 CPU processes, sharding,
loss going down on real images for EoMT and a Mask2Former variant, failures that keep checkpoints intact."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from study.config import load_config, save_config
from study.runs import RunDir
from study.data.sampler import ShardedSampler
from study.train.loop import train
from conftest import REPO, data_dir

# A tiny, fast, deterministic run on the built-in synthetic set.
TINY = ["model.size=tiny", "model.img_size=64", "model.num_classes=6", "model.num_queries=8",
        "data.dataset=synthetic", "data.synthetic_image_size=64", "data.synthetic_train_images=12",
        "data.synthetic_val_images=2", "data.batch_size=1", "train.batch_size=2", "train.num_points=256",
        "train.warmup_steps=2", "train.backbone_warmup_steps=2", "train.deterministic=true",
        "train.tensorboard=false"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def tiny_config(root, *extra):
    return load_config(None, TINY + [f"data.root={root}"] + list(extra))


def weights(run: RunDir) -> dict:
    return torch.load(run.final_weights, map_location="cpu", weights_only=True)


def logged_steps(run: RunDir) -> list[int]:
    with open(run.csv_log) as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def study(*args):
    return [sys.executable, "-m", "study.cli", *args]


def test_killed_run_resumes_bitwise_identical(tmp_path, synthetic_root):
    cfg = tiny_config(synthetic_root, "train.max_steps=14", "train.checkpoint_every=2")
    straight = train(cfg, RunDir(tmp_path / "straight"))
    assert straight.status()["state"] == "finished"

    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_file)
    killed = RunDir(tmp_path / "killed")
    proc = subprocess.Popen(study("train", str(cfg_file), "--run-dir", str(killed.path)), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not killed.last_checkpoint.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # really killed: no handler, no clean-up
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = torch.load(killed.last_checkpoint, weights_only=True)["step"]
    assert 0 < at_kill < 14 and killed.status()["state"] == "running"

    resumed = train(cfg, killed)  # the same command again
    assert resumed.status()["state"] == "finished"
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    assert logged_steps(resumed) == list(range(1, 15))  # rows past the checkpoint were dropped, then redone
    with open(straight.csv_log) as f1, open(resumed.csv_log) as f2:
        losses = [[r["loss"] for r in csv.DictReader(f)] for f in (f1, f2)]
    assert losses[0] == losses[1]

    mtime = resumed.final_weights.stat().st_mtime_ns
    train(cfg, resumed)  # finished: not retrained
    assert resumed.final_weights.stat().st_mtime_ns == mtime


def test_run_folder_of_another_config_is_refused(tmp_path, synthetic_root):
    run = RunDir(tmp_path / "run")
    train(tiny_config(synthetic_root, "train.max_steps=1"), run)
    with pytest.raises(ValueError, match="holds a run of another configuration"):
        train(tiny_config(synthetic_root, "train.max_steps=2"), run)


def test_sharded_sampler_is_disjoint_complete_and_resumable():
    shards = [list(ShardedSampler(11, rank, 2, seed=3)) for rank in range(2)]
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) == len(shards[1]) == 5
    s = ShardedSampler(11, 1, 2, seed=3)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start=2)
    assert list(s) == full[2:] and len(s) == 3
    s.set_epoch(5)
    assert list(s) != full  # a new order each epoch


def test_ddp_two_cpu_processes(tmp_path, synthetic_root):
    cfg = tiny_config(synthetic_root, "train.max_steps=3", "train.checkpoint_every=3")
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_file)
    run = RunDir(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "study.cli", "train", str(cfg_file), "--run-dir", str(run.path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = run.status()
    assert status["state"] == "finished" and status["world_size"] == 2
    # 2 processes x 1 image reach the effective batch of 2 without accumulation
    assert run.metrics()["train"]["world_size"] == 2 and logged_steps(run) == [1, 2, 3]


def _losses(run: RunDir) -> list[float]:
    with open(run.csv_log) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


# A narrow Mask2Former (the default 256-wide decoder would dominate a 64-wide tiny ViT's time).
NARROW_M2F = ["model.baseline.hidden_dim=32", "model.baseline.encoder_layers=2", "model.baseline.encoder_ffn=64",
               "model.baseline.decoder_layers=3", "model.baseline.decoder_ffn=64"]


@pytest.mark.parametrize("variant", ["eomt", "sfp_m2f"])
def test_loss_goes_down_on_real_images(tmp_path, variant):
    camvid = data_dir("camvid")
    lines = (camvid / "train.txt").read_text().splitlines()[:4]
    (tmp_path / "few.txt").write_text("\n".join(lines) + "\n")
    cfg = load_config(None, [f"model.variant={variant}", "model.size=tiny", "model.img_size=64",
                             "model.num_classes=11", "model.num_queries=12", "data.dataset=list",
                             f"data.root={camvid}", f"data.ann_file={tmp_path / 'few.txt'}",
                             "data.scale_range=[0.5,0.5]", "data.batch_size=2", "train.batch_size=2",
                             "train.max_steps=30", "train.lr=1e-3", "train.layer_decay=1.0",
                             "train.warmup_steps=1", "train.backbone_warmup_steps=1", "train.num_points=512",
                             "train.tensorboard=false", "task=semantic"]
                      + (NARROW_M2F if variant != "eomt" else []))
    losses = _losses(train(cfg, RunDir(tmp_path / variant)))
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_failure_keeps_the_written_checkpoint(tmp_path, synthetic_root):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    cfg = tiny_config(root, "train.max_steps=40", "train.checkpoint_every=1")
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_file)
    run = RunDir(tmp_path / "run")
    proc = subprocess.Popen(study("train", str(cfg_file), "--run-dir", str(run.path)), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not run.last_checkpoint.is_file() and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    before = run.last_checkpoint.read_bytes()
    for png in (root / "train2017").glob("*.png"):  # every training image now corrupt
        png.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"train2017.*\.png"):
        train(cfg, run)
    assert run.last_checkpoint.read_bytes() == before  # not deleted, not rewritten
    torch.load(run.last_checkpoint, weights_only=True)  # still loads
    assert run.status()["state"] == "failed" and "png" in run.status()["error"]
