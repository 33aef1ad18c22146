"""The trainer's hooks (study/train/hooks.py, validation.py): no import circle inside study/train, evaluation
during training that is recorded and leaves the training untouched, and a run that fails before its first
step marked failed (not pending)."""
from __future__ import annotations

import ast
import csv
import math

import pytest
import torch

from study.launch.collect import run_state
from study.runs import RunDir
from study.train.config import TrainConfig
from study.train.loop import train
from conftest import REPO
from test_train_loop import TINY, synthetic_root, tiny_config, weights  # noqa: F401 (fixture)


def _imports_of(path) -> set[str]:
    """Every study.train module a file imports, at any depth (TYPE_CHECKING blocks and functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("study.train."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("study.train.")}
    return found


def test_no_import_circle_inside_study_train():
    """The state no longer imports the trainer (issue 25: study/train/loop.py <-> state.py was a circle)."""
    modules = {f"study.train.{p.stem}": _imports_of(p) for p in (REPO / "study" / "train").glob("*.py")}
    seen: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m, path):
        seen[m] = 1
        for n in sorted(modules.get(m, ())):
            if seen.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in seen:
                visit(n, path + [n])
        seen[m] = 2

    for m in sorted(modules):
        if m not in seen:
            visit(m, [m])
    assert "study.train.loop" not in modules["study.train.state"]


def test_evaluation_during_training_is_recorded_and_changes_nothing(tmp_path, synthetic_root):
    """train.eval_every=2 over 4 steps: metrics.json's eval_history holds steps 2 and 4, train.csv's val_PQ
    column has them (empty elsewhere), the last one equals `study eval`'s score of the final weights (the
    same model and computation, so exactly), and the weights equal those of the run without evaluations
    (every random state is restored; eval.num_workers=1 makes the evaluation draw from torch's RNG for its
    DataLoader's seed, and put the model in eval mode, either of which would change the training)."""
    from study.eval.run import evaluate_run

    base = ["train.max_steps=4", "train.checkpoint_every=4", "eval.num_workers=1", "eval.overlap=false"]
    plain = train(tiny_config(synthetic_root, *base), RunDir(tmp_path / "plain"))
    cfg = tiny_config(synthetic_root, *base, "train.eval_every=2")
    run = train(cfg, RunDir(tmp_path / "evaluated"))
    history = run.metrics()["eval_history"]
    assert [e["step"] for e in history] == [2, 4]
    assert all(e["eval"]["task"] == "panoptic" and e["eval"]["num_images"] == 2 and "per_class" not in e["eval"]
               for e in history)
    assert [e["PQ"] for e in history] == [100 * e["eval"]["All"]["pq"] for e in history]
    with open(run.csv_log) as f:
        rows = list(csv.DictReader(f))
    assert [r["val_PQ"] != "" for r in rows] == [False, True, False, True]
    assert [float(rows[i]["val_PQ"]) for i in (1, 3)] == [e["PQ"] for e in history]
    final = evaluate_run(cfg, run.final_weights)
    assert history[-1]["eval"]["All"] == final["All"] and history[-1]["eval"]["Things"] == final["Things"]
    a, b = weights(plain), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a), "evaluating during training changed the training"
    text = (run.path / "logs" / "train.log").read_text()
    assert "validation at step 2: val_PQ" in text and "validation at step 4: val_PQ" in text


@pytest.mark.parametrize("fault", ["classes", "eval_split"])
def test_a_run_that_fails_before_its_first_step_is_failed_not_pending(tmp_path, synthetic_root, fault):
    """A contradiction between settings (model.num_classes against the data set's classes) found when the
    data is built, or a missing evaluation split found before the first step: status.json says failed with
    the error, `study status` (run_state) shows failed, and the text log has the error."""
    extra = {"classes": ["model.num_classes=5"], "eval_split": ["train.eval_every=1", "eval.split=nosuchsplit"]}[fault]
    run = RunDir(tmp_path / "run")
    with pytest.raises(Exception) as e:
        train(tiny_config(synthetic_root, "train.max_steps=2", *extra), run)
    status = run.status()
    assert status["state"] == "failed" and str(e.value) in status["error"]
    assert status["step"] == 0 and run_state(run) == "failed"
    assert not run.last_checkpoint.exists()
    assert "failed" in (run.path / "logs" / "train.log").read_text()


@pytest.mark.parametrize("key,value", [("log_every", -1), ("log_every", 2.5), ("eval_every", -3),
                                       ("log_every_s", math.nan), ("log_every_s", math.inf), ("log_every_s", -1.0),
                                       ("eval_max_images", 0)])
def test_logging_and_evaluation_keys_are_validated(key, value):
    from study.errors import UserError

    with pytest.raises(UserError, match=rf"^train\.{key} must be"):
        TrainConfig(**{key: value}).validate()
    TrainConfig(log_every=5, log_every_s=0.0, eval_every=0).validate()  # 0 turns a criterion off


def test_a_resumed_run_drops_the_evaluations_after_its_checkpoint(tmp_path, synthetic_root):
    """Resumed at step 4, the entries of steps 6 and 8 (made after the checkpoint, to be redone) leave
    eval_history; those of steps 2 and 4 stay, and so does the rest of metrics.json."""
    from types import SimpleNamespace

    from study.train.validation import EvalHook

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.update_metrics(eval_history=[{"step": s, "PQ": float(s)} for s in (2, 4, 6, 8)], other={"kept": 1})
    tr = SimpleNamespace(main=True, cfg=tiny_config(synthetic_root, "train.eval_every=2"), run=run, step=4)
    EvalHook(2, "panoptic").before_train(tr)
    assert [e["step"] for e in run.metrics()["eval_history"]] == [2, 4]
    assert run.metrics()["other"] == {"kept": 1}
