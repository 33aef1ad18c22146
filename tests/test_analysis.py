"""Paper tables and plots from a results table (the output of `study collect`)."""
from __future__ import annotations

import pandas as pd
import pytest

from analysis.plots import scaling_plot
from analysis.tables import summarize, table1, table3, to_markdown
from study.cli import main
from conftest import REPO, require


def results() -> pd.DataFrame:
    rows = []
    for variant, pq, fps in (("eomt", 56.0, 128.0), ("vit_adapter_m2f", 57.1, 29.0), ("single_scale", 56.7, 64.0)):
        for seed, delta in ((0, -0.5), (1, 0.5)):
            rows.append({"run": f"{variant}-{seed}", "state": "complete", "model.variant": variant,
                         "model.size": "L", "model.img_size": 640, "seed": seed, "PQ": pq + delta,
                         "FPS": fps, "GFLOPs": 100.0, "params_M": 300.0})
    rows.append({"run": "eomt-S", "state": "complete", "model.variant": "eomt", "model.size": "S",
                 "model.img_size": 640, "seed": 0, "PQ": 44.0, "FPS": 300.0, "GFLOPs": 68.0, "params_M": 24.0})
    rows.append({"run": "eomt-L-crashed", "state": "failed", "model.variant": "eomt", "model.size": "L",
                 "model.img_size": 640, "seed": 2, "PQ": 0.0, "FPS": None, "GFLOPs": None, "params_M": None})
    return pd.DataFrame(rows)


def test_seeds_are_averaged_and_unfinished_runs_ignored():
    s = summarize(results())
    eomt_l = s[(s["model.variant"] == "eomt") & (s["model.size"] == "L")].iloc[0]
    assert eomt_l["n"] == 2 and eomt_l["PQ"] == pytest.approx(56.0)  # the failed seed 2 is left out
    assert eomt_l["PQ_std"] == pytest.approx(2 ** 0.5 / 2)  # sample std of 55.5 and 56.5


def test_table1_in_paper_order_with_paper_columns():
    t = table1(results(), "L", 640)
    assert list(t["model.variant"]) == ["vit_adapter_m2f", "single_scale", "eomt"]
    assert list(t["row"]) == [0, 3, 5]
    assert list(t["paper_PQ"]) == [57.1, 56.7, 56.0] and list(t["paper_GFLOPs"]) == [830, 673, 669]
    md = to_markdown(t)
    assert md.splitlines()[0].startswith("| row | model.variant") and "| 5 | eomt | L | 640 |" in md


def test_table3_largest_size_first():
    t = table3(results())
    assert list(zip(t["model.size"], t["model.variant"])) == [("L", "vit_adapter_m2f"), ("L", "eomt"),
                                                              ("S", "eomt")]
    assert list(t["paper_FPS"]) == [29, 128, 330]


def test_missing_columns_named():
    with pytest.raises(ValueError, match=r"no column\(s\) \['model.size'"):
        summarize(pd.DataFrame({"model.variant": ["eomt"], "model.img_size": [640]}))


def test_scaling_plot_and_report_cli(tmp_path, capsys):
    fig = scaling_plot(results())
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and len(ax.lines) == 3  # one line per variant
    eomt = [line for line in ax.lines if line.get_label() == "EoMT"][0]
    assert list(eomt.get_xdata()) == [128.0, 300.0] and list(eomt.get_ydata()) == [56.0, 44.0]  # L then S
    paper = scaling_plot(results(), paper=True).axes[0]
    lines = {line.get_label(): line for line in paper.lines}
    assert len(lines) == 6  # Table 1's six rows; three of them through the four sizes of Table 3
    assert list(lines["EoMT"].get_xdata()) == [55, 128, 261, 330]  # g, L, B, S at 640 (H100 FPS)
    csv = tmp_path / "results.csv"
    results().to_csv(csv, index=False)
    assert main(["report", str(csv), "--md", str(tmp_path / "t1.md"), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "| 0 | vit_adapter_m2f |" in (tmp_path / "t1.md").read_text()
    with pytest.raises(ValueError, match="no 'AP' values"):
        scaling_plot(results(), y="AP")


def test_notebook_runs_headless_on_a_results_table(tmp_path):
    """The committed notebook has no outputs and runs top to bottom on a results CSV (nbclient, the venv's
    kernel); its tables come out of analysis/."""
    nbformat = require("nbformat")
    nbclient = require("nbclient")
    path = REPO / "analysis" / "notebooks" / "results.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
    csv = tmp_path / "results.csv"
    results().to_csv(csv, index=False)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = f'RESULTS = "{csv}"\nSIZE = "L"\nIMG_SIZE = 640'
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    shown = "".join(str(o.get("data", {}).get("text/markdown", "")) for c in nb.cells for o in c.get("outputs", []))
    assert "| 0 | vit_adapter_m2f |" in shown and "| eomt | S | 640 |" in shown  # Table 1, Table 3
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # ours and the paper's scaling plot


def test_different_models_are_never_averaged_after_a_csv_round_trip(tmp_path):
    """Table D varies model.num_query_blocks at one variant, size and input size: four models, four rows, each
    the mean of its seeds (the table went through `study collect`'s CSV)."""
    rows = []
    for l2, pq in ((9, 55.7), (6, 55.7), (4, 56.0), (2, 55.4)):
        for seed in (0, 1):
            rows.append({"run": f"d{l2}-{seed}", "state": "complete", "model.variant": "eomt", "model.size": "L",
                         "model.img_size": 640, "model.num_query_blocks": l2, "seed": seed, "PQ": pq + seed - 0.5,
                         "launch.cluster": ["slurm", "local"][seed], "metrics.eval.All.pq": (pq + seed) / 100})
    csv = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    s = summarize(pd.read_csv(csv))
    assert list(s["model.num_query_blocks"]) == [9, 6, 4, 2] and list(s["n"]) == [2, 2, 2, 2]
    assert list(s["PQ"]) == pytest.approx([55.7, 55.7, 56.0, 55.4])
    assert "launch.cluster" not in s and "seed" not in s


def test_report_names_what_is_missing(tmp_path, capsys):
    csv = tmp_path / "results.csv"
    results().to_csv(csv, index=False)
    assert main(["report", str(csv), "--size", "B"]) == 0
    out = capsys.readouterr().out
    assert "no complete run of a Table 1 model at size B, 640 px" in out and "eomt L 640px" in out
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 0
    assert "no runs in" in capsys.readouterr().out
