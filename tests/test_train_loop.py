"""The trainer: bitwise resume after a real kill, skip when finished, sharding,
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


# ---- the step, the state, the device (study.train.trainer.run_step, study.train.state)

def _trainer(root, tmp_path, *extra):
    from study.device import ProcessEnv
    from study.train.loop import setup

    cfg = tiny_config(root, *extra)
    tr = setup(cfg, RunDir(tmp_path / "run"), ProcessEnv(), torch.device("cpu"))
    tr.model.train()
    return tr


def test_logged_loss_is_the_mean_over_micro_batches(tmp_path, synthetic_root):
    from study.train.loop import batches, log_values, run_step

    tr = _trainer(synthetic_root, tmp_path, "train.max_steps=3")
    assert tr.accumulate == 2  # train.batch_size=2 of data.batch_size=1 on one process
    _, micro = next(batches(tr, 0))
    if tr.annealing is not None:
        tr.annealing.apply(tr.model, 0)
    rng = torch.get_rng_state()
    with torch.no_grad():  # the oracle: each micro-batch's loss on the same weights and the same random draws
        alone = [tr.criterion(tr.model(images), targets)[0].item() for images, targets in micro]
    torch.set_rng_state(rng)
    result = run_step(tr, micro)
    logged = log_values(tr, result)
    assert alone[0] != pytest.approx(alone[1])  # two different losses: the mean is not the last one
    assert logged["loss"] == pytest.approx(sum(alone) / 2, rel=1e-5)
    assert tr.step == 1 and logged["grad_norm"] > 0


def test_one_host_read_per_step(tmp_path, synthetic_root, monkeypatch):
    """The trainer's own code (study/train/trainer.py) leaves a step's numbers on the device in run_step, and
    log_values reads them with one tolist() (the loss and matcher have their own reads, not counted here)."""
    import sys

    import study.train.trainer as core
    from study.train.loop import batches, log_values, run_step

    tr = _trainer(synthetic_root, tmp_path, "train.max_steps=3")
    _, micro = next(batches(tr, 0))
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args):
            if sys._getframe(1).f_code.co_filename == core.__file__:
                reads.append(name)
            return original(self, *args)
        return read

    for name in ("item", "tolist", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    result = run_step(tr, micro)
    assert reads == []
    log_values(tr, result)
    assert reads == ["tolist"]


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of this process that map ``path`` (Linux /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(path)):
                lo, hi = line.split()[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def test_checkpoint_is_memory_mapped(tmp_path, synthetic_root):
    from study.train.state import load_checkpoint

    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs Linux /proc/self/maps")
    run = train(tiny_config(synthetic_root, "train.max_steps=1"), RunDir(tmp_path / "run"))
    ckpt = load_checkpoint(run.last_checkpoint)
    ranges = _mapped_ranges(run.last_checkpoint.resolve())
    weights_in_file = [any(lo <= w.data_ptr() < hi for lo, hi in ranges) for w in ckpt["model"].values()]
    assert ranges and all(weights_in_file)  # the tensors are the file's pages, not copies in this process
    assert torch.load(run.last_checkpoint, weights_only=True)["step"] == ckpt["step"] == 1


def test_cuda_rng_state_is_this_process_device_only(monkeypatch):
    from study.train.state import rng_state, set_rng_state

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda d: calls.append(("get", d)) or torch.zeros(8, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append(("set", d)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every visible GPU's state saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("every visible GPU's state set"))
    state = rng_state(torch.device("cuda", 1))
    set_rng_state(state, torch.device("cuda", 0))  # resumed where the launcher shows this rank as cuda:0
    assert calls == [("get", torch.device("cuda", 1)), ("set", torch.device("cuda", 0))]
    assert "cuda" not in rng_state(torch.device("cpu"))


def test_deterministic_on_cuda_is_refused_before_anything_runs(tmp_path, synthetic_root, monkeypatch):
    from study.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("CUDA touched"))
    run = RunDir(tmp_path / "run")
    with pytest.raises(UserError, match="train.deterministic=true is supported on the CPU only"):
        train(tiny_config(synthetic_root, "train.device=cuda"), run)
    assert not run.path.exists()


def test_adapter_batchnorm_becomes_syncbatchnorm_for_ddp_on_cuda_only():
    from study.models.build import build_model
    from study.models.config import ModelConfig

    def kinds(model):
        return {type(m).__name__ for m in model.modules()}

    cfg = ModelConfig(variant="vit_adapter_m2f", size="tiny", img_size=64, num_classes=5, num_queries=6,
                      baseline=dict(hidden_dim=32, encoder_layers=2, encoder_heads=4, encoder_ffn=48,
                                    decoder_heads=4, decoder_ffn=48, conv_inplane=32))
    model = build_model(cfg)
    params = list(model.parameters())
    assert "BatchNorm2d" in kinds(model.prepare_distributed(torch.device("cpu")))  # SyncBatchNorm needs CUDA
    ddp_module = model.prepare_distributed(torch.device("cuda"))
    assert "SyncBatchNorm" in kinds(ddp_module) and "BatchNorm2d" not in kinds(ddp_module)
    assert list(ddp_module.parameters()) == params  # an optimiser built before still holds them


def test_compiled_training_keeps_every_annealing_version_compiled(tmp_path, synthetic_root, monkeypatch):
    """Annealing flips each masked layer's host flags twice, so a compiled forward has up to 2 * L2 + 1
    versions; the trainer lifts dynamo's recompile limit above that (else the rest runs uncompiled)."""
    import torch._dynamo

    monkeypatch.setattr(torch, "compile", lambda net, **kw: net)  # what is compiled does not matter here
    before = torch._dynamo.config.recompile_limit
    # dynamo's own patch, not monkeypatch: recompile_limit is an alias in dynamo's config, and monkeypatch's undo
    # of an alias that the trainer also set deletes it, which broke every later compiled test in the session
    with torch._dynamo.config.patch(recompile_limit=8):
        tr = _trainer(synthetic_root, tmp_path, "train.compile=true", "model.num_query_blocks=4")
        assert tr.model.num_masked_layers == 4
        assert torch._dynamo.config.recompile_limit >= 2 * 4 + 1  # 9 > dynamo's default of 8
    assert torch._dynamo.config.recompile_limit == before  # restored for the tests after this one


def test_a_model_that_does_not_anneal_gets_no_annealing(tmp_path, synthetic_root):
    """model.mask_setting=masked_train_only keeps P_mask = 1 in training: the trainer builds no schedule."""
    tr = _trainer(synthetic_root, tmp_path, "model.mask_setting=masked_train_only")
    assert tr.model.mask_annealing is False and tr.annealing is None
    tr = _trainer(synthetic_root, tmp_path / "b")
    assert tr.annealing is not None  # tiny eomt anneals by default
