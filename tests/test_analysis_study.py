"""The generic study (`study report RESULTS` without --table): axes found from what varies, seed statistics
against scipy's t-tests, the reference group, the writers, the figures (no overlapping text), and a grid on
two axes that no paper table has, run through the real launcher."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis.stats import against_value, describe, welch
from analysis.study import build_study, study_csv, study_latex, study_markdown
from analysis.study_plots import pareto_front, study_figures
from study.cli import main
from study.errors import UserError
from conftest import REPO

# Two float64 computations of one interval (our sums vs scipy's): they agree to a few ulps of the values
# (~1e-14 relative for numbers of order 1-100); 1e-9 leaves ample room and still catches any wrong formula.
RTOL = 1e-9


@pytest.mark.parametrize("a,b", [([55.5, 56.5], [54.0, 57.0, 55.2]), ([1.0, 2.0, 4.0, 8.0], [3.0, 3.5])])
def test_intervals_are_scipys(a, b):
    s = describe(a)
    lo, hi = sps.ttest_1samp(a, 0.0).confidence_interval(0.95)
    assert (s.lo, s.hi) == pytest.approx((lo, hi), rel=RTOL)
    assert s.std == pytest.approx(np.std(a, ddof=1), rel=RTOL) and s.n == len(a)
    d = welch(describe(a), describe(b))
    w = sps.ttest_ind(a, b, equal_var=False)
    assert (d.lo, d.hi) == pytest.approx(tuple(w.confidence_interval(0.95)), rel=RTOL)
    assert d.df == pytest.approx(w.df, rel=RTOL)
    assert d.within_noise == (d.lo <= 0 <= d.hi)
    p = against_value(describe(a), 50.0)  # ours against a published number without spread
    lo, hi = sps.ttest_1samp(a, 50.0).confidence_interval(0.95)  # an interval of the mean, not of mean - 50
    assert (p.lo, p.hi) == pytest.approx((lo - 50.0, hi - 50.0), rel=RTOL, abs=1e-9)


def test_one_seed_has_no_interval():
    s = describe([56.0])
    assert s.n == 1 and math.isnan(s.std) and not s.has_interval
    d = welch(s, describe([55.0, 57.0]))
    assert d.value == pytest.approx(-0.0) and d.within_noise is None


def grid_results(n_seeds=2) -> pd.DataFrame:
    """num_queries x lr, ``n_seeds`` seeds each; PQ rises with the queries, by 10 points (far beyond noise),
    and not with the lr (0.2 apart: within noise)."""
    rows = []
    rng = np.random.default_rng(0)
    for q in (10, 20):
        for lr in (1e-3, 3e-4):
            for seed in range(n_seeds):
                pq = 60 + (q - 10) + (0.2 if lr == 1e-3 else 0.0) + [-1.0, 1.0, 0.3][seed]
                rows.append({"run": f"q{q}-lr{lr}-s{seed}", "state": "complete", "model.variant": "eomt",
                             "model.size": "tiny", "model.img_size": 128, "model.num_queries": q, "train.lr": lr,
                             "seed": seed, "PQ": pq, "PQ_th": pq - 2, "PQ_st": pq + 2, "params_M": 0.3 + q / 1000,
                             "GFLOPs": 0.05 + q / 1000, "FPS": 100.0 - q + rng.normal(0, 1),
                             "launch.cluster": "local", "output_dir": f"/x/{seed}"})
    rows.append({"run": "crashed", "state": "failed", "model.variant": "eomt", "model.size": "tiny",
                 "model.img_size": 128, "model.num_queries": 30, "train.lr": 1e-3, "seed": 0, "PQ": 0.0})
    return pd.DataFrame(rows)


def test_axes_groups_and_differences():
    s = build_study(grid_results())
    assert s.axes == ["model.num_queries", "train.lr"]  # seed, cluster, output_dir: not axes; the failed run out
    f = s.frame
    assert list(zip(f["model.num_queries"], f["train.lr"])) == [(10, 3e-4), (10, 1e-3), (20, 3e-4), (20, 1e-3)]
    assert list(f["n"]) == [2, 2, 2, 2] and f.loc[0, "runs"] == "q10-lr0.0003-s0, q10-lr0.0003-s1"
    assert f.loc[0, "PQ noise"] == "reference"
    assert f.loc[1, "PQ noise"] == "within noise" and f.loc[1, "ΔPQ"] == pytest.approx(0.2)
    assert f.loc[2, "PQ noise"] == "beyond noise" and f.loc[2, "ΔPQ"] == pytest.approx(10.0)
    seeds = grid_results().query("`model.num_queries` == 20 and `train.lr` == 0.001")["PQ"]
    assert (f.loc[3, "PQ lo"], f.loc[3, "PQ hi"]) == pytest.approx(
        tuple(sps.ttest_1samp(seeds, 0).confidence_interval(0.95)), rel=RTOL)
    md = study_markdown(s)
    assert [c.strip() for c in md.splitlines()[2].split("|")[1:4]] == ["model.num_queries", "train.lr", "n"] and "reference" in md and "within noise" in md
    assert "±" in md and "[" in md
    b = build_study(grid_results(), ["num_queries=20", "lr=0.001"])
    assert b.reference == 3 and b.frame.loc[3, "PQ noise"] == "reference"
    with pytest.raises(UserError, match="'seed' is not one key that varies"):
        build_study(grid_results(), ["seed=0"])
    with pytest.raises(UserError, match="matches 2 groups"):
        build_study(grid_results(), ["lr=0.001"])
    assert "\\toprule" in study_latex(s) and "$\\pm$" in study_latex(s)
    csv = pd.read_csv(pd.io.common.StringIO(study_csv(s)))
    assert {"PQ", "PQ std", "PQ n", "PQ lo", "PQ hi", "ΔPQ lo", "ΔPQ hi", "FPS noise"} <= set(csv.columns)


def test_one_seed_says_no_interval():
    s = build_study(grid_results(n_seeds=1))
    md = study_markdown(s)
    assert "| 1 (no interval) " in md
    table = md.split("\n\n")[1]
    assert "no interval: n = 1" in table and "noise" not in table and "±" not in table


def test_pareto_front():
    # (FPS, PQ): (10, 60) is beaten by (20, 61); (30, 50) is the fastest: the front is 20 -> 30
    assert pareto_front([10, 20, 30], [60, 61, 50], higher_x=True) == [1, 2]
    # (GFLOPs, PQ), lower GFLOPs better: (1, 50) and (2, 61); (3, 60) is beaten by (2, 61)
    assert pareto_front([1, 2, 3], [50, 61, 60], higher_x=False) == [0, 1]


def text_boxes(fig) -> list:
    """(text, window extent) of every tick label and legend entry drawn."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            span = (hi - lo) * 1e-9
            for loc, t in zip(axis.get_majorticklocs(), axis.get_majorticklabels()):
                if lo - span <= loc <= hi + span and t.get_visible() and t.get_text():  # drawn ones only
                    out.append((f"tick {t.get_text()!r}", t.get_window_extent(r)))
    for leg in [*fig.legends, *[ax.get_legend() for ax in fig.axes if ax.get_legend()]]:
        out += [(f"legend {t.get_text()!r}", t.get_window_extent(r)) for t in leg.get_texts()]
    titles = [ax.title for ax in fig.axes] + ([fig._suptitle] if fig._suptitle is not None else [])
    out += [(f"title {t.get_text()!r}", t.get_window_extent(r)) for t in titles if t.get_text()]
    return out


def outside(fig) -> list[str]:
    """Texts (ticks, legend entries, titles) that run past the figure's edges (cut off in the file)."""
    box = fig.bbox
    tol = fig.dpi / 72 * 0.5
    return [name for name, b in text_boxes(fig) if b.x0 < box.x0 - tol or b.x1 > box.x1 + tol
            or b.y0 < box.y0 - tol or b.y1 > box.y1 + tol]


def overlapping(fig) -> list[str]:
    """Pairs of tick labels / legend entries whose boxes intersect by more than half a point (Agg's text
    extents include the glyphs' side bearings: touching boxes of neighbouring labels are not an overlap)."""
    boxes = text_boxes(fig)
    tol = fig.dpi / 72 * 0.5
    bad = []
    for i, (a, ba) in enumerate(boxes):
        for b, bb in boxes[i + 1:]:
            w = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)
            h = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
            if w > tol and h > tol:
                bad.append(f"{a} / {b}")
    return bad


def test_overlap_check_catches_overlap():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.set_xticks(range(5), ["a long tick label"] * 5)
    ax.set_title("a title far too long for a figure one inch wide")
    assert overlapping(fig) and outside(fig)
    plt.close(fig)


def test_study_figures_are_readable():
    import matplotlib.pyplot as plt

    s = build_study(grid_results())
    for title, _stem, make in study_figures(s, grid_results()):
        try:
            fig = make()
        except UserError:  # the training curves need run folders
            continue
        assert fig.get_figwidth() == pytest.approx(3.3), title
        assert overlapping(fig) == [], title
        assert outside(fig) == [], title
        plt.close(fig)


def test_paper_figures_are_readable():
    import matplotlib.pyplot as plt

    from analysis.plots import component_plot, size_plot, tradeoff_plot
    from test_analysis import results

    for fig in (tradeoff_plot(results()), tradeoff_plot(results(), "GFLOPs"), size_plot(results()),
                component_plot(results())):
        assert overlapping(fig) == [] and outside(fig) == []
        plt.close(fig)


TINY = ["train.max_steps=3", "train.checkpoint_every=3", "data.synthetic_train_images=8",
        "data.synthetic_val_images=3", "data.batch_size=2", "train.batch_size=2", "train.num_points=256",
        "train.warmup_steps=1", "train.backbone_warmup_steps=1", "train.tensorboard=false", "model.img_size=64",
        "data.synthetic_image_size=64", "bench.iters=2", "bench.warmup=1"]


def test_own_grid_through_the_launcher(tmp_path, capsys):
    """model.num_queries x seed, an ablation no paper table has: `study report --all` writes the study (axis
    column, n = 2, intervals) and its figures; without --table the study is printed; a file of the user's
    is never replaced."""
    grid = tmp_path / "mine.yaml"
    grid.write_text(f"base: {REPO / 'experiments' / 'quickstart.yaml'}\nname: mine\n"
                    "grid:\n  name: queries\n  axes:\n    model.num_queries: [8, 16]\n    seed: [0, 1]\n")
    (tmp_path / "synthetic").mkdir()
    sets = [f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'synthetic'}", *TINY]
    argv = ["launch", str(grid), "--cluster", "debug", "--wait"]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    runs = tmp_path / "runs" / "queries"
    # the run folders are named by what sets them apart inside the grid, the hash kept as a suffix
    names = sorted(p.name.rsplit("-", 1)[0] for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert names == ["q16-s0", "q16-s1", "q8-s0", "q8-s1"], names
    capsys.readouterr()
    assert main(["report", str(runs)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("## Study: num_queries\n") and "| n " in printed
    out = tmp_path / "report"
    assert main(["report", str(runs), "--all", str(out), "--baseline", "num_queries=16"]) == 0
    csv = pd.read_csv(out / "study.csv")
    assert list(csv["model.num_queries"]) == [8, 16] and list(csv["n"]) == [2, 2]
    assert csv["PQ lo"].notna().all() and list(csv["PQ noise"])[1] == "reference"
    for stem in ("study_model_num_queries", "study_tradeoff_fps", "study_tradeoff_gflops", "study_curves"):
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG", stem
    index = (out / "index.md").read_text()
    assert "## Study: num_queries" in index and "[png](study_curves.png)" in index
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.md").write_text("my notes\n")
    assert main(["report", str(runs), "--all", str(mine)]) == 2
    assert "did not write" in capsys.readouterr().err and (mine / "index.md").read_text() == "my notes\n"
    assert not (mine / "study.md").exists()
