"""Run states of issue 28 and issue 25 item 4, derived once (study/launch/collect.py run_state): a run that
failed before step 1 is failed, events ordered by sequence number (not clocks), damaged or partial runs shown as
damaged rows that never stop the table or the launch, a run whose final weights are gone is "weights missing"
and trains again; and issue 25 item 2: a relaunch with one timing setting changed re-runs its bench step alone."""
from __future__ import annotations

import pytest

import json
import time
from dataclasses import fields, replace

import torch

from study.bench.config import BenchConfig, timing_settings
from study.cli import main
from study.launch import pipeline
from study.launch.collect import collect, run_state
from study.launch.grid import expand_grid
from study.launch.pipeline import run_config
from study.config import to_dict
from study.errors import UserError
from study.runs import BENCH_SETTINGS, RunDir, step_settings
from test_launch import synthetic_root, write_grid  # noqa: F401 (fixture)


# One optimiser step: the tests below need a trained run only where training itself is what they check.
ONE_STEP = {"max_steps": 1, "batch_size": 2, "num_points": 64, "warmup_steps": 1, "backbone_warmup_steps": 1,
            "checkpoint_every": 1, "tensorboard": False}


def _finished(tmp_path, synthetic_root):
    """A tiny grid run whose folder records train, eval and bench as done with its own settings (written here,
    not computed: the tests check what is (re)run, not the numbers)."""
    grid = write_grid(tmp_path, synthetic_root, {"runs": [{"seed": 1}]}, train=ONE_STEP)
    _, (r,) = expand_grid(grid)
    run = RunDir(r.folder)
    run.claim(r.config)
    run.write_status("finished", step=1, total_steps=1)
    run.final_weights.parent.mkdir(parents=True)
    torch.save({}, run.final_weights)
    config = to_dict(r.config)
    run.write_evaluation({"task": "panoptic", "split": "val", "All": {"pq": 0.5}, "Things": {"pq": 0.4},
                          "Stuff": {"pq": 0.6}, "settings": step_settings("eval", config)})
    run.update_metrics(train={"steps": 1}, bench={"params": 10, "gflops": 1.0,
                                                  "settings": step_settings("bench", config)})
    assert run.pending_steps() == [] and run_state(run, active=False) == "complete"
    return grid, r, run


def test_a_run_that_fails_before_step_1_is_failed_not_pending(tmp_path, capsys):
    empty = tmp_path / "coco"  # a COCO panoptic root without its files: the trainer's setup fails
    empty.mkdir()
    code = main(["train", "--set", "model.size=tiny", "--set", "model.img_size=64", "--set", "data.dataset=coco_panoptic",
                 "--set", f"data.root={empty}", "--set", f"output_dir={tmp_path / 'runs'}", "--set", "name=setup"])
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    (run,) = [RunDir(p) for p in (tmp_path / "runs").iterdir()]
    assert run_state(run) == "failed"
    table = collect(tmp_path / "runs")
    assert list(table["state"]) == ["failed"] and str(empty) in table["error"][0]


def test_an_attempt_that_succeeds_clears_an_earlier_failure_and_a_failing_one_records_its_own(tmp_path):
    """`study train` failing once (a data error), then run again successfully, is not failed for good."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / "config.yaml").write_text("name: x\n")
    with pytest.raises(RuntimeError):
        with run.writing("train"):
            raise RuntimeError("out of memory")
    assert "out of memory" in run.failure()["error"]
    with run.writing("train"):
        run.write_status("finished", step=3, total_steps=3)
    assert run.failure() == {} and not run.failure_file.exists()
    with pytest.raises(ValueError):
        with run.writing("eval"):
            raise ValueError("bad eval")
    assert "bad eval" in run.failure()["error"]  # this attempt's own failure stays


def test_events_are_ordered_by_sequence_number_not_by_clocks(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / "config.yaml").write_text("name: x\n")
    skewed = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 600))  # the login node runs ahead
    run.write_launch_record("inline-1", "debug", ["train", "eval"], submitted=skewed)
    run.write_status("finished", step=3, total_steps=3)
    run.write_failure("eval", "RuntimeError: boom")  # the job's failure, after the submission, on a slower clock
    assert run.failure()["error"] == "RuntimeError: boom"
    assert run_state(run, active=False) == "failed"
    run.write_launch_record("inline-2", "debug", ["train", "eval"], submitted="2000-01-01T00:00:00")
    assert run.failure() == {}  # a newer submission: the old failure no longer counts, whatever its time says


def test_damaged_and_partial_runs_are_rows_and_never_stop_the_table(tmp_path, synthetic_root, capsys):
    grid, r, run = _finished(tmp_path, synthetic_root)
    root = run.path.parent
    def copy(name: str) -> RunDir:
        other = RunDir(root / name)
        other.path.mkdir()
        for f in ("config.yaml", "status.json", "metrics.json"):
            (other.path / f).write_bytes((run.path / f).read_bytes())
        return other
    no_config, no_all, bad_status = copy("noconfig-00000001"), copy("noall-00000002"), copy("badstatus-00000003")
    no_config.config.unlink()
    metrics = run.metrics()
    no_all.metrics_file.write_text(json.dumps({**metrics, "eval": {"task": "panoptic", "Things": {"pq": 0.1}}}))
    bad_status.status_file.write_text('{"state": "fini')
    table = collect(tmp_path / "runs").set_index("run")
    assert len(table) == 4 and table.loc[run.path.name, "state"] != "damaged"
    for damaged, file in ((no_config, "config.yaml"), (no_all, "metrics.json"), (bad_status, "status.json")):
        assert table.loc[damaged.path.name, "state"] == "damaged"
        assert file in table.loc[damaged.path.name, "error"]
    assert main(["status", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "3 damaged" in out and "'All'" in out


def test_one_damaged_run_never_stops_the_launch(tmp_path, synthetic_root, capsys):
    grid = write_grid(tmp_path, synthetic_root, {"axes": {"seed": [1, 2]}}, train=ONE_STEP)
    _, (a, b) = expand_grid(grid)
    RunDir(a.folder).claim(a.config)
    RunDir(a.folder).status_file.write_text("{damaged")
    for dry in (["--dry-run"], []):
        capsys.readouterr()
        assert main(["launch", grid, "--cluster", "debug", "--steps", "train", *dry]) == 1
        out = capsys.readouterr().out
        assert "damaged" in out and "status.json" in out
        assert ("1 submit" in out) if dry else ("ran here" in out)
    assert run_state(RunDir(b.folder)) == "complete"  # the other run was trained


def test_a_run_whose_final_weights_are_gone_trains_again(tmp_path, synthetic_root, capsys):
    grid, r, run = _finished(tmp_path, synthetic_root)
    run.last_checkpoint.write_bytes(b"the last checkpoint, at the final step")
    run.final_weights.unlink()
    assert run_state(run, active=False) == "weights missing"
    # an evaluation that needs the weights, without training: refused, saying exactly how
    assert main(["launch", grid, "--cluster", "debug", "--steps", "eval", "--set", "eval.max_images=1"]) == 1
    assert "--steps train,eval" in capsys.readouterr().out
    from study.train.loop import train  # `study train` of the run: says how, never "finished already"

    with pytest.raises(UserError, match="final weights .* are gone.*--steps train,eval"):
        train(r.config, run)
    assert main(["launch", grid, "--cluster", "debug", "--steps", "train"]) == 0
    assert run.final_weights.is_file() and [p.name for p in run.path.glob("checkpoints/last.pt.before-retrain-*")]
    # the evaluation of the lost weights is set aside with them, never reported beside the new weights
    assert run.pending_steps() == ["eval"] and "eval" not in run.metrics()
    (aside,) = run.path.glob("metrics.before-retrain-*.json")
    assert json.loads(aside.read_text())["eval"]["All"]["pq"] == 0.5
    assert main(["launch", grid, "--cluster", "debug", "--steps", "train,eval", "--set", "eval.max_images=1"]) == 0
    assert run_state(run, active=False) == "complete" and run.metrics()["eval"]["All"]["pq"] != 0.5


# A changed value for every timing setting of the bench section; the test below fails when a setting is added
# to BenchConfig without one here, so that each setting's relaunch is checked.
_CHANGED = {"fps": True, "counter": "fvcore", "device": "cpu", "precision": "fp32", "compile": True,
            "compile_mode": "max-autotune", "freezing": True, "warmup": 1, "iters": 2, "min_time": 0.5, "batch": 2,
            "threads": 1, "scope": "end_to_end", "breakdown": False, "runtime": "onnxruntime"}


def test_one_changed_timing_setting_re_runs_the_bench_step_and_nothing_else(tmp_path, synthetic_root):
    assert set(BENCH_SETTINGS) == set(timing_settings()) == set(_CHANGED)
    only_study_bench = {"variants", "sizes", "img_size", "modes", "reference", "limit"}  # not the pipeline's
    assert set(timing_settings()) | only_study_bench == {f.name for f in fields(BenchConfig)}
    _, r, run = _finished(tmp_path, synthetic_root)
    for key, value in (("modes", ["eager"]), ("limit", not r.config.bench.limit)):  # `study bench` alone reads
        cfg = replace(r.config, bench=replace(r.config.bench, **{key: value}))   # these: nothing is re-timed
        assert run.pending_steps(cfg=cfg) == [], key
    for key, value in _CHANGED.items():
        cfg = replace(r.config, bench=replace(r.config.bench, **{key: value}))
        assert getattr(cfg.bench, key) != getattr(r.config.bench, key)
        assert run.pending_steps(cfg=cfg) == ["bench"], key
    before = {f: (run.path / f).read_bytes() for f in ("status.json", "eval_panoptic_val.json")}
    weights, metrics = run.final_weights.stat().st_mtime_ns, run.metrics()
    frozen = replace(r.config, bench=replace(r.config.bench, freezing=True))
    run_config(frozen, ("train", "eval", "bench"))
    after = run.metrics()
    assert after["bench"]["settings"]["freezing"] is True and after["eval"] == metrics["eval"]
    assert after["train"] == metrics["train"] and run.final_weights.stat().st_mtime_ns == weights
    assert {f: (run.path / f).read_bytes() for f in before} == before


def test_the_bench_step_states_its_threads_and_flags_a_busy_machine(tmp_path, synthetic_root, monkeypatch):
    _, r, run = _finished(tmp_path, synthetic_root)
    cfg = replace(r.config, bench=replace(r.config.bench, fps=True, warmup=1, iters=2, limit=False, breakdown=False))
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "12345")  # inside a local job of a grid
    monkeypatch.setattr(pipeline.os, "getloadavg", lambda: (64.0, 64.0, 64.0))  # the grid's other jobs
    row = pipeline._bench(cfg)
    assert row["threads"] == 1 and "local job" in row["threads_why"]
    assert row["load_before"] == 64.0 and row["fps_trusted"] is False and "cannot be trusted" in row["fps_warning"]
    monkeypatch.delenv("SUBMITIT_LOCAL_JOB_ID")
    monkeypatch.setattr(pipeline.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    quiet = pipeline._bench(replace(cfg, bench=replace(cfg.bench, threads=1)))
    assert quiet["threads"] == 1 and quiet["threads_why"] == "bench.threads" and quiet["fps_trusted"] is True
    run.update_metrics(bench={**row, "settings": {}})
    assert collect(run.path)["FPS_trusted"].tolist() == [False]


def test_a_setting_added_since_a_result_was_recorded_counts_as_its_default():
    """A run benchmarked before `bench.freezing` existed was not frozen: with freezing at its default (off) it
    is done; asking for freezing re-times it. A recorded setting that is no longer the step's is ignored."""
    from study.config import load_config, to_dict
    from study.runs import same_settings

    config = to_dict(load_config(None, []))
    old = step_settings("bench", config)
    del old["freezing"]
    old["modes"] = ["eager", "compile"]  # recorded by an older suite; now study bench's alone
    assert same_settings("bench", old, config)
    assert not same_settings("bench", old, to_dict(load_config(None, ["bench.freezing=true"])))
    assert not same_settings("bench", {**old, "iters": old["iters"] + 1}, config)
    assert not same_settings("bench", None, config)
