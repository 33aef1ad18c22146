"""The run folder (study/runs.py): RunDir is the one reader and writer of its files."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from study.config import load_config, to_dict
from study.errors import UserError
from study.launch.config import check_steps
from study.runs import RunDir, step_settings


def _run(tmp_path, *overrides):
    cfg = load_config(None, [f"output_dir={tmp_path}", "model.size=tiny", *overrides])
    run = RunDir.for_config(cfg)
    run.claim(cfg)
    return cfg, run


def test_evaluation_goes_whole_to_its_file_and_without_details_to_metrics(tmp_path):
    cfg, run = _run(tmp_path)
    result = {"task": "panoptic", "split": "val", "All": {"pq": 0.5}, "per_class": {"1": {"pq": 0.5}},
              "categories": [{"id": 1}], "settings": step_settings("eval", to_dict(cfg))}
    assert run.pending_steps(["eval"]) == ["eval"]
    run.write_evaluation(result)
    assert run.evaluation("panoptic", "val") == result
    assert json.loads(run.eval_file("panoptic", "val").read_text()) == result
    assert run.metrics()["eval"] == {"task": "panoptic", "split": "val", "All": {"pq": 0.5},
                                     "settings": result["settings"]}
    assert run.pending_steps(["train", "eval"]) == ["train"]
    assert run.pending_steps(["eval"], load_config(None, [f"output_dir={tmp_path}", "model.size=tiny",
                                                          "eval.max_images=2"])) == ["eval"]  # other settings


def test_failure_of_an_earlier_submission_is_ignored(tmp_path):
    _, run = _run(tmp_path)
    run.write_failure("train", "ValueError: boom")
    assert run.failure()["error"] == "ValueError: boom"
    run.write_launch_record("12", "local", ["train"], submitted="2999-01-01T00:00:00")
    assert run.failure() == {}  # older than the latest submission
    assert run.launch_record()["job_id"] == "12"
    run.clear_failure()
    assert not run.failure_file.exists()


def test_claim_refuses_another_configuration_and_steps_are_checked(tmp_path):
    cfg, run = _run(tmp_path)
    other = load_config(None, [f"output_dir={tmp_path}", "model.size=tiny", "seed=5"])
    assert run.belongs_to(cfg) and not run.belongs_to(other)
    with pytest.raises(UserError, match="holds a run of another configuration"):
        run.claim(other)
    with pytest.raises(UserError, match=r"unknown step\(s\) \['evaluate'\]"):
        check_steps(["train", "evaluate"])


def test_holding_finds_the_run_of_a_checkpoint(tmp_path):
    _, run = _run(tmp_path)
    run.final_weights.parent.mkdir(parents=True)
    run.final_weights.write_bytes(b"")
    assert RunDir.holding(run.final_weights).path == run.path.resolve()
    assert RunDir.holding(tmp_path / "elsewhere.pt") is None


def test_the_results_table_needs_neither_the_job_runner_nor_submitit():
    code = ("import sys, study.launch.collect; "
            "print(sorted(m for m in sys.modules if m.startswith('submitit') or m == 'study.launch.pipeline'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
