"""Faults, really caused: one writer per run folder (a second one is refused naming the holder), run states
that tell the truth after SIGKILL and SIGTERM, a diverged run that fails instead of finishing, orphaned
temporary files removed, damaged run files named, and a run killed while its checkpoint is being written,
relaunched by `study launch`, ending with the weights of an uninterrupted run (issue 12)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from study.cli import main
from study.config import save_config
from study.errors import UserError
from study.launch.collect import collect, run_state
from study.launch.grid import expand_grid
from study.launch.pipeline import run_config
from study.launch.submit import job_active
from study.runs import RunDir
from study.train.loop import Diverged, train
from conftest import REPO
from test_train_loop import TINY, study, synthetic_root, tiny_config, weights  # noqa: F401 (fixture)


def _wait_for(predicate, what: str, proc: subprocess.Popen | None = None, timeout: float = 180):
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _hold_lock(run: RunDir) -> subprocess.Popen:
    """Another process that holds the run's writer lock until killed."""
    code = (f"import sys, time; from study.runs import RunDir\n"
            f"with RunDir({str(run.path)!r}).writing('train'):\n"
            f"    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_dead_one_shows_interrupted(tmp_path, synthetic_root):
    cfg = tiny_config(synthetic_root, "train.max_steps=2")
    run = RunDir(tmp_path / "run")
    run.claim(cfg)
    run.write_status("running", step=1, total_steps=2)
    holder = _hold_lock(run)
    try:
        assert run.writer() == "held" and run_state(run) == "running"
        with pytest.raises(UserError, match=rf"run folder {run.path} is being written by host .*, pid {holder.pid} "):
            train(cfg, run)
        with pytest.raises(UserError, match=f"pid {holder.pid}"):  # the pipeline too, before writing anything
            run_config(cfg, ("train",), run)
        assert not run.failure_file.exists() and run.status()["state"] == "running"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run.writer() == "free"  # the kernel released the dead holder's lock
    assert run.status()["state"] == "running" and run_state(run) == "interrupted"
    assert train(cfg, run).status()["state"] == "finished"


def test_orphaned_temporary_files_are_removed_when_a_writer_starts(tmp_path):
    run = RunDir(tmp_path / "run")
    (run.path / "checkpoints").mkdir(parents=True)
    orphan = run.path / "checkpoints" / ".last.pt.k2j4.tmp"
    orphan.write_bytes(b"x" * 1000)
    other = run.path / "checkpoints" / "notes.tmp"  # not one of ours (no leading dot): kept
    other.write_text("mine")
    with run.writing("train"):
        assert not orphan.exists() and other.exists()
        orphan.write_bytes(b"y")  # a write in progress under the lock is not touched by a re-entry
        with run.writing("eval"):
            assert orphan.exists()


def test_every_job_a_run_ever_had_is_asked(tmp_path):
    """An older job still alive keeps the run active though the latest record names a dead one."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit"])
    try:
        run.write_launch_record(str(alive.pid), "local", ["train"], submitted="2026-01-01T00:00:00")
        run.write_launch_record("999999999", "local", ["train"], submitted="2026-01-01T00:00:01")
        assert [j["job_id"] for j in run.launch_jobs()] == [str(alive.pid), "999999999"]
        assert run.launch_record()["job_id"] == "999999999"
        assert job_active(run) is True
    finally:
        alive.kill()
        alive.wait()
    assert job_active(run) is False


def test_a_diverged_run_fails_naming_step_and_losses_and_is_never_evaluated(tmp_path, synthetic_root):
    cfg = tiny_config(synthetic_root, "train.max_steps=30", "train.checkpoint_every=1", "train.lr=1e9",
                      "train.warmup_steps=0", "train.backbone_warmup_steps=0")
    run = RunDir(tmp_path / "run")
    with pytest.raises(Diverged, match=r"non-finite loss at step (\d+) .*\(loss=(nan|inf).*loss_\w+=") as e:
        run_config(cfg, ("train", "eval"), run)
    step = int(str(e.value).split("at step ")[1].split()[0])
    assert run.status()["state"] == "failed" and "non-finite loss" in run.status()["error"]
    assert run.failure()["step"] == "train" and run_state(run) == "failed"
    assert "eval" not in run.metrics() and not run.final_weights.exists()
    # step 1's loss comes from the initial weights (finite); lr 1e9 breaks the model after that, so a good
    # checkpoint exists: the step before, all finite, and it stays
    assert step > 1
    ckpt = torch.load(run.last_checkpoint, weights_only=True)
    assert ckpt["step"] == step - 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_sigterm_saves_at_a_safe_point_and_marks_interrupted(tmp_path, synthetic_root):
    cfg = tiny_config(synthetic_root, "train.max_steps=400", "train.checkpoint_every=1000")
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_file)
    run = RunDir(tmp_path / "run")
    proc = subprocess.Popen(study("train", str(cfg_file), "--run-dir", str(run.path)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: run.csv_log.is_file() and len(run.csv_log.read_text().splitlines()) > 2,
              "two logged steps", proc)
    assert not run.last_checkpoint.exists()  # checkpoint_every is beyond the run: only SIGTERM saves
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    status = run.status()
    assert status["state"] == "interrupted" and status["reason"] == "SIGTERM"
    assert torch.load(run.last_checkpoint, weights_only=True)["step"] == status["step"] > 0
    assert run.writer() == "free" and run_state(run) == "interrupted"


def test_damaged_run_files_name_the_file_and_the_other_runs_go_on(tmp_path):
    good, bad = RunDir(tmp_path / "runs" / "a"), RunDir(tmp_path / "runs" / "b")
    for r in (good, bad):
        r.path.mkdir(parents=True)
        r.config.write_text("seed: 0\n")
        r.write_status("running", step=1, total_steps=2)
    bad.status_file.write_text('{"state": "runn')
    with pytest.raises(UserError, match=f"{bad.status_file} is damaged"):
        bad.status()
    table = collect(tmp_path / "runs").set_index("run")
    assert table.loc["a", "state"] == "interrupted"
    assert table.loc["b", "state"] == "damaged" and str(bad.status_file) in table.loc["b", "error"]


def test_dry_run_checks_the_files_a_run_names(tmp_path, synthetic_root, capsys):
    tree = yaml.safe_load(yaml.safe_dump(_tiny_tree(tmp_path, synthetic_root)))
    tree["grid"] = {"runs": [{"seed": 0}, {"model.pretrained": str(tmp_path / "no.pth")}]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert main(["launch", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"model.pretrained {tmp_path / 'no.pth'} is not an existing file" in err
    tree["grid"] = {"runs": [{"seed": 0}]}
    tree["data"]["root"] = str(tmp_path / "nowhere")
    path.write_text(yaml.safe_dump(tree))
    assert main(["launch", str(path), "--dry-run"]) == 2
    assert f"data.root {tmp_path / 'nowhere'} is not an existing folder" in capsys.readouterr().err
    tree["data"]["root"] = str(synthetic_root)
    tree["grid"] = {"runs": [{"model.init_from": str(tmp_path / "coco_run")}]}
    path.write_text(yaml.safe_dump(tree))
    assert main(["launch", str(path), "--dry-run"]) == 2
    assert f"model.init_from {tmp_path / 'coco_run'} is not an existing file or run folder" in capsys.readouterr().err
    (tmp_path / "coco_run").mkdir()
    assert main(["launch", str(path), "--dry-run"]) == 2  # a folder, but no trained run in it
    assert "is a folder but not a trained run: it has no checkpoints/model_final.pt" in capsys.readouterr().err
    final = tmp_path / "coco_run" / "checkpoints" / "model_final.pt"
    final.parent.mkdir()
    final.write_bytes(b"")  # a 0-byte weights file: opened, refused (it used to pass: it existed)
    assert main(["launch", str(path), "--dry-run"]) == 2
    assert f"model.init_from {tmp_path / 'coco_run'} does not load" in capsys.readouterr().err
    torch.save({"w": torch.zeros(2)}, final)
    assert main(["launch", str(path), "--dry-run"]) == 0


# ------------------------------------------------------------------- SIGKILL during a checkpoint write

# Loaded by every Python process started with this folder on PYTHONPATH (site.py imports sitecustomize):
# the N-th save of a training state writes half of it into its temporary file, says so, and hangs there,
# so that the test kills the process in the middle of a checkpoint write. Tests only; no hook in the code.
_HOOK = textwrap.dedent("""
    import os
    if os.environ.get("FAULT_HANG_AT_SAVE"):
        import io, pathlib, time, torch
        _real, _count = torch.save, [0]

        def _save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and "optimizer" in obj:
                _count[0] += 1
                if _count[0] == int(os.environ["FAULT_HANG_AT_SAVE"]):
                    buf = io.BytesIO()
                    _real(obj, buf)
                    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    f.flush()
                    pathlib.Path(os.environ["FAULT_MARK"]).write_text(f.name)
                    time.sleep(600)
            return _real(obj, f, *args, **kwargs)

        torch.save = _save
""")


def _tiny_tree(tmp_path, root) -> dict:
    from study.config import apply_overrides

    tree = apply_overrides({}, TINY + [f"data.root={root}", "train.max_steps=6", "train.checkpoint_every=2",
                                       "launch.steps=[train]"], {})
    tree["output_dir"] = str(tmp_path / "runs")
    return tree


def _hang_env(tmp_path, monkeypatch) -> Path:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK)
    mark = tmp_path / "hanging"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAULT_HANG_AT_SAVE", "2")  # the checkpoint of step 4 (every 2 steps)
    monkeypatch.setenv("FAULT_MARK", str(mark))
    return mark


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _killed_in_checkpoint_write(tmp_path, synthetic_root, monkeypatch, cluster: str):
    tree = _tiny_tree(tmp_path, synthetic_root)
    tree["grid"] = {"name": "g", "runs": [{"seed": 3}]}
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(tree))
    _, (r,) = expand_grid(grid)
    run = RunDir(r.folder)
    reference = train(r.config, RunDir(tmp_path / "reference"))  # uninterrupted, in this process

    mark = _hang_env(tmp_path, monkeypatch)
    if cluster == "local":  # the job is submitit's subprocess; launch.json names its pid
        assert main(["launch", str(grid), "--cluster", "local"]) == 0
        proc = None
        _wait_for(mark.is_file, "the hanging checkpoint write")
        job = run.launch_record()["job_id"]
        assert run.holder()["job_id"] == job  # the writer names its job (submitit's process runs it as a child)
        pid = run.holder()["pid"]
    else:  # a plain `study train` into the run's folder
        cfg_file = tmp_path / "cfg.yaml"
        save_config(r.config, cfg_file)
        proc = subprocess.Popen(study("train", str(cfg_file), "--run-dir", str(run.path)), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(mark.is_file, "the hanging checkpoint write", proc)
        pid = proc.pid
    monkeypatch.delenv("FAULT_HANG_AT_SAVE")
    tmp = Path(mark.read_text())
    assert tmp.parent == run.path / "checkpoints" and tmp.name.startswith(".last.pt.") and tmp.stat().st_size
    assert torch.load(run.last_checkpoint, weights_only=True)["step"] == 2  # the previous one, intact

    # while it hangs, it is running, and nobody else may write the folder
    assert run_state(run, active=job_active) == "running" and run.holder()["pid"] == pid
    with pytest.raises(UserError, match=f"pid {pid}"):
        train(r.config, run)
    jobs = len(run.launch_jobs())
    assert main(["launch", str(grid), "--cluster", cluster]) == 0  # its job is active: nothing submitted
    assert len(run.launch_jobs()) == jobs

    os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait()
    _wait_for(lambda: _gone(pid), "the killed process to end")
    _wait_for(lambda: not job_active(run), "its job to end")
    assert run.status()["state"] == "running" and run_state(run, active=job_active) == "interrupted"
    assert tmp.exists()  # what the killed write left

    assert main(["launch", str(grid), "--cluster", cluster, "--wait"]) == 0
    assert run_state(run, active=job_active) == "complete"
    assert not tmp.exists() and not list(run.path.rglob(".*.tmp"))
    a, b = weights(reference), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "relaunched run differs"
    return run


def test_killed_during_a_checkpoint_write_then_relaunched_matches_an_uninterrupted_run(
        tmp_path, synthetic_root, monkeypatch):
    """Fast variant: the run is a `study train` process; `study launch --cluster debug` relaunches it."""
    _killed_in_checkpoint_write(tmp_path, synthetic_root, monkeypatch, "debug")


@pytest.mark.slow
def test_a_local_job_killed_during_a_checkpoint_write_is_relaunched_by_study_launch(
        tmp_path, synthetic_root, monkeypatch):
    """The whole path: `study launch --cluster local` jobs, SIGKILL of the job named in launch.json in the
    middle of writing last.pt, relaunch; launch.json keeps both jobs."""
    run = _killed_in_checkpoint_write(tmp_path, synthetic_root, monkeypatch, "local")
    assert [j["cluster"] for j in run.launch_jobs()] == ["local", "local"]
