"""`make study` (scripts/main_study.py) reduced: two tiny rows, a few steps, through the real launcher; the index
shows every table that has runs and every figure, names how the times were taken, and a second run finds
every stage done and submits nothing. Slow: the whole grid of experiments/main_study.yaml as local jobs."""
from __future__ import annotations

import importlib.util
import json
import re
import platform

import pytest
import torch

from analysis.tables import reportable_tables
from study.errors import UserError
from study.launch.collect import collect
from study.runs import RunDir
from study.train.loop import progress_wanted
from conftest import REPO

TINY = ["train.max_steps=3", "train.checkpoint_every=3", "data.synthetic_train_images=8",
        "data.synthetic_val_images=3", "data.batch_size=2", "train.batch_size=2", "train.num_points=256",
        "train.warmup_steps=1", "train.backbone_warmup_steps=1", "model.img_size=64",
        "data.synthetic_image_size=64", "bench.iters=2", "bench.warmup=1"]
NARROW = ("model.baseline.hidden_dim: 64, model.baseline.encoder_ffn: 256, model.baseline.decoder_ffn: 256, "
          "model.baseline.encoder_heads: 4, model.baseline.decoder_heads: 4")


def _script():
    spec = importlib.util.spec_from_file_location("main_study", REPO / "scripts" / "main_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _grid(tmp_path, runs: list[str]):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"base: {REPO / 'experiments' / 'main_study.yaml'}\ngrid:\n  name: mini\n  runs:\n"
                    + "".join(f"    - {{{r}}}\n" for r in runs))
    return grid


def _argv(tmp_path, grid, cluster: str, *more: str) -> list[str]:
    sets = [f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'synthetic'}", *TINY]
    return ["--grid", str(grid), "--cluster", cluster, "--poll", "0.5", *more,
            *[a for s in sets for a in ("--set", s)]]


def _jobs(grid_dir) -> dict:
    return {r.name: len(RunDir(r).launch_jobs()) for r in grid_dir.iterdir() if (r / "config.yaml").is_file()}


def _check_index(root, grid_dir):
    """Every table that has complete runs is listed, linked and shown; every figure drawn is embedded; the
    times name device, precision, threads and host."""
    index = (root / "report" / "index.md").read_text()
    results = collect(grid_dir)
    reports = {t: r for t, r in reportable_tables(results).items() if not isinstance(r, str)}
    assert {"1", "7"} <= set(reports)  # row 3 is in Table 1; EoMT never masked is Table 7's third row
    for t in reports:
        assert f"- Table {t}: [md](table_{t}.md), [tex](table_{t}.tex), [csv](table_{t}.csv)" in index
        assert f"### Table {t}\n" in index  # shown inline, not only linked
    for t in {"B", "3", "4", "5", "6", "9"} - set(reports):
        assert f"Table {t}" in index.split("Not written: ", 1)[1].split("\n", 1)[0]
    pngs = sorted(p.name for p in (root / "report").glob("*.png"))
    assert "components_time.png" in pngs  # the pipeline records the per-component time now
    for png in pngs:
        assert f"]({png})" in index
    assert f"Times taken on: cpu, fp32, 1 thread, torch {torch.__version__}" in index  # the version, not None
    assert f"host {platform.node()}" in index
    assert "## Parameters and GFLOPs at the real sizes" in index
    return index


def test_reduced_study_reports_every_table_and_a_second_run_submits_nothing(tmp_path, capsys):
    study = _script()
    grid = _grid(tmp_path, [f"model.variant: single_scale, {NARROW}",
                            "model.variant: eomt, model.mask_setting: unmasked"])
    argv = _argv(tmp_path, grid, "debug", "--count", "eomt:S:640")
    assert study.main(argv) == 0
    out = capsys.readouterr().out
    root, grid_dir = tmp_path / "runs", tmp_path / "runs" / "mini"
    first = json.loads((root / "study_summary.json").read_text())
    assert first["train_eval"]["actions"] == {"submit": 2} and not first["failed"]
    assert first["counts"]["found"] is False and first["report"]["found"] is False
    # ours beside the paper's Table 3 (EoMT-S at 640): params 23.98 M / 24 M, GFLOPs 68.0 / 68
    assert re.search(r"^eomt +S +640 .*\b23\.98 +24 +68\.0 +68\b", out, flags=re.M), out
    assert "done   row 3 single_scale: PQ" in out and "done   eomt / unmasked: PQ" in out
    assert out.rstrip().endswith(f"index: {root / 'report' / 'index.md'}")
    index = _check_index(root, grid_dir)
    counts = json.loads((root / "counts_real_size.json").read_text())["rows"]
    assert [(r["variant"], r["size"], r["img_size"]) for r in counts] == [("eomt", "S", 640)]
    assert f"| `eomt` (5) | S | 640 | {counts[0]['params'] / 1e6:.2f} / 24 |" in index
    jobs = _jobs(grid_dir)

    assert study.main(argv) == 0  # again: every stage found
    out = capsys.readouterr().out
    second = json.loads((root / "study_summary.json").read_text())
    assert second["train_eval"]["actions"] == {"skip": 2} and second["train_eval"]["submitted"] == 0
    assert second["counts"]["found"] is True and second["report"]["found"] is True
    assert second["earlier"] == [{k: v for k, v in first.items() if k != "earlier"}]  # the first run's times kept
    assert _jobs(grid_dir) == jobs  # no launch record added: nothing was submitted
    assert "0 run steps launched" in out and "nothing to count" in out and "nothing to redraw" in out


def test_bad_arguments_are_one_message(tmp_path, capsys):
    study = _script()
    grid = _grid(tmp_path, ["model.variant: eomt"])
    assert study.main(_argv(tmp_path, grid, "debug", "--count", "eomt-S-640")) == 2
    err = capsys.readouterr().err
    assert "--count 'eomt-S-640': give VARIANT:SIZE:IMG_SIZE" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def test_training_bar_only_in_a_terminal_or_when_asked(monkeypatch):
    monkeypatch.delenv("STUDY_PROGRESS", raising=False)
    assert progress_wanted(None) is False  # pytest captures stderr: not a terminal (a job's log file)
    assert progress_wanted(True) is True and progress_wanted(False) is False
    monkeypatch.setenv("STUDY_PROGRESS", "1")
    assert progress_wanted(None) is True
    monkeypatch.setenv("STUDY_PROGRESS", "yes")
    with pytest.raises(UserError, match="STUDY_PROGRESS='yes'"):
        progress_wanted(None)


@pytest.mark.slow
def test_whole_grid_as_local_jobs(tmp_path, capsys):
    """experiments/main_study.yaml's 14 runs (3 steps each) as submitit local jobs, timed here, reported."""
    study = _script()
    argv = _argv(tmp_path, REPO / "experiments" / "main_study.yaml", "local", "--count", "eomt:tiny:64")
    assert study.main(argv) == 0
    root = tmp_path / "runs"
    summary = json.loads((root / "study_summary.json").read_text())
    assert summary["train_eval"]["actions"] == {"submit": 14} and summary["timing"]["actions"] == {"submit": 14}
    index = _check_index(root, root / "main_study")
    for t in ("1", "7", "C"):
        assert f"### Table {t}\n" in index
    assert study.main(argv) == 0
    again = json.loads((root / "study_summary.json").read_text())
    assert again["train_eval"]["submitted"] == 0 and again["timing"]["submitted"] == 0


def test_an_unreadable_summary_is_moved_aside_not_overwritten(tmp_path, capsys):
    study = _script()
    path = tmp_path / "study_summary.json"
    path.write_text('{"seconds": 12')  # cut off
    assert study._earlier_summaries(path) == []
    (aside,) = tmp_path.glob("study_summary.json.unreadable-*")
    assert aside.read_text() == '{"seconds": 12' and not path.exists()
    assert "could not be read" in capsys.readouterr().out
    path.write_text(json.dumps({"seconds": 3, "earlier": [{"seconds": i} for i in range(study.KEEP_SUMMARIES)]}))
    kept = study._earlier_summaries(path)
    assert len(kept) == study.KEEP_SUMMARIES and kept[-1] == {"seconds": 3} and kept[0] == {"seconds": 1}
    path.write_text(json.dumps({"seconds": 4, "earlier": "lost"}))  # not a summary either: kept aside too
    assert study._earlier_summaries(path) == []
    asides = sorted(tmp_path.glob("study_summary.json.unreadable-*"))  # the first one is not overwritten
    assert len(asides) == 2 and {a.read_text() for a in asides} == {'{"seconds": 12', '{"seconds": 4, "earlier": "lost"}'}
