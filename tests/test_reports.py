"""`study report`: real run folders from the quickstart grid (tiny steps, through the real launcher and
collect), each table in Markdown, LaTeX and CSV checked against study/paper_numbers.csv, `--all`, and every
table's report code on synthesised results at the paper's own settings."""
from __future__ import annotations

import pandas as pd
import pytest

from analysis.row1_flops import PINNED
from analysis.tables import table_report, to_csv, to_latex, to_markdown
from study import paper_numbers as pn
from study.cli import main
from study.errors import UserError
from study.launch.collect import collect
from study.runs import display_name
from conftest import REPO

TINY = ["train.max_steps=3", "train.checkpoint_every=3", "data.synthetic_train_images=8",
        "data.synthetic_val_images=3", "data.batch_size=2", "train.batch_size=2", "train.num_points=256",
        "train.warmup_steps=1", "train.backbone_warmup_steps=1", "train.tensorboard=false", "model.img_size=64",
        "data.synthetic_image_size=64", "bench.iters=2"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """experiments/quickstart_grid.yaml (tiny EoMT and tiny row 2) trained, scored and timed for 3 steps."""
    root = tmp_path_factory.mktemp("quickstart")
    (root / "synthetic").mkdir()
    sets = [f"output_dir={root / 'runs'}", f"data.root={root / 'synthetic'}", *TINY]
    argv = ["launch", str(REPO / "experiments" / "quickstart_grid.yaml"), "--cluster", "debug", "--wait"]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    return root / "runs" / "grid"


def _paper(table: str) -> pd.DataFrame:
    return pn.paper_table(table)


@pytest.mark.parametrize("table", ["1", "2", "7", "C", "D"])
def test_tables_of_the_quickstart_in_three_formats(quickstart, tmp_path, table, capsys):
    out = {f: tmp_path / f"t.{f}" for f in ("md", "tex", "csv")}
    assert main(["report", str(quickstart), "--table", table, "--md", str(out["md"]), "--tex", str(out["tex"]),
                 "--csv", str(out["csv"])]) == 0
    runs = collect(quickstart)
    eomt = runs[runs["model.variant"] == "eomt"].iloc[0]
    csv = pd.read_csv(out["csv"], keep_default_na=False, na_values=[""])
    paper = _paper(table)
    published = csv[csv["group"] != "from scratch"] if table == "2" else csv
    assert list(published["row"].astype(str)) == list(paper["row"])  # every published row, in the paper's order
    metrics = [m for m in pn.METRICS if paper[m].notna().any()]
    for m in metrics:  # the paper's columns are the data file's
        assert published[f"{m} paper"].tolist() == pytest.approx(paper[m].tolist(), nan_ok=True)
    assert not any(c.startswith("Δ") for c in csv)  # tiny/64 on synthetic data: no difference to the paper
    ours = csv[csv["n"].notna()]
    # the row of what the run is: tiny EoMT has 2 query blocks (Table D row '2'), and is trained from scratch
    eomt_rows = {"1": "w/o Masking = EoMT", "2": "EoMT", "7": "Mask annealing / w/o Masking",
                 "C": "Mask annealing / w/o Masking", "D": "2"}
    line = ours[(ours["row"].astype(str) == eomt_rows[table]) &
                ((ours["group"].isin(["from scratch", "EoMT"])) if "group" in ours else True)].iloc[0]
    if table == "2":
        assert set(ours["group"]) == {"from scratch"} and line["PQ paper"] != line["PQ paper"]  # NaN: no such row
    if table == "D":
        assert set(ours["row"].astype(str)) == {"2"}
    assert line["PQ"] == pytest.approx(eomt["PQ"]) and line["n"] == 1
    assert "ours at size tiny, img_size 64, dataset synthetic" in line["notes"] or table == "2"
    assert "n = 1: none exists" in out["md"].read_text()
    if "GFLOPs" in metrics:
        assert line["GFLOPs"] == pytest.approx(eomt["GFLOPs"])
    md, tex = out["md"].read_text(), out["tex"].read_text()
    assert md.startswith(f"## Table {table}\n") and "\nMissing:\n" in md
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert md in capsys.readouterr().out  # what is printed is the Markdown
    if table == "1":  # row 2 ran too; row 1's footnote carries the pinned counts
        assert set(ours["row"]) == {"w/o Pixel decoder", "w/o Masking = EoMT"}
        row1 = csv[csv["row"] == "w/o ViT-Adapter"].iloc[0]
        for figure in (PINNED["gflops"], 700, PINNED["gflops_opaque"], PINNED["gflops_opaque_plain_fvcore"]):
            assert f"{figure:g}" in row1["notes"]
        assert "re-entrant activation checkpointing" in tex
        assert "- row 'w/o ViT-Adapter': no run" in md


def test_defaults_follow_the_results_and_nothing_to_report_fails(quickstart, tmp_path, capsys):
    assert main(["report", str(quickstart), "--table", "1", "--size", "L"]) == 2  # tiny runs only
    assert "nothing to report for Table 1 at size L" in capsys.readouterr().err
    assert main(["report", str(quickstart), "--size", "L"]) == 2
    assert "no run there" in capsys.readouterr().err
    assert main(["report", str(quickstart)]) == 0  # without --table: the study of the runs, axis model.variant
    out = capsys.readouterr().out
    assert out.startswith("## Study: variant\n") and "| w/o Pixel decoder " in out and "1 (no interval)" in out
    assert main(["report", str(quickstart), "--table", "3"]) == 2
    err = capsys.readouterr().err
    assert "nothing to report for Table 3" in err and "eomt tiny 64px" in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no runs in" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "empty"), "--all", str(tmp_path / "out")]) == 2


def test_all_writes_tables_figures_and_an_index(quickstart, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(quickstart), "--all", str(out)]) == 0
    for t in ("1", "2", "7", "C", "D"):
        for ext in ("md", "tex", "csv"):
            assert (out / f"table_{t}.{ext}").stat().st_size > 100
    assert not (out / "table_3.md").exists()
    runs = collect(quickstart)
    stems = ["fig1_pq_fps", "pq_gflops", "params_gflops_size", "components_gflops"] + \
        [f"curves_{display_name(r)}" for r in runs["run"]]  # readable names (study.runs.display_name)
    for stem in stems:
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
    index = (out / "index.md").read_text()
    threads = int(runs["metrics.bench.protocol.threads"].iloc[0])
    assert f"Times taken on: cpu, fp32, {threads} thread{'s' * (threads != 1)}" in index
    assert "[md](table_1.md)" in index and "[png](fig1_pq_fps.png)" in index
    assert "[png](components_time.png)" in index  # the pipeline records the per-component time
    for ext in ("md", "tex", "csv"):  # a paper grid gets the generic study too
        assert (out / f"study.{ext}").stat().st_size > 100
    assert "## Study: variant" in index and "[png](study_model_variant.png)" in index
    assert main(["report", str(quickstart), "--all", str(out)]) == 0  # the suite's own files: replaced
    (out / "index.md").write_text("my own notes\n")  # a file the suite did not write is never replaced
    (out / ".study-manifest.json").write_text('{"written": []}')
    assert main(["report", str(quickstart), "--all", str(out)]) == 2
    assert (out / "index.md").read_text() == "my own notes\n"


# ------------------------------------------------------------------ every table on synthesised results


def synthesised(table: str, seeds=(0, 1)) -> pd.DataFrame:
    """Two seeds of every configurable row of ``table`` at the paper's own setting: the published numbers
    minus 0.5 and plus 0.5 (FPS +1 / -1)."""
    rows = []
    for _, r in _paper(table).iterrows():
        if r["needs"]:
            continue
        keys = pn.row_keys(r)
        for seed, d in zip(seeds, (-0.5, 0.5)):
            row = {"run": f"{table}-{r['group']}-{r['row']}-{seed}", "state": "complete", "seed": seed, **keys}
            row.update({m: r[m] + d for m in ("PQ", "PQ_th", "PQ_st", "AP", "mIoU", "GFLOPs", "params_M")
                        if pd.notna(r[m])})
            if pd.notna(r["FPS"]):
                row["FPS"] = r["FPS"] + 2 * d
            rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("table", pn.TABLES)
def test_every_tables_report_at_the_papers_settings(table):
    report = table_report(synthesised(table), table)
    f, paper = report.frame, _paper(table)
    assert list(f["row"]) == list(paper["row"])
    main_metric = {"5": "mIoU", "9": "mIoU", "6": "AP"}.get(table, "PQ")
    configurable = paper["needs"] == ""
    assert (f.loc[configurable, "n"] == 2).all() and f.loc[~configurable, "n"].isna().all()
    for m in ("PQ", "AP", "mIoU", "GFLOPs"):
        if f"Δ{m}" in f:  # the mean of the two seeds is the published number
            assert f.loc[configurable, f"Δ{m}"].dropna().abs().max() < 1e-9
            assert f.loc[configurable, m].tolist() == pytest.approx(paper.loc[configurable, m].tolist(), nan_ok=True)
    std = f.loc[configurable, f"{main_metric} std"].dropna()
    assert len(std) and std.tolist() == pytest.approx([2 ** 0.5 / 2] * len(std))
    assert not report.missing
    needs = [n for n in report.notes if n.startswith("needs ")]
    assert bool(needs) == (~configurable).any()
    md, tex, csv = to_markdown(report), to_latex(report), to_csv(report)
    assert md.count("\n| ") == len(paper) + 1 and "\\bottomrule" in tex
    assert len(pd.read_csv(pd.io.common.StringIO(csv))) == len(paper)


def test_a_differing_row_shows_its_difference_and_missing_runs_are_named():
    res = synthesised("1")
    res.loc[res["model.variant"] == "eomt", "PQ"] += 1.0  # ours 57.0 vs the paper's 56.0
    res = res[res["model.variant"] != "sfp_m2f"]
    failed = {"run": "row1-crashed", "state": "failed", "error": "RuntimeError: out of memory",
              **pn.row_keys(_paper("1").iloc[1])}
    report = table_report(pd.concat([res, pd.DataFrame([failed])]), "1")
    eomt = report.frame[report.frame["row"] == "w/o Masking = EoMT"].iloc[0]
    assert eomt["ΔPQ"] == pytest.approx(1.0) and eomt["PQ"] == pytest.approx(57.0)
    assert report.missing == ["row 'w/o ViT-Adapter': row1-crashed (failed: RuntimeError: out of memory)"]


def test_several_sizes_for_one_row_ask_for_size():
    res = synthesised("1")
    small = res[res["model.variant"] == "eomt"].assign(**{"model.size": "S", "run": "eomt-S",
                                                          "model.backbone": None, "model.num_query_blocks": None})
    tiny = small.assign(**{"model.size": "tiny", "run": "eomt-tiny"})
    both = pd.concat([res, small])
    # the paper's own size wins; without it, two other sizes are ambiguous until --size picks one
    assert table_report(both, "1").frame.iloc[5]["ΔPQ"] == pytest.approx(0.0)
    with pytest.raises(UserError, match="--size"):
        table_report(pd.concat([small, tiny]), "1")
    f = table_report(pd.concat([small, tiny]), "1", size="S").frame
    assert f.iloc[5]["n"] == 2 and "ΔPQ" not in f


def test_rows_are_placed_by_what_a_run_is():
    """Table D by the run's actual number of query blocks (none of 9/6/4/2: said, not shown); Table 2 by the
    run's pre-training (from its backbone), a run without model.pretrained under 'from scratch'."""
    res = synthesised("D")
    s3 = res[res["model.num_query_blocks"] == 4].assign(**{"model.num_query_blocks": 3, "run": "l2-3"})
    report = table_report(pd.concat([res, s3]), "D")
    assert report.frame["n"].tolist() == [2, 2, 2, 2]  # the L2 = 3 runs are in no row
    assert any("l2-3" in u and "model.num_query_blocks 3" in u and "9, 6, 4, 2" in u for u in report.unplaced)
    assert "No row matches:" in to_markdown(report)
    tiny = res[res["model.num_query_blocks"] == 2].assign(**{"model.size": "tiny", "model.num_query_blocks": None,
                                                             "model.backbone": None, "run": "tiny"})  # tiny's own L2 is 2
    f = table_report(tiny, "D").frame
    assert f.loc[f["n"].notna(), "row"].tolist() == ["2"]
    t2 = synthesised("2")
    eva = t2[t2["run"].str.startswith("2-EVA-02-EoMT-")]
    tiny_eva = eva.assign(**{"model.size": "tiny", "model.backbone": "tiny_eva02", "model.pretrained": "w.pth",
                             "model.num_query_blocks": None, "run": "tiny-eva"})
    scratch = tiny_eva.assign(**{"model.backbone": None, "model.pretrained": None, "run": "tiny-scratch"})
    f = table_report(pd.concat([tiny_eva, scratch]), "2").frame
    ours = f[f["n"].notna()]
    assert list(zip(ours["group"], ours["row"])) == [("EVA-02", "EoMT"), ("from scratch", "EoMT")]
    assert pd.isna(ours.iloc[1]["PQ paper"])


def test_paper_tables_give_intervals_and_say_within_noise():
    from scipy import stats as sps

    res = synthesised("1")
    row5 = res[res["run"].str.startswith("1--w/o Masking = EoMT-")]
    res = pd.concat([res, row5.iloc[[1]].assign(run="third", seed=2, PQ=row5["PQ"].iloc[1] + 0.3)])
    report = table_report(res, "1")  # EoMT: 55.5, 56.5, 56.8 against the paper's 56.0
    eomt = report.frame[report.frame["row"] == "w/o Masking = EoMT"].iloc[0]
    lo, hi = sps.ttest_1samp([55.5, 56.5, 56.8], 0).confidence_interval(0.95)
    assert (eomt["PQ lo"], eomt["PQ hi"]) == pytest.approx((lo, hi), rel=1e-9)
    assert eomt["n"] == 3 and eomt["ΔPQ noise"] == "within noise"
    far = res.assign(PQ=res["PQ"] + 5.0)
    assert table_report(far, "1").frame.iloc[5]["ΔPQ noise"] == "beyond noise"
    md = to_markdown(report)
    assert "PQ 95% interval" in md and "within noise" in md
