"""The notebook as shipped: its default folder is the one `make study` writes (runs/main/main_study), and it
runs top to bottom on a folder of that shape: the main study's grid (experiments/main_study.yaml, two seeds),
each run folder written through study.runs.RunDir as a finished, evaluated and timed run."""
from __future__ import annotations

import pandas as pd
import pytest

from conftest import REPO, require

NOTEBOOK = REPO / "analysis" / "notebooks" / "results.ipynb"


def main_study_folder(root) -> tuple:
    """runs/main/main_study under ``root``: every run of the main study's grid (Table 1's rows at seeds 0 and 1),
    finished
    (status, final weights, a training log) with an evaluation and a benchmark whose settings are the run's."""
    from study.config import to_dict
    from study.launch.grid import expand_grid
    from study.runs import RunDir, step_settings

    name, runs = expand_grid(REPO / "experiments" / "main_study.yaml", [f"output_dir={root / 'runs' / 'main'}"])
    for k, r in enumerate(runs):
        run = RunDir(r.folder)
        run.path.mkdir(parents=True)
        run.claim(r.config)
        cfg = to_dict(r.config)
        run.write_status("finished", step=250, total_steps=250)
        run.final_weights.parent.mkdir()
        run.final_weights.write_bytes(b"weights")
        run.csv_log.parent.mkdir()
        pd.DataFrame({"step": [1, 125, 250], "loss": [30.0, 20.0, 10.0 + k % 3]}).to_csv(run.csv_log, index=False)
        pq = 0.5 + 0.01 * (k // 2) + 0.005 * (k % 2)
        run.update_metrics(
            eval={"task": "panoptic", "All": {"pq": pq}, "Things": {"pq": pq - 0.1}, "Stuff": {"pq": pq + 0.1},
                  "settings": step_settings("eval", cfg)},
            bench={"params": 3e5, "gflops": 0.05 + 0.01 * (k // 2), "fps": 40.0 + k // 2 + k % 2,
                   "settings": step_settings("bench", cfg)})
    return name, runs


def test_the_default_folder_is_make_studys():
    nbformat = require("nbformat")
    from study.launch.grid import expand_grid

    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    name, runs = expand_grid(REPO / "experiments" / "main_study.yaml")
    folder = runs[0].folder.parent  # where `make study` puts the grid's runs
    assert folder.as_posix() == "runs/main/main_study"  # relative: the notebook runs from the repository
    assert 'RESULTS = "runs/main/main_study"' in params.source


@pytest.mark.slow
def test_notebook_runs_as_shipped_on_a_main_study_folder(tmp_path, monkeypatch):
    """Run from a folder holding runs/main/main_study, its parameters untouched: the study (Table 1's six rows
    with 2 seeds and intervals, Table 7's two with one), the paper tables that match, the figures."""
    nbformat = require("nbformat")
    nbclient = require("nbclient")
    _, runs = main_study_folder(tmp_path)
    from study.launch.collect import collect

    assert (collect(tmp_path / "runs" / "main" / "main_study")["state"] == "complete").sum() == len(runs) == 14
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports analysis/ from the checkout
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    shown = "".join(str(o.get("data", {}).get("text/markdown", "")) for c in nb.cells for o in c.get("outputs", []))
    assert "## Study: variant x mask_setting" in shown and "| 2 " in shown and "±" in shown
    assert "1 (no interval)" in shown  # Table 7's extra settings: one seed
    assert "## Table 1" in shown and "## Table 7" in shown
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 6
