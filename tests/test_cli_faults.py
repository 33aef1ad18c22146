"""Every command's top level (study/cli.py) and the commands' own refusals, issue 28: what the machine refuses
(OSError), Ctrl-C and a closed pipe end in one line without a traceback; Slurm missing is said in one line and a
Slurm dry run shows its sbatch settings; a dry run opens the data it names; `study export` refuses missing
weights, a folder and a file the suite did not write."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from study.cli import main
from study.launch.collect import run_state
from study.runs import RunDir
from conftest import REPO
from test_launch import synthetic_root, write_grid  # noqa: F401 (fixture)


def _one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def _study(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "STUDY_PROGRESS": "0"}
    return subprocess.Popen([sys.executable, "-m", "study.cli", *args], cwd=REPO, env=env, **kw)


def test_os_errors_of_every_command_are_one_line(tmp_path, synthetic_root, capsys):
    blocker = tmp_path / "a_file"  # a folder path through a file: mkdir, lock and tempfile all fail (ENOTDIR)
    blocker.write_text("not a folder")
    grid = write_grid(tmp_path, synthetic_root, {"runs": [{"seed": 1}]})
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("model:\n  size: tiny\n  img_size: 32\n  num_classes: 3\n  num_queries: 4\n")
    cases = [
        ["train", "--set", "model.size=tiny", "--set", "model.img_size=64", "--set", "data.dataset=synthetic",
         "--set", f"data.root={synthetic_root}", "--set", f"output_dir={blocker / 'runs'}"],
        ["collect", str(tmp_path), "--csv", str(blocker / "results.csv")],
        ["export", str(tiny), "--random-weights", "--no-verify", str(blocker / "m.onnx")],
        ["launch", grid, "--cluster", "debug", "--set", f"output_dir={blocker / 'runs'}"],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"study {argv[0]}: error: ") and str(blocker) in line  # ENOTDIR or EEXIST
    lock = RunDir(tmp_path / "run")  # the writer lock cannot be opened (a folder stands in its place)
    lock.lock_file.mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        with lock.writing("test"):
            pass


@pytest.mark.slow  # a subprocess that imports torch and trains until interrupted: about 30 s on 2 busy cores
def test_ctrl_c_during_a_debug_launch_is_one_line_and_the_run_is_interrupted(tmp_path, synthetic_root):
    grid = write_grid(tmp_path, synthetic_root, {"runs": [{"seed": 1}]}, train={
        "max_steps": 500, "batch_size": 2, "num_points": 64, "warmup_steps": 1, "backbone_warmup_steps": 1,
        "checkpoint_every": 1, "tensorboard": False})
    proc = _study("launch", grid, "--cluster", "debug", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = RunDir(tmp_path / "runs" / "grid")
    deadline = time.time() + 120
    while not list(run.path.glob("*/checkpoints/last.pt")):  # training has begun and saved once
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted (Ctrl-C)" in _one_line(err)
    (folder,) = [p for p in run.path.iterdir() if p.name.startswith("s1-")]
    assert run_state(RunDir(folder), active=False) == "interrupted"  # what `study status` shows


def test_a_closed_pipe_ends_quietly(tmp_path):
    for i in range(3):
        RunDir(tmp_path / f"r{i}").path.mkdir()
        (tmp_path / f"r{i}" / "config.yaml").write_text("name: r\n")
    proc = _study("status", str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `study status | head` whose head has already exited
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err


def test_slurm_missing_is_one_line_and_a_slurm_dry_run_shows_its_sbatch_settings(tmp_path, synthetic_root,
                                                                                  monkeypatch, capsys):
    grid = write_grid(tmp_path, synthetic_root, {"runs": [{"seed": 1}]})
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert main(["launch", grid, "--cluster", "slurm", "--dry-run"]) == 2
    assert "no sbatch/srun on its PATH" in _one_line(capsys.readouterr().err)
    assert main(["launch", grid, "--cluster", "slurm"]) == 2
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    for tool in ("sbatch", "srun"):  # a machine with Slurm's commands (never called by a dry run)
        (empty / tool).write_text("#!/bin/sh\nexit 1\n")
        (empty / tool).chmod(0o755)
    capsys.readouterr()
    assert main(["launch", grid, "--cluster", "slurm", "--dry-run", "--set", "launch.partition=gpu",
                 "--set", "launch.timeout_min=30"]) == 0
    out = capsys.readouterr().out
    assert f"sbatch ({empty / 'sbatch'}):" in out and "slurm_partition=gpu" in out and "timeout_min=30" in out


def test_a_dry_run_reads_the_data_layout(tmp_path, synthetic_root, capsys):
    other = tmp_path / "ade"  # a data folder in another layout: ADE20K's, named as COCO panoptic
    (other / "images" / "training").mkdir(parents=True)
    (other / "annotations" / "training").mkdir(parents=True)
    grid = write_grid(tmp_path, synthetic_root, {"runs": [{"seed": 1}]})
    tree = yaml.safe_load(Path(grid).read_text())
    tree["data"].update(dataset="coco_panoptic", root=str(other))
    Path(grid).write_text(yaml.safe_dump(tree))
    assert main(["launch", grid, "--dry-run"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"data.root {other}: split 'train' of data.dataset=coco_panoptic cannot be read in its layout" in line


def test_export_refuses_missing_weights_a_folder_and_a_file_it_did_not_write(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  size: tiny\n  img_size: 32\n  num_classes: 3\n  num_queries: 4\n")
    out = tmp_path / "model.onnx"
    assert main(["export", str(config), str(out), "--no-verify"]) == 2
    assert "no trained weights: give --checkpoint PATH" in _one_line(capsys.readouterr().err)
    assert not out.exists()
    folder = tmp_path / "exports"
    folder.mkdir()
    assert main(["export", str(config), str(folder), "--no-verify", "--random-weights"]) == 2
    assert f"{folder} is a folder; give the file to write" in _one_line(capsys.readouterr().err)
    out.write_text("the user's own file")
    assert main(["export", str(config), str(out), "--no-verify", "--random-weights"]) == 2
    assert "that this suite did not write, and it is not replaced" in _one_line(capsys.readouterr().err)
    assert out.read_text() == "the user's own file"
