"""Training you can follow (study/train/logs.py): the text log's lines (every train.log_every steps or
train.log_every_s seconds, whichever first) on stdout and in logs/train.log, what they say against the CSV log
and the annealing schedule, the interactive bar on stderr, and the lines reaching a local submitit job's
stdout file through the real launcher."""
from __future__ import annotations

import csv
import re
from pathlib import Path
from types import SimpleNamespace

import yaml

from study.cli import main
from study.config import apply_overrides
from study.launch.grid import expand_grid
from study.runs import RunDir
from study.train.logs import LogLineHook, log_file
from study.train.loop import train
from study.train.schedules import mask_annealing_probs
from test_train_loop import TINY, synthetic_root, tiny_config  # noqa: F401 (fixture)

STEP_LINE = re.compile(r"step (\d+)/(\d+) \(\d+%\) loss ([\d.]+) \[loss_ce ([\d.]+) loss_mask ([\d.]+) loss_dice "
                       r"([\d.]+)\] grad_norm \S+ lr (\S+) P_mask (\S+) \| ([\d.]+) img/s \| ETA \d+:\d\d:\d\d$")


def test_a_line_is_due_every_n_steps_or_every_t_seconds_whichever_first():
    hook = LogLineHook(every=10, every_s=30.0)
    hook.first, hook.mark = 1, (100.0, 0, 0.0)  # the last line at t = 100 s

    def due(step, now, total=1000):
        return hook._due(SimpleNamespace(step=step, total=total), now)

    assert due(1, 100.0) and due(1000, 100.0)  # the first and the last step always
    assert due(10, 100.5) and due(20, 101.0)  # by steps, however soon
    assert not due(11, 129.9) and due(11, 130.0)  # by time, between the step marks
    hook.every = 0  # steps off: time only
    assert not due(10, 129.0) and due(13, 131.0)
    hook.every, hook.every_s = 10, 0.0  # time off: steps only
    assert not due(11, 10_000.0) and due(30, 100.0)


def _step_lines(text: str) -> dict[int, re.Match]:
    return {int(m.group(1)): m for m in map(STEP_LINE.search, text.splitlines()) if m}


def test_log_lines_on_stdout_and_in_the_run_log_match_the_csv_and_the_schedule(tmp_path, synthetic_root,
                                                                                capsys):
    """5 steps, train.log_every=2, time off: lines for steps 1 (first), 2, 4 and 5 (last), the same on
    stdout and in logs/train.log; each line's loss terms are the CSV row's (4 decimals), its P_mask the
    annealing schedule's for that step (tiny EoMT: 2 annealed layers; sixths rule of 5 steps), and with the
    bar on (progress=True, what STUDY_PROGRESS=1 asks) the bar goes to stderr, the lines stay whole on
    stdout."""
    cfg = tiny_config(synthetic_root, "train.max_steps=5", "train.checkpoint_every=5", "train.log_every=2",
                      "train.log_every_s=0")
    run = train(cfg, RunDir(tmp_path / "run"), progress=True)
    out, err = capsys.readouterr()
    printed, kept = _step_lines(out), _step_lines(log_file(run).read_text())
    assert sorted(printed) == sorted(kept) == [1, 2, 4, 5]
    assert all(printed[s].group(0) == kept[s].group(0) for s in printed)
    with open(run.csv_log) as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    for step, m in printed.items():
        row = rows[step]
        assert int(m.group(2)) == 5
        for i, key in enumerate(("loss", "loss_ce", "loss_mask", "loss_dice"), start=3):
            assert m.group(i) == f"{float(row[key]):.4f}"
        assert float(m.group(7)) == float(f"{float(row['lr']):.3e}")
        schedule = mask_annealing_probs(step - 1, 5, 2)  # step s trained with the probabilities of index s - 1
        assert m.group(8) == "/".join(f"{p:.2f}" for p in schedule)
        assert float(m.group(9)) > 0
    assert "starting, 5 steps" in out and "finished 5 steps" in out
    assert f"train {run.path.name}" in err and "5/5" in err and not STEP_LINE.search(err)


def test_a_local_job_writes_the_log_lines_to_its_stdout_file(tmp_path, synthetic_root):
    """`study launch --cluster local` (submitit's local executor, the real launcher): the job's stdout file
    (launch.json's ``logs`` folder) holds the same step lines as the run's logs/train.log."""
    tree = apply_overrides({}, TINY + [f"data.root={synthetic_root}", "train.max_steps=2",
                                       "train.checkpoint_every=2", "launch.steps=[train]"], {})
    tree["output_dir"] = str(tmp_path / "runs")
    tree["grid"] = {"name": "g", "runs": [{"seed": 0}]}
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(tree))
    assert main(["launch", str(grid), "--cluster", "local", "--wait"]) == 0
    _, (r,) = expand_grid(grid)
    run = RunDir(r.folder)
    (job_out,) = Path(run.launch_record()["logs"]).glob("*_log.out")  # submitit's <job>_<task>_log.out
    in_job, in_run = _step_lines(job_out.read_text()), _step_lines(log_file(run).read_text())
    assert sorted(in_job) == sorted(in_run) == [1, 2]
    assert all(in_job[s].group(0) == in_run[s].group(0) for s in in_job)
