"""Grids, the end-to-end run callable, submitit launching (in-process and as local subprocesses), status and
the results table. Real Slurm is in the `cluster`-marked test at the end."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from study.cli import main
from study.config import ConfigError, load_config, to_dict
from study.errors import UserError
from study.launch.collect import collect, run_state
from study.launch.grid import expand_grid
from study.launch.pipeline import RunJob
from study.launch.submit import job_active
from study.runs import RunDir
from conftest import REPO

# A tiny run on the built-in synthetic set: a few optimiser steps, a few images scored, GFLOPs without FPS.
TINY = {
    "name": "tiny", "task": "panoptic",
    "model": {"size": "tiny", "img_size": 64, "num_classes": 6, "num_queries": 8},
    "data": {"dataset": "synthetic", "synthetic_image_size": 64, "synthetic_train_images": 8,
             "synthetic_val_images": 3, "batch_size": 2},
    "train": {"max_steps": 3, "batch_size": 2, "num_points": 256, "warmup_steps": 1, "backbone_warmup_steps": 1,
              "checkpoint_every": 2, "tensorboard": False},
    "bench": {"fps": False},
}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def write_grid(tmp_path, synthetic_root, grid: dict, **top) -> str:
    tree = json.loads(json.dumps(TINY))
    tree["data"]["root"] = synthetic_root
    tree["output_dir"] = str(tmp_path / "runs")
    tree.update(top)
    tree["grid"] = grid
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


# ------------------------------------------------------------------------------------------- grid files


def test_axes_and_explicit_runs_expand_in_order(tmp_path, synthetic_root):
    path = write_grid(tmp_path, synthetic_root, {"name": "g", "axes": {"model.variant": ["eomt", "eomt_masked"],
                                                                       "seed": [0, 1]},
                                                 "runs": [{"model.variant": "single_scale", "train.lr": 0.001}]})
    name, runs = expand_grid(path, ["train.max_steps=5"])
    assert name == "g" and len(runs) == 5
    assert [(r.config.model.variant, r.config.seed) for r in runs[:4]] == [
        ("eomt", 0), ("eomt", 1), ("eomt_masked", 0), ("eomt_masked", 1)]
    assert runs[4].config.model.variant == "single_scale" and runs[4].config.train.lr == 0.001
    assert all(r.config.train.max_steps == 5 for r in runs)  # --set applies to every run
    assert len({r.folder for r in runs}) == 5
    assert all(r.folder.parent == tmp_path / "runs" / "g" for r in runs)  # runs/<grid>/<name>-<hash>


def test_an_axis_of_mappings_changes_keys_together(tmp_path, synthetic_root):
    path = write_grid(tmp_path, synthetic_root, {"axes": {
        "size": [{"model.size": "tiny", "model.num_queries": 4}, {"model.size": "S", "model.num_queries": 9}],
        "model.variant": ["eomt", "eomt_masked"]}})
    _, runs = expand_grid(path)
    assert [(r.config.model.size, r.config.model.num_queries, r.config.model.variant) for r in runs] == [
        ("tiny", 4, "eomt"), ("tiny", 4, "eomt_masked"), ("S", 9, "eomt"), ("S", 9, "eomt_masked")]


def test_an_axis_over_a_mapping_setting_lists_values(tmp_path, synthetic_root):
    path = write_grid(tmp_path, synthetic_root, {"axes": {"model.baseline": [{"encoder_layers": 2}, {}]}},
                      model={**TINY["model"], "variant": "sfp_m2f"})
    _, runs = expand_grid(path)
    assert [r.config.model.baseline for r in runs] == [{"encoder_layers": 2}, {}]


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_file_is_valid(path):
    """The shipped configurations and grids (the paper's tables) expand and validate."""
    if "grid" in yaml.safe_load(path.read_text()):
        _, runs = expand_grid(path)
        assert runs and len({r.folder for r in runs}) == len(runs)
    else:
        load_config(path)


@pytest.mark.parametrize("grid, message", [
    (None, "has no 'grid:' section"),
    ({"axis": {"seed": [1]}}, "unknown key(s) ['axis'] in the 'grid' section"),
    ({"axes": {"seed": 3}}, "grid.axes.seed in"),
    ({"axes": {}}, "has no runs"),
    ({"axes": {"model.variant": ["eomt", "eomt_huge"]}}, "run 1 (model.variant=eomt_huge)"),
    ({"axes": {"model.sise": ["S"]}}, "unknown config key 'model.sise'"),
    ({"runs": [{"seed": 1}, {"seed": 1}]}, "runs 0 and 1 (seed=1) are the same configuration"),
])
def test_bad_grid_one_clear_error(tmp_path, synthetic_root, grid, message, capsys):
    path = write_grid(tmp_path, synthetic_root, grid)
    if grid is None:
        tree = yaml.safe_load(open(path))
        tree.pop("grid")
        open(path, "w").write(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=None) as e:
        expand_grid(path)
    assert message in str(e.value)
    assert main(["launch", path, "--dry-run"]) == 2  # the CLI prints it as one line
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------ running and skipping


def test_debug_launch_runs_every_step_then_skips(tmp_path, synthetic_root, capsys):
    path = write_grid(tmp_path, synthetic_root, {"axes": {"model.variant": ["eomt", "sfp_no_pixel_decoder"]}})
    assert main(["launch", path, "--cluster", "debug", "--wait"]) == 0
    _, runs = expand_grid(path, ["launch.cluster=debug"])
    for r in runs:
        run = RunDir(r.folder)
        assert run_state(run) == "complete" and run.pending_steps() == []
        metrics = run.metrics()
        assert metrics["train"]["steps"] == 3
        assert metrics["eval"]["task"] == "panoptic" and metrics["eval"]["num_images"] == 3
        assert "per_class" not in metrics["eval"]  # per-class numbers live in the eval file
        assert "per_class" in json.loads((run.path / "eval_panoptic_val.json").read_text())
        assert metrics["bench"]["params"] > 0 and metrics["bench"]["gflops"] > 0
        assert json.loads((run.path / "launch.json").read_text())["cluster"] == "debug"
    mtimes = [RunDir(r.folder).metrics_file.stat().st_mtime_ns for r in runs]
    capsys.readouterr()
    assert main(["launch", path, "--cluster", "debug", "--wait"]) == 0  # launching again: nothing to do
    assert "2 skip" in capsys.readouterr().out
    assert [RunDir(r.folder).metrics_file.stat().st_mtime_ns for r in runs] == mtimes

    table = collect(tmp_path / "runs")
    assert sorted(table["model.variant"]) == ["eomt", "sfp_no_pixel_decoder"]
    assert set(table["state"]) == {"complete"}
    for _, row in table.iterrows():  # headline numbers in percent, straight from metrics.json
        assert row["PQ"] == pytest.approx(100 * row["metrics.eval.All.pq"])
        assert row["GFLOPs"] == row["metrics.bench.gflops"] and row["params_M"] == row["metrics.bench.params"] / 1e6
        assert row["train.device"] == "auto" and row["metrics.train.device"] == "cpu"  # config vs measured
    assert main(["collect", str(tmp_path / "runs" / "grid")]) == 0
    assert (tmp_path / "runs" / "grid" / "results.csv").read_text().startswith("run,")
    assert main(["status", path, "--set", "launch.cluster=debug"]) == 0
    assert "2 complete" in capsys.readouterr().out


def test_debug_runs_here_without_wait_and_a_failure_does_not_stop_the_next(tmp_path, synthetic_root, capsys):
    path = write_grid(tmp_path, synthetic_root, {"runs": [{"model.num_classes": 9}, {"seed": 4}]})
    assert main(["launch", path, "--cluster", "debug", "--steps", "train"]) == 1  # no --wait: still run here
    out = capsys.readouterr().out
    assert "failed here" in out and "ran here" in out and "UserError: model.num_classes=9" in out
    assert sorted(collect(tmp_path / "runs")["state"]) == ["complete", "failed"]


def test_a_job_that_died_silently_is_interrupted_and_resumed(tmp_path, synthetic_root):
    """SIGKILL, the OOM killer or scancel leave status.json at 'running': without a live job the run is
    'interrupted' (or 'lost' with nothing written) and launching resumes it."""
    path = write_grid(tmp_path, synthetic_root, {"runs": [{"seed": 6}]})
    _, (r,) = expand_grid(path)
    run = RunDir(r.folder)
    run.claim(r.config)
    (run.path / "launch.json").write_text(json.dumps({"cluster": "local", "job_id": "999999999", "steps": ["train"],
                                                      "submitted": "2026-01-01T00:00:00"}))
    assert run_state(run, active=job_active) == "lost"  # its (made-up) process does not exist, nothing written
    assert run_state(run) == "submitted"  # without asking about the job, the files alone say no more
    run.write_status("running", step=1, total_steps=3)
    assert run_state(run, active=job_active) == "interrupted"
    # the writer's lock decides: nothing holds it, so the files' "running" is a dead run (or, while its job
    # lives, a requeued one waiting to start); holding it makes the run running
    assert run_state(run) == "interrupted" and run_state(run, active=True) == "submitted"
    with run.writing("train"):
        assert run_state(run) == "running" and run_state(run, active=False) == "running"
    # a failure record older than the latest submission belongs to an earlier attempt
    (run.path / "failure.json").write_text(json.dumps({"step": "train", "error": "old", "time": "2025-12-31T00:00:00"}))
    assert run_state(run, active=False) == "interrupted"
    assert main(["launch", path, "--cluster", "debug", "--steps", "train"]) == 0
    assert run_state(run) == "complete"


def test_squeue_trouble_is_an_error_not_a_finished_job(tmp_path, monkeypatch):
    import study.launch.submit as submit_module

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / "launch.json").write_text(json.dumps({"cluster": "slurm", "job_id": "42"}))

    def squeue(stderr, code=1, stdout=""):
        return lambda *a, **k: subprocess.CompletedProcess(a, code, stdout=stdout, stderr=stderr)

    monkeypatch.setattr(submit_module.subprocess, "run", squeue("slurm_load_jobs error: Invalid job id specified"))
    assert job_active(run) is False
    monkeypatch.setattr(submit_module.subprocess, "run", squeue("Unable to contact slurm controller"))
    with pytest.raises(UserError, match="cannot tell whether Slurm job 42 .* still runs"):
        job_active(run)
    monkeypatch.setattr(submit_module.subprocess, "run", squeue("", 0, "PENDING\nCOMPLETED\n"))
    assert job_active(run) is True


def test_an_evaluation_left_undone_is_finished_without_retraining(tmp_path, synthetic_root):
    path = write_grid(tmp_path, synthetic_root, {"runs": [{"seed": 3}]})
    _, (r,) = expand_grid(path)
    RunJob()(to_dict(r.config), ("train",))  # what a job calls, here directly: training only
    run = RunDir(r.folder)
    assert run_state(run) == "trained" and run.pending_steps() == ["eval", "bench"]
    weights = run.final_weights.stat().st_mtime_ns
    assert main(["launch", path, "--cluster", "debug", "--wait", "--steps", "train,eval"]) == 0
    assert run.final_weights.stat().st_mtime_ns == weights  # not trained again
    assert "eval" in run.metrics() and "bench" not in run.metrics()


def test_new_eval_or_bench_settings_redo_only_those_steps(tmp_path, synthetic_root, capsys):
    path = write_grid(tmp_path, synthetic_root, {"runs": [{"seed": 7}]})
    assert main(["launch", path, "--cluster", "debug"]) == 0
    _, (r,) = expand_grid(path)
    run = RunDir(r.folder)
    weights = run.final_weights.stat().st_mtime_ns
    assert run.metrics()["eval"]["num_images"] == 3
    _, (again,) = expand_grid(path, ["eval.max_images=2"])
    assert again.folder == r.folder  # evaluation settings are not part of the run's identity
    assert main(["launch", path, "--cluster", "debug", "--set", "eval.max_images=2"]) == 0
    assert "resume" in capsys.readouterr().out
    assert run.final_weights.stat().st_mtime_ns == weights  # not trained again
    assert run.metrics()["eval"]["num_images"] == 2 and run.metrics()["eval"]["settings"]["max_images"] == 2
    assert run_state(run) == "complete"
    assert main(["launch", path, "--cluster", "debug", "--set", "eval.max_images=2"]) == 0
    assert "1 skip" in capsys.readouterr().out


def test_local_executor_runs_a_job_in_a_subprocess(tmp_path, synthetic_root):
    path = write_grid(tmp_path, synthetic_root, {"runs": [{"seed": 1}]})
    assert main(["launch", path, "--cluster", "local", "--wait", "--steps", "train,bench"]) == 0
    _, (r,) = expand_grid(path)
    run = RunDir(r.folder)
    record = json.loads((run.path / "launch.json").read_text())
    assert record["cluster"] == "local" and record["job_id"].isdigit()  # a process id, not in-process
    assert run.status()["state"] == "finished" and "bench" in run.metrics()


def test_a_run_whose_job_is_still_running_is_not_submitted_twice(tmp_path, synthetic_root, capsys):
    path = write_grid(tmp_path, synthetic_root, {"runs": [{"seed": 2}]})
    assert main(["launch", path, "--cluster", "local"]) == 0  # no --wait: the job runs in the background
    _, (r,) = expand_grid(path)
    run = RunDir(r.folder)
    assert job_active(run)
    capsys.readouterr()
    assert main(["launch", path, "--cluster", "local"]) == 0
    assert "1 active" in capsys.readouterr().out
    deadline = time.time() + 300
    while job_active(run) and time.time() < deadline:
        time.sleep(0.5)
    assert run_state(run) == "complete"


def test_two_task_job_trains_with_ddp(tmp_path, synthetic_root):
    """tasks_per_node=2: submitit starts two processes that join torch.distributed (gloo on the CPU) from
    submitit's environment; only rank 0 evaluates and benchmarks."""
    path = write_grid(tmp_path, synthetic_root, {"runs": [{"data.batch_size": 1}]})
    assert main(["launch", path, "--cluster", "local", "--wait", "--set", "launch.tasks_per_node=2"]) == 0
    _, (r,) = expand_grid(path, ["launch.tasks_per_node=2"])
    metrics = RunDir(r.folder).metrics()
    assert metrics["train"]["world_size"] == 2 and metrics["train"]["steps"] == 3
    assert "eval" in metrics and "bench" in metrics


def test_failed_job_is_reported_and_the_others_run(tmp_path, synthetic_root, capsys):
    # the second run asks for more classes than the data set has: its job fails, the first one completes
    path = write_grid(tmp_path, synthetic_root, {"runs": [{"seed": 0}, {"model.num_classes": 9}]})
    assert main(["launch", path, "--cluster", "debug", "--wait", "--steps", "train"]) == 1
    out = capsys.readouterr().out
    assert "model.num_classes=9 but the synthetic data set has 6 classes" in out and "1 run(s) failed" in out
    assert "UserError: model.num_classes=9" in out  # the run's own error, not the path of a log
    states = sorted(collect(tmp_path / "runs")["state"])
    assert states == ["complete", "failed"]


def test_dry_run_submits_nothing(tmp_path, synthetic_root, capsys):
    path = write_grid(tmp_path, synthetic_root, {"axes": {"seed": [0, 1]}})
    assert main(["launch", path, "--dry-run"]) == 0
    assert "2 submit" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------- real Slurm


@pytest.mark.cluster
def test_slurm_job_array_completes(tmp_path, synthetic_root, capsys):
    """Needs a running Slurm cluster with accounting (see README, "On a Slurm cluster"); run with
    `pytest -m cluster`. The folders must be on a file system the compute nodes share."""
    if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        pytest.skip("no reachable Slurm cluster (sbatch/sinfo)")
    path = write_grid(tmp_path, synthetic_root, {"axes": {"seed": [0, 1]}})
    assert main(["launch", path, "--cluster", "slurm", "--wait", "--set", "launch.timeout_min=10",
                 "--set", "launch.mem_gb=2", "--set", "launch.cpus_per_task=1"]) == 0
    table = collect(tmp_path / "runs")
    assert list(table["state"]) == ["complete", "complete"]
    assert all(str(j).split("_")[0].isdigit() for j in table["job_id"])  # Slurm array job ids
    # a queued job is seen through squeue: launching again does not submit its run a second time
    more = write_grid(tmp_path, synthetic_root, {"axes": {"seed": [5]}})
    assert main(["launch", more, "--cluster", "slurm", "--set", "launch.mem_gb=2"]) == 0
    _, (r,) = expand_grid(more, ["launch.cluster=slurm", "launch.mem_gb=2"])
    assert job_active(RunDir(r.folder))
    capsys.readouterr()
    assert main(["launch", more, "--cluster", "slurm", "--set", "launch.mem_gb=2"]) == 0
    assert "1 active" in capsys.readouterr().out
    deadline = time.time() + 300
    while job_active(RunDir(r.folder)) and time.time() < deadline:
        time.sleep(1)
    assert run_state(RunDir(r.folder)) == "complete"


# ------------------------------------------------------------------------- inside a submitit job (simulated)

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _in_local_job(monkeypatch, tasks: int, rank: int, visible: str = "2,3"):
    """The variables submitit 1.5.4's local executor gives task ``rank`` of a job (submitit/local/local.py)."""
    for k in _LAUNCHER_VARS + ("_TEST_CLUSTER_", "SUBMITIT_DEBUG_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": str(tasks),
                 "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
                 "SUBMITIT_LOCAL_GLOBALID": str(rank), "SUBMITIT_LOCAL_LOCALID": str(rank),
                 "CUDA_VISIBLE_DEVICES": visible}.items():
        monkeypatch.setenv(k, v)


def test_a_task_of_a_submitit_job_joins_torch_distributed_and_keeps_the_jobs_gpus(monkeypatch):
    import os

    import torch

    from study.device import resolve_process_device
    from study.launch.pipeline import join_submitit_job

    _in_local_job(monkeypatch, tasks=2, rank=1)
    assert join_submitit_job() == 2
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")] == ["1", "2", "1", "2"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"  # not narrowed to physical GPU 1 (another job's)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # what CUDA_VISIBLE_DEVICES=2,3 shows
    assert resolve_process_device("auto") == torch.device("cuda", 1)  # the job's second GPU, physical 3


def test_only_the_not_in_a_job_case_is_ignored(monkeypatch, tmp_path, synthetic_root):
    """Outside a submitit job the call goes on; any other trouble in the job's environment is raised: a
    swallowed error would make each task of a DDP job a world-size-1 run of its own, all writing one folder."""
    import submitit

    from study.launch.pipeline import join_submitit_job

    for k in ("SUBMITIT_EXECUTOR", "SUBMITIT_DEBUG_JOB_ID", "_TEST_CLUSTER_"):
        monkeypatch.delenv(k, raising=False)
    assert join_submitit_job() is None  # a direct call: submitit says no environment is active
    _in_local_job(monkeypatch, tasks=2, rank=0)
    monkeypatch.setenv("RANK", "0")  # set by someone else already: submitit refuses to export
    path = write_grid(tmp_path, synthetic_root, {"runs": [{"seed": 9}]})
    _, (r,) = expand_grid(path)
    with pytest.raises(RuntimeError, match="RANK is already set"):
        RunJob()(to_dict(r.config), ("train",))
    assert not r.folder.exists()  # nothing ran
    monkeypatch.delenv("RANK")

    def broken():
        raise RuntimeError("some other failure")

    monkeypatch.setattr(submitit, "JobEnvironment", broken)
    with pytest.raises(RuntimeError, match="some other failure"):
        join_submitit_job()


# -------------------------------------------------------------------------------- GPUs of local jobs

def _gpus(monkeypatch, count: int, visible: str | None = None):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def test_local_gpu_plan_gives_each_job_its_own_gpus(monkeypatch):
    from study.errors import UserError
    from study.launch.submit import local_gpu_plan, visible_gpus

    _gpus(monkeypatch, 4)
    assert visible_gpus() == ["0", "1", "2", "3"]
    assert local_gpu_plan(2, 2, visible_gpus()) == [(("0", "1"), [0]), (("2", "3"), [1])]
    # five runs of one GPU each on four GPUs: four jobs, the fifth run queued after the first
    assert local_gpu_plan(5, 1, visible_gpus()) == [(("0",), [0, 4]), (("1",), [1]), (("2",), [2]), (("3",), [3])]
    _gpus(monkeypatch, 2, "4,6")  # this process sees physical GPUs 4 and 6 only
    assert local_gpu_plan(3, 1, visible_gpus()) == [(("4",), [0, 2]), (("6",), [1])]
    with pytest.raises(UserError, match="launch.gpus_per_node=3 but this machine shows 2 GPU"):
        local_gpu_plan(1, 3, visible_gpus())
    with pytest.warns(UserWarning, match="2 GPU.*launch.gpus_per_node is 0: the local jobs run on the CPU"):
        assert local_gpu_plan(2, 0, visible_gpus()) == [((), [0]), ((), [1])]
    _gpus(monkeypatch, 0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no GPU, no warning
        assert local_gpu_plan(1, 0, visible_gpus()) == [((), [0])]


def test_local_launch_shows_each_job_exactly_its_gpus(tmp_path, synthetic_root, monkeypatch):
    """What submitit's local executor would start for each job (its start_controller, replaced here so that
    nothing runs): the job's CUDA_VISIBLE_DEVICES, and which runs it executes."""
    import pickle
    import subprocess as sp

    import submitit.local.local as local

    from study.launch.submit import launch

    started = []

    def start_controller(folder, command, tasks_per_node=1, cuda_devices="", setup=(), **kw):
        started.append({"cuda": cuda_devices, "setup": list(setup), "tasks": tasks_per_node})
        return sp.Popen(["true"])

    monkeypatch.setattr(local, "start_controller", start_controller)
    _gpus(monkeypatch, 3, "5,6,7")
    path = write_grid(tmp_path, synthetic_root, {"axes": {"seed": [0, 1, 2]}})
    _, runs = expand_grid(path, ["launch.gpus_per_node=1"])
    out = launch(runs, tmp_path / "runs" / "grid", ("train",), progress=lambda *a: None)
    assert sorted(s["setup"][0] for s in started) == [f"export CUDA_VISIBLE_DEVICES={g}" for g in "567"]
    assert all(s["tasks"] == 1 for s in started)
    assert len({s.job.job_id for s in out}) == 3

    started.clear()
    _, runs = expand_grid(path, ["launch.gpus_per_node=2", "train.max_steps=4"])
    _gpus(monkeypatch, 4, "GPU-a,GPU-b,GPU-c,GPU-d")  # UUIDs as well
    out = launch(runs, tmp_path / "runs" / "grid", ("train",), progress=lambda *a: None)
    assert [s["setup"] for s in started] == [["export CUDA_VISIBLE_DEVICES=GPU-a,GPU-b"],
                                             ["export CUDA_VISIBLE_DEVICES=GPU-c,GPU-d"]]
    assert all(s["tasks"] == 2 for s in started)  # one process per GPU
    first = [s for s in out if s.position is not None]
    assert [s.position for s in first] == [0, 1] and first[0].job is first[1].job  # runs 0 and 2 queue in a job
    assert RunDir(first[0].run.folder).launch_record()["job_id"] == RunDir(first[1].run.folder).launch_record()["job_id"]
    job_id = first[0].job.job_id
    with open(tmp_path / "runs" / "grid" / ".submitit" / job_id / f"{job_id}_submitted.pkl", "rb") as f:
        queued = pickle.load(f)  # the job's call: RunQueue over the configurations of runs 0 and 2
    assert type(queued.function).__name__ == "RunQueue"
    assert [c["seed"] for c in queued.args[0]] == [0, 2]


def test_a_real_local_job_sees_the_gpus_it_was_given(tmp_path):
    """A submitit local job (a subprocess) started by executor_for: its CUDA_VISIBLE_DEVICES is the job's GPUs
    (names passed through as given), whatever GPUs this machine has."""
    from study.launch.config import LaunchConfig
    from study.launch.submit import executor_for

    executor = executor_for(LaunchConfig(cluster="local", gpus_per_node=2, timeout_min=5), tmp_path, "probe",
                            ("3", "GPU-x"))
    job = executor.submit(subprocess.check_output, ["printenv", "CUDA_VISIBLE_DEVICES"], text=True)
    assert job.results() == ["3,GPU-x\n", "3,GPU-x\n"]  # two tasks (one per GPU), one view
