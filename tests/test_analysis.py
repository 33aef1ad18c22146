"""Seed averaging, the figures and the notebook, from results tables (the output of `study collect`).
The table reports themselves: tests/test_reports.py."""
from __future__ import annotations

import pandas as pd
import pytest

from analysis.plots import component_plot, size_plot, tradeoff_plot
from analysis.tables import summarize
from study.errors import UserError
from conftest import REPO, require

COCO = {"task": "panoptic", "data.dataset": "coco_panoptic"}


def results() -> pd.DataFrame:
    rows = []
    for variant, pq, fps in (("eomt", 56.0, 128.0), ("vit_adapter_m2f", 57.1, 29.0), ("single_scale", 56.7, 64.0)):
        for seed, delta in ((0, -0.5), (1, 0.5)):
            rows.append({"run": f"{variant}-{seed}", "state": "complete", "model.variant": variant,
                         "model.size": "L", "model.img_size": 640, "seed": seed, "PQ": pq + delta,
                         "FPS": fps, "GFLOPs": 100.0, "params_M": 300.0, **COCO,
                         "metrics.bench.protocol.device": "cuda:0", "metrics.bench.protocol.gpu": "NVIDIA H200",
                         "metrics.bench.protocol.precision": "bf16", "metrics.bench.protocol.threads": 16,
                         "metrics.bench.breakdown_ms.backbone": 5.0 + seed,
                         "metrics.bench.breakdown_ms.decoder": 2.0})
    rows.append({"run": "eomt-S", "state": "complete", "model.variant": "eomt", "model.size": "S",
                 "model.img_size": 640, "seed": 0, "PQ": 44.0, "FPS": 300.0, "GFLOPs": 68.0, "params_M": 24.0,
                 **COCO})
    rows.append({"run": "eomt-L-crashed", "state": "failed", "model.variant": "eomt", "model.size": "L",
                 "model.img_size": 640, "seed": 2, "PQ": 0.0, "FPS": None, "GFLOPs": None, "params_M": None,
                 **COCO})
    return pd.DataFrame(rows)


def test_seeds_are_averaged_and_unfinished_runs_ignored():
    s = summarize(results())
    eomt_l = s[(s["model.variant"] == "eomt") & (s["model.size"] == "L")].iloc[0]
    assert eomt_l["n"] == 2 and eomt_l["PQ"] == pytest.approx(56.0)  # the failed seed 2 is left out
    assert eomt_l["PQ_std"] == pytest.approx(2 ** 0.5 / 2)  # sample std of 55.5 and 56.5
    assert eomt_l["runs"] == "eomt-0, eomt-1"


def test_missing_columns_named():
    with pytest.raises(UserError, match=r"no column\(s\) \['model.size'"):
        summarize(pd.DataFrame({"model.variant": ["eomt"], "model.img_size": [640]}))


def _line(ax, label):
    return next(line for line in ax.lines if line.get_label() == label)


def test_figure1_ours_and_the_papers_points_side_by_side():
    """Ours (left, our device) and the paper's (right, one H100) on separate axes: never one comparison."""
    fig = tradeoff_plot(results())
    ours_ax, paper_ax = fig.axes
    assert ours_ax.get_xscale() == "log" and "FPS" in ours_ax.get_xlabel() and "%" in ours_ax.get_ylabel()
    eomt = _line(ours_ax, "w/o Masking = EoMT (ours)")  # the registry's label
    assert list(eomt.get_xdata()) == [300.0, 128.0] and list(eomt.get_ydata()) == [44.0, 56.0]  # S then L
    assert not any("(paper)" in line.get_label() for line in ours_ax.lines)
    assert not any("(ours)" in line.get_label() for line in paper_ax.lines)
    paper = _line(paper_ax, "w/o Masking = EoMT (paper)")  # Table 3 at 640 (H100 FPS): S, B, L, g
    assert list(paper.get_xdata()) == [330, 261, 128, 55] and list(paper.get_ydata()) == [44.7, 50.6, 56.0, 57.0]
    assert paper.get_linestyle() == "--" and eomt.get_linestyle() == "-"
    assert eomt.get_color() == paper.get_color()  # one colour per variant
    assert ours_ax.get_title() == "ours" and "H100" in paper_ax.get_title()
    assert "ours: cuda:0 (NVIDIA H200), bf16, 16 threads" in fig._suptitle.get_text()  # our device, once
    assert "w/o Masking = EoMT" in {t.get_text() for t in fig.legends[0].get_texts()}
    assert fig.get_figwidth() == pytest.approx(3.3)
    with pytest.raises(UserError, match="no 'AP' values"):
        tradeoff_plot(results(), y="AP")


def test_runs_of_one_variant_in_other_settings_are_separate_lines():
    """Table 7's mask settings (and any other setting) are never joined with the variant's own line: EoMT at S
    and L plus an unmasked EoMT at L are two lines, each named; the tick labels are plain numbers."""
    r = results()
    extra = r[r["run"] == "eomt-0"].assign(run="eomt-unmasked", **{"model.mask_setting": "unmasked", "PQ": 53.2,
                                                                   "FPS": 140.0})
    r = pd.concat([r, extra], ignore_index=True)
    for fig, ax in ((f, f.axes[0]) for f in (tradeoff_plot(r), size_plot(r))):
        assert len(_line(ax, "w/o Masking = EoMT (ours)").get_xdata()) == 2  # S and L of the default setting
        unmasked = _line(ax, "w/o Masking = EoMT unmasked (ours)")
        assert len(unmasked.get_xdata()) == 1
        assert unmasked.get_marker() != _line(ax, "w/o Masking = EoMT (ours)").get_marker()
    fig = tradeoff_plot(r)
    fig.canvas.draw()
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert labels and all(t.replace(".", "").isdigit() for t in labels), labels  # 20, 50, 100, no 2x10^1


def test_size_and_component_figures():
    from analysis.plots import component_colour

    fig = size_plot(results())
    params, gflops = fig.axes
    eomt = _line(params, "w/o Masking = EoMT (ours)")
    assert [t.get_text() for t in params.get_xticklabels()] == ["S", "B", "L", "g"]
    assert list(eomt.get_ydata()) == [24.0, 300.0]
    bars = component_plot(results()).axes[0]
    assert bars.get_xlabel() == "ms per forward"
    # rows 0, 3, 5 at L (top to bottom): backbone (mean of seeds 5 and 6 ms), then decoder (2 ms)
    widths = [round(p.get_width(), 2) for p in bars.patches]
    assert widths == [5.5, 5.5, 5.5, 2.0, 2.0, 2.0]
    assert [t.get_text() for t in bars.get_yticklabels()] == [
        "5. w/o Masking = EoMT L/640", "3. w/o Multi-scale L/640", "0. ViT-Adapter + Mask2Former L/640"]
    legend = {t.get_text() for t in bars.figure.legends[0].get_texts()}
    assert legend == {"backbone", "decoder"}
    import matplotlib.colors as mc

    assert mc.to_hex(bars.patches[0].get_facecolor()) == component_colour("backbone")
    assert component_colour("adapter") != component_colour("patch_embed")  # every component its own colour
    with pytest.raises(UserError, match="gflops_by_component"):
        component_plot(results(), "GFLOPs")


def test_notebook_runs_headless_on_a_results_table(tmp_path):
    """The committed notebook has no outputs and runs top to bottom on a results CSV (nbclient, the venv's
    kernel); its tables and figures come out of analysis/."""
    nbformat = require("nbformat")
    nbclient = require("nbclient")
    path = REPO / "analysis" / "notebooks" / "results.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
    csv = tmp_path / "results.csv"
    results().to_csv(csv, index=False)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = f'RESULTS = "{csv}"\nBASELINE = ["model.variant=eomt", "model.size=L"]\nSIZE = None\nIMG_SIZE = None'
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    shown = "".join(str(o.get("data", {}).get("text/markdown", "")) for c in nb.cells for o in c.get("outputs", []))
    assert "## Table 1" in shown and "| w/o Masking = EoMT " in shown and "## Table 3" in shown
    assert "## Study: variant x size" in shown and "reference" in shown
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    # the study: PQ / FPS vs variant and vs size, PQ vs FPS and vs GFLOPs (no logs: no curves); the paper's:
    # Figure 1, PQ vs GFLOPs, sizes, per-component time (no GFLOPs split, no logs)
    assert len(images) == 8


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
