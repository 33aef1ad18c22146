"""The paper's tables from the results table (study/launch/collect.py): pure functions of a DataFrame.

A run belongs to a row of a table when its resolved configuration keys (study/paper_numbers.py) equal the
row's. The keys that tell the table's rows apart must match exactly; the scale and data keys that do not
(model size, input size, data set, number of classes and queries; e.g. the quickstart's tiny EoMT on
synthetic data against Table 1 row 5) may differ: the row then shows our numbers beside the paper's with a
footnote, and no difference. Runs of one model that differ only in their seed are averaged (``n`` and the
standard deviation of the table's main metric). Every published row is listed, ours blank where no complete
run exists; what is missing is listed by run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from study.errors import UserError
from study.paper_numbers import METRICS as PAPER_METRICS
from study.paper_numbers import TABLES, config_columns, paper_table, row_keys, run_keys

KEY = ["model.variant", "model.size", "model.img_size"]
METRICS = ["params_M", "GFLOPs", "FPS", "PQ", "PQ_th", "PQ_st", "AP", "mIoU"]
# Table 1 order (docs/paper.md section 2): row 0 (ViT-Adapter + Mask2Former) to row 5 (EoMT).
TABLE1 = ["vit_adapter_m2f", "sfp_m2f", "sfp_no_pixel_decoder", "single_scale", "eomt_masked", "eomt"]
SIZES = ["g", "L", "B", "S", "tiny"]
# Keys of scale and data that may differ between a run and the row it reproduces (footnoted, no difference),
# unless they are what tells the table's rows apart.
SCALE_KEYS = ("model.size", "model.img_size", "data.dataset", "model.num_classes", "model.num_queries")

# Columns of the results table that are not configuration keys (study/launch/collect.py), and configuration
# keys that do not tell two models apart: a table row averages the runs that differ only in these.
_NOT_CONFIG = {"run", "path", "state", "step", "total_steps", "job_id", "error", "n", *METRICS}
_REPEATS = ("seed", "name", "output_dir")
_REPEAT_SECTIONS = ("launch.", "bench.", "eval.", "metrics.")


def identity_columns(results: pd.DataFrame) -> list[str]:
    """Configuration columns that make two runs different models (everything but the seed, names, places,
    and the launch, benchmark and evaluation settings), in table order."""
    return [c for c in results.columns if c not in _NOT_CONFIG and c not in _REPEATS
            and not c.startswith(_REPEAT_SECTIONS) and not c.endswith("_std")]


def complete(results: pd.DataFrame) -> pd.DataFrame:
    return results[results["state"] == "complete"] if "state" in results else results


def summarize(results: pd.DataFrame, main: str = "PQ") -> pd.DataFrame:
    """One row per model: the mean of every metric over the complete runs that differ only in their seed (or
    launch / benchmark / evaluation settings), ``n`` runs and ``<main>_std``. Besides variant, size and input
    size, the configuration keys that differ between rows are kept as columns (e.g. ``model.num_query_blocks``
    of Table D), so no two different models are ever averaged together; ``runs`` lists the run names."""
    missing = [k for k in KEY if k not in results]
    if missing:
        raise UserError(f"the results table has no column(s) {missing}: is it the output of `study collect`?")
    done = complete(results)
    metrics = [m for m in METRICS if m in done]
    identity = identity_columns(done)
    if done.empty:
        return pd.DataFrame(columns=KEY + metrics + ["n"])
    grouped = done.groupby(identity, sort=False, dropna=False)
    out = grouped[metrics].mean()
    out["n"] = grouped.size()
    if main in done:
        out[f"{main}_std"] = grouped[main].std(ddof=1)  # NaN for a single seed
    if "run" in done:
        out["runs"] = grouped["run"].agg(lambda r: ", ".join(map(str, r)))
    out = out.reset_index()
    varying = [c for c in identity if c not in KEY and out[c].nunique(dropna=False) > 1]
    return out[KEY + varying + [c for c in out.columns if c not in identity]]


# ------------------------------------------------------------------------------------------- matching


def _marked(keys: dict, exact: frozenset = frozenset()) -> dict:
    """Resolved keys with the size-dependent defaults (the size's DINOv2 backbone and L2) written as
    'default', so that a ViT-S run and a ViT-L row compare equal on them when both take their size's; a key
    in ``exact`` keeps its value (Table D: a tiny EoMT's 2 query blocks are row '2', not the default L2 row)."""
    from study.models.backbone import SIZES as SPECS

    out = dict(keys)
    spec = SPECS.get(out.get("model.size"))
    if spec is not None:
        if out.get("model.backbone") == spec.backbone and "model.backbone" not in exact:
            out["model.backbone"] = "default"
        if out.get("model.num_query_blocks") == spec.query_blocks and "model.num_query_blocks" not in exact:
            out["model.num_query_blocks"] = "default"
    return out


# Table 2's pre-trainings (docs/paper.md section 3) by a word of the timm name (our mapping; the tiny
# stand-ins tiny_eva02 / tiny_deit3 / tiny_dinov3 follow their names, a DeiT III without 'in22k' is IN1K).
FAMILIES = (("dinov3", "DINOv3"), ("dinov2", "DINOv2"), ("eva02", "EVA-02"), ("in22k", "IN21K"),
            ("deit3", "IN1K"))
SCRATCH = "from scratch"


def backbone_family(name) -> str:
    """The pre-training of a backbone (``model.backbone``, 'default' = the size's DINOv2)."""
    if name in (None, "default"):
        return "DINOv2"
    return next((family for word, family in FAMILIES if word in str(name)), str(name))


def from_scratch(run: pd.Series) -> bool:
    """A run with no ``model.pretrained`` (its backbone starts from random weights; the suite never
    downloads): known only where the results table has the column (collected run folders do)."""
    if "model.pretrained" not in run.index:
        return False
    v = run["model.pretrained"]
    return v is None or (isinstance(v, float) and pd.isna(v)) or v == ""


def _same(key: str, a, b, by_family: bool) -> bool:
    return backbone_family(a) == backbone_family(b) if by_family and key == "model.backbone" else a == b


def main_metric(table: str) -> str:
    p = paper_table(table)
    for m in ("PQ", "AP", "mIoU"):
        if p[m].notna().any():
            return m
    return "PQ"


@dataclass
class Report:
    """One table: ``frame`` (one line per published row, ours | paper | difference per metric), the numeric
    ``data`` behind it, ``notes`` (footnotes, numbered as in the frame's ``notes`` column) and ``missing``."""
    table: str
    title: str
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)  # runs of the table's kind whose setting has no row


def _describe(r: pd.Series) -> str:
    return f"{r.get('run', '?')} ({r.get('state', '?')}" + (f": {r['error']}" if isinstance(r.get("error"), str)
                                                              and r.get("error") else "") + ")"


def _scale(keys: dict, loose: list[str]) -> str:
    return ", ".join(f"{k.split('.')[-1]} {keys[k]}" for k in loose)


def table_report(results: pd.DataFrame, table: str, size: str | None = None,
                 img_size: int | None = None) -> Report:
    """The report of ``table`` (one of study.paper_numbers.TABLES) from ``results``; ``size`` / ``img_size``
    keep only the runs at that model or input size. Raises UserError when there is nothing to report."""
    table = str(table)
    paper = paper_table(table)
    if results.empty or "model.variant" not in results:
        raise UserError("nothing to report: the results table has no runs")
    runs = results
    if size is not None:
        runs = runs[runs["model.size"] == size]
    if img_size is not None:
        runs = runs[pd.to_numeric(runs["model.img_size"]) == int(img_size)]
    runs = runs.reset_index(drop=True)  # one label per run (a concatenated table may repeat labels)
    configurable = [i for i, r in paper.iterrows() if r["needs"] == ""]
    raw = {i: row_keys(paper.loc[i]) for i in configurable}
    varying = {k for k in config_columns() if len({str(_marked(c)[k]) for c in raw.values()}) > 1}
    exact_keys = frozenset({"model.num_query_blocks", "model.backbone"} & varying)  # what tells rows apart
    row_cfg = {i: _marked(raw[i], exact_keys) for i in configurable}
    loose = [k for k in SCALE_KEYS if k not in varying]
    run_cfg = {j: _marked(run_keys(r), exact_keys) for j, r in runs.iterrows()}
    by_family = "model.backbone" in varying  # Table 2: the group is the run's pre-training
    match: dict[int, list] = {i: [] for i in configurable}
    scratch: dict[int, list] = {i: [] for i in configurable}
    unplaced: list[str] = []
    for j, keys in run_cfg.items():
        alone = by_family and from_scratch(runs.loc[j])
        same = [k for k in keys if k not in loose and not (alone and k == "model.backbone")]
        hit = next((i for i in configurable if all(_same(k, keys[k], row_cfg[i][k], by_family) for k in same)),
                   None)
        if hit is not None:
            (scratch if alone else match)[hit].append(j)
            continue
        near = [i for i in configurable if all(_same(k, keys[k], row_cfg[i][k], by_family) for k in same
                                               if k not in varying)]
        if near and runs.loc[j].get("state") == "complete":  # of this table's kind, but no row has its value
            off = [k for k in varying if all(not _same(k, keys[k], row_cfg[i][k], by_family) for i in near)]
            have = ", ".join(f"{k} {keys[k]}" for k in off)
            rows = ", ".join(dict.fromkeys(str(paper.loc[i, "row"]) for i in near))
            unplaced.append(f"run {runs.loc[j].get('run', j)}: {have}: no row of Table {table} has it "
                            f"(rows: {rows}); not shown")
    metrics = [m for m in PAPER_METRICS if paper[m].notna().any()]
    main = main_metric(table)
    notes: list[str] = []
    missing: list[str] = []
    lines = []

    def note(text: str) -> int:
        if text not in notes:
            notes.append(text)
        return notes.index(text) + 1

    matched_any = False
    grouped = paper["group"].ne("").any()
    extra = []  # (paper row index, run indices) of the runs from scratch (Table 2), after the paper's rows
    for i, prow in paper.iterrows():
        line = {"group": prow["group"], "row": prow["row"]} if grouped else {"row": prow["row"]}
        label = f"'{prow['group']} / {prow['row']}'" if grouped else f"'{prow['row']}'"
        marks = []
        ours, exact, done = None, False, None
        if prow["needs"]:
            marks.append(note(f"needs {prow['needs']}: the paper's numbers only"))
        else:
            done = complete(runs.loc[match[i]])
            others = runs.loc[[j for j in match[i] if j not in done.index]]
            if scratch[i]:
                extra.append((i, scratch[i]))
            if not done.empty:
                exact_runs = [j for j in done.index if all(run_cfg[j][k] == row_cfg[i][k] for k in loose)]
                if exact_runs:  # runs at the paper's own setting win over runs at another size
                    done = done.loc[exact_runs]
                ours = _one_model(done, main, table, label)
                matched_any = True
                keys = run_cfg[done.index[0]]
                off = [k for k in loose if keys[k] != row_cfg[i][k]]
                exact = not off
                if off:
                    marks.append(note(f"ours at {_scale(keys, off)}; the paper's at "
                                      f"{_scale(row_cfg[i], off)}: no difference shown"))
                for _, r in others.iterrows():
                    missing.append(f"row {label}: run {_describe(r)} not complete, not averaged")
            else:
                what = ", ".join(_describe(r) for _, r in others.iterrows()) or "no run"
                missing.append(f"row {label}: {what}")
        if prow["note"] == "row1":
            marks.append(note(_row1_note(prow["GFLOPs"])))
        elif prow["note"]:
            marks.append(note(prow["note"]))
        _fill(line, ours, done, prow, metrics, main, exact)
        line["notes"] = ",".join(map(str, marks))
        lines.append(line)
    for i, js in extra:
        done = complete(runs.loc[js])
        if done.empty:
            continue
        prow = paper.loc[i]
        label = f"'{SCRATCH} / {prow['row']}'"
        ours = _one_model(done, main, table, label)
        matched_any = True
        line = {"group": SCRATCH, "row": prow["row"]}
        _fill(line, ours, done, prow, metrics, main, exact=False, paper=False)
        line["notes"] = str(note("trained from scratch (no model.pretrained): the paper has no such row"))
        lines.append(line)
    if not matched_any:
        have = complete(results)
        names = ", ".join(f"{r['run']} ({r['model.variant']} {r['model.size']} {r['model.img_size']}px)"
                          for _, r in have.iterrows()) if "run" in have else ""
        where = "".join([f" at size {size}" if size else "", f" at {img_size} px" if img_size else ""])
        raise UserError(f"nothing to report for Table {table}{where}: no complete run matches one of its rows "
                        f"(study/paper_numbers.csv); complete runs: {names or 'none'}")
    frame = pd.DataFrame(lines).astype({"n": "Int64"})
    frame = frame[[c for c in frame.columns if not (c.startswith("Δ") and frame[c].isna().all())]]
    if "FPS" in metrics and frame["FPS"].notna().any():
        note(f"FPS: ours {', '.join(environment(runs)) or 'as recorded'}; the paper's on one H100 "
             f"(docs/paper.md section 8)")
    note(f"n: seeds averaged; {main} std and 95% interval over them (Student's t; n = 1: none exists); "
         f"'within noise': the paper's {main} lies inside our interval")
    return Report(table, f"Table {table}", frame, notes, missing, environment(runs), unplaced)


def _one_model(done: pd.DataFrame, main: str, table: str, label: str) -> pd.Series:
    models = summarize(done, main)
    if len(models) > 1:
        raise UserError(f"Table {table} row {label} matches runs of {len(models)} configurations "
                        f"({'; '.join(models['runs'])}): keep one with --size / --img-size or report a "
                        f"folder holding one of them")
    return models.iloc[0]


def _fill(line: dict, ours, done, prow, metrics: list[str], main: str, exact: bool, paper: bool = True) -> None:
    """Ours | paper | difference per metric, then n, the main metric's std and 95% interval over the seeds,
    and whether its difference to the paper's number lies within that noise (one-sample t: the paper gives
    no spread)."""
    from analysis.stats import against_value, describe, noise_word

    for m in metrics:
        value = None if ours is None else ours.get(m)
        value = None if value is None or pd.isna(value) else float(value)
        published = None if not paper or pd.isna(prow[m]) else float(prow[m])
        line[m] = value
        line[f"{m} paper"] = published
        line[f"Δ{m}"] = value - published if exact and value is not None and published is not None else None
    line["n"] = None if ours is None else int(ours["n"])
    st = describe(pd.to_numeric(done[main], errors="coerce")) if ours is not None and main in done else None
    line[f"{main} std"] = None if st is None or st.n < 2 else st.std
    line[f"{main} lo"] = None if st is None or not st.has_interval else st.lo
    line[f"{main} hi"] = None if st is None or not st.has_interval else st.hi
    published = None if not paper or pd.isna(prow[main]) else float(prow[main])
    line[f"Δ{main} noise"] = (noise_word(against_value(st, published))
                              if exact and st is not None and published is not None else None)


def _row1_note(paper_gflops: float) -> str:
    from analysis.row1_flops import footnote

    return footnote(paper_gflops)


def environment(results: pd.DataFrame, short: bool = False) -> list[str]:
    """How the times of ``results``' complete runs were taken: one line per distinct (device, GPU, precision,
    threads, torch) of their benchmark protocol (metrics.bench.protocol.*); ``short``: device, GPU, precision
    and threads only (a figure's caption)."""
    done = complete(results)
    cols = {k: f"metrics.bench.protocol.{k}" for k in ("device", "gpu", "precision", "threads", "compile",
                                                         "torch")}
    if cols["device"] not in done:
        return []
    seen = []
    for _, r in done.iterrows():
        get = {k: r.get(c) for k, c in cols.items()}
        # the speed protocol records versions and the device's name in metrics.bench.env (study/bench/speed.py)
        for key, env_key in (("torch", "torch"), ("gpu", "device_name")):
            value = r.get(f"metrics.bench.env.{env_key}")
            if isinstance(value, str) and (key != "gpu" or str(get["device"]).startswith("cuda")):
                get[key] = value
        if get["device"] is None or pd.isna(get["device"]):
            continue
        gpu = get["gpu"] if isinstance(get["gpu"], str) else None
        host = r.get("metrics.bench.host")
        n = int(get["threads"])
        text = f"{get['device']}" + (f" ({gpu})" if gpu else "") + f", {get['precision']}, {n} thread{'s' * (n != 1)}"
        if not short:
            text = (text + (", torch.compile" if get["compile"] is True else "") + f", torch {get['torch']}"
                    + (f", host {host}" if isinstance(host, str) else ""))
        if text not in seen:
            seen.append(text)
    return seen


def reportable_tables(results: pd.DataFrame) -> dict[str, Report | str]:
    """Every table's report, or the reason it has none."""
    out: dict[str, Report | str] = {}
    for t in TABLES:
        try:
            out[t] = table_report(results, t)
        except UserError as e:
            out[t] = str(e)
    return out


# ------------------------------------------------------------------------------------------- writers


PERCENT = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")


def _cell(v, column: str, digits: int = 1) -> str:
    """Percentages to ``digits`` decimals as the paper prints them; counts and speeds to 0 decimals from 100,
    ``digits`` from 1 and 3 significant digits below (a tiny model's 0.30 M parameters stay readable)."""
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "-"
    if not isinstance(v, float):
        return str(v)
    if column.split(" ")[0] in PERCENT or abs(v) >= 1 and abs(v) < 100:
        return f"{v:.{digits}f}"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def display_frame(report: Report, digits: int = 1) -> pd.DataFrame:
    """The report's frame as text cells (numbers rounded to ``digits``, '-' where missing, differences
    signed); the Markdown and LaTeX writers print this."""
    f = report.frame.copy()
    out = pd.DataFrame(index=f.index)
    for c in f.columns:
        if c.endswith(" hi") and c[:-3] + " lo" in f:
            continue
        if c.endswith(" lo") and c[:-3] + " hi" in f:
            hi = f[c[:-3] + " hi"]
            out[c[:-3] + " 95% interval"] = [
                ("-" if pd.isna(n) else "none (n = 1)") if lo is None or pd.isna(lo)
                else f"[{_cell(float(lo), c, digits)}, {_cell(float(h), c, digits)}]"
                for lo, h, n in zip(f[c], hi, f["n"])]
        elif c.endswith(" noise"):
            out[c] = ["-" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v) for v in f[c]]
        elif c.startswith("Δ"):
            out[c] = [("-" if v is None or pd.isna(v) else f"{v:+.{digits}f}") for v in f[c]]
        elif c == "n":
            out[c] = ["-" if v is None or pd.isna(v) else str(int(v)) for v in f[c]]
        elif c in ("row", "group", "notes"):
            out[c] = f[c].astype(str)
        else:
            out[c] = [_cell(v, c, digits) for v in f[c]]
    return out


def to_markdown(report: Report) -> str:
    """A titled GitHub table (pandas' writer, through tabulate), then the footnotes, what is missing, and
    how the times were taken."""
    lines = [f"## {report.title}", "", display_frame(report).to_markdown(index=False, disable_numparse=True), ""]
    lines += [f"{i}. {n}" for i, n in enumerate(report.notes, 1)]
    if report.missing:
        lines += ["", "Missing:"] + [f"- {m}" for m in report.missing]
    if report.unplaced:
        lines += ["", "No row matches:"] + [f"- {m}" for m in report.unplaced]
    return "\n".join(lines).rstrip() + "\n"


def to_latex(report: Report) -> str:
    """A booktabs tabular (pandas' Styler), then the footnotes as a small paragraph."""
    d = display_frame(report)
    styler = d.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    text = styler.to_latex(hrules=True, column_format="l" * (1 + ("group" in d)) + "r" * (len(d.columns) - 1
                                                                                          - ("group" in d)))
    notes = [f"\\textsuperscript{{{i}}} {_latex_text(n)}" for i, n in enumerate(report.notes, 1)]
    text = text.replace("Δ", r"$\Delta$")
    return f"% {report.title} (study report)\n" + text + ("\\par{\\footnotesize " + " \\\\\n".join(notes) + "}\n"
                                                           if notes else "")


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
          "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_text(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def to_csv(report: Report) -> str:
    """The numbers unrounded (pandas' writer); the notes column holds the footnotes' text."""
    f = report.frame.copy()
    f["notes"] = ["; ".join(report.notes[int(k) - 1] for k in marks.split(",") if k) for marks in f["notes"]]
    return f.to_csv(index=False)


def write_report(report: Report, stem) -> list:
    """Write ``stem``.md, .tex and .csv; returns the paths."""
    from pathlib import Path

    from study.io import atomic_write_text

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, text in (("md", to_markdown(report)), ("tex", to_latex(report)), ("csv", to_csv(report))):
        path = stem.with_name(f"{stem.name}.{ext}")
        atomic_write_text(path, text, guard=True)  # never over a file the suite did not write
        paths.append(path)
    return paths
