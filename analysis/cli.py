"""``study report RESULTS``: the generic study of any folder of runs (analysis/study.py: the keys that vary,
mean / std / n / 95% interval over seeds, the difference to a reference group); ``--table T`` a table of the
paper (ours beside the paper's); ``--all OUT_DIR`` every paper table that matches, the generic study and every
figure, with an index. Markdown, LaTeX and CSV; no file the suite did not write is ever replaced."""
from __future__ import annotations

import argparse
from pathlib import Path

from study.errors import UserError
from study.paper_numbers import TABLES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="your study's table (or a paper table) and figures from collected results",
                       description="The study of a folder of runs (or the CSV of `study collect`): the keys that "
                                   "vary as columns, every metric as mean ± std [95% interval] over the seeds, the "
                                   "difference to a reference group (within noise or not). --table T: a table of "
                                   "the paper (1, B, 2, 3, 4, 5, 6, 7, C, D, 9), ours next to the paper's; --all: "
                                   "every paper table that has complete runs, the study and every figure.")
    p.add_argument("results", help="folder of runs, or results.csv")
    p.add_argument("--table", choices=list(TABLES), default=None,
                   help="a table of the paper instead of the study of the runs")
    p.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE",
                   help="the study's reference group (default the first; repeat to name several keys)")
    p.add_argument("--size", default=None, help="keep only runs of this model size (default: the size there is)")
    p.add_argument("--img-size", type=int, default=None, help="keep only runs at this input size")
    p.add_argument("--md", metavar="PATH", help="also write the table as Markdown")
    p.add_argument("--tex", metavar="PATH", help="also write the table as LaTeX (booktabs)")
    p.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    p.add_argument("--format", choices=["md", "tex", "csv"], default="md", help="what is printed (default md)")
    p.add_argument("--all", metavar="OUT_DIR", help="write the study, every paper table with complete runs (md, "
                                                    "tex, csv), every figure (png, pdf) and index.md into OUT_DIR")
    p.add_argument("--plot", metavar="PATH", help="write PQ vs FPS (or --x/--y) as an image")
    p.add_argument("--x", default="FPS", help="plot x axis (a results column: FPS, GFLOPs, params_M)")
    p.add_argument("--y", default="PQ", help="plot y axis (PQ, AP, mIoU)")
    p.set_defaults(func=run)


def load_results(path: str | Path):
    import pandas as pd

    from study.launch.collect import collect

    path = Path(path)
    if path.is_file():
        return pd.read_csv(path)
    if not path.exists():
        raise UserError(f"no such results folder or file: {path}")
    return collect(path)


def write_all(results, out: str | Path, source: str = "", extra=(), baseline=()) -> Path:
    """The generic study, every paper table that has complete runs and every figure under ``out``;
    ``out``/index.md shows them all (each table's Markdown inline, each figure's PNG embedded, links to every
    format), says what was not written and why, and names the machine, precision and threads the times were
    taken with. ``extra``: (title, Markdown) sections put first (``make study`` adds its count table there).
    A file under ``out`` that the suite did not write is never replaced (study/io.py's manifest)."""
    from analysis.plots import all_figures, save
    from analysis.study import build_study, study_markdown, write_study
    from analysis.study_plots import study_figures
    from analysis.tables import environment, reportable_tables, to_markdown, write_report
    from study.io import atomic_write_text, refuse_foreign

    out = Path(out)
    index = out / "index.md"
    refuse_foreign(index)  # before anything is written
    study = build_study(results, list(baseline))
    reports = reportable_tables(results)
    done = {t: r for t, r in reports.items() if not isinstance(r, str)}
    env = environment(results)
    out.mkdir(parents=True, exist_ok=True)
    study_paths = write_study(study, out / "study")
    written, skipped = [], []
    for title, stem, make in study_figures(study, results):
        try:
            written.append((title, save(make(), out / stem)))
        except UserError as e:
            skipped.append(f"{title}: {e}")
    if done:  # the paper's figures where a paper table applies
        more, more_skipped = all_figures(results, out)
        written += more
        skipped += more_skipped
    lines = [f"# Results{f' of {source}' if source else ''}", "",
             "Times taken on: " + ("; ".join(env) if env else "no time measured (bench.fps off)"), ""]
    lines += ["Contents: " + ", ".join([title for title, _ in extra] + ["the study"] + [f"Table {t}" for t in done]
                                       + [f"{len(written)} figures"]), ""]
    for title, body in extra:
        lines += [f"## {title}", "", body.rstrip(), ""]
    lines += ["## Tables", "", "- the study: " + ", ".join(f"[{p.suffix[1:]}]({p.name})" for p in study_paths)]
    for t, r in done.items():
        paths = write_report(r, out / f"table_{t}")
        lines.append(f"- Table {t}: " + ", ".join(f"[{p.suffix[1:]}]({p.name})" for p in paths)
                     + (f" ({len(r.missing)} rows or runs missing)" if r.missing else ""))
    not_done = [t for t in reports if t not in done]
    if not_done:
        lines += ["", "Not written: " + ", ".join(f"Table {t}" for t in not_done) + " (no complete run matches "
                  "one of their rows)"]
    lines += [""] + [("#" + line) if line.startswith("#") else line for line in study_markdown(study).splitlines()]
    for t, r in done.items():  # each table shown, one heading level down
        lines += [""] + [("#" + line) if line.startswith("#") else line for line in to_markdown(r).splitlines()]
    lines += ["", "## Figures", ""]
    lines += [f"- {title}: " + ", ".join(f"[{p.suffix[1:]}]({p.name})" for p in paths) for title, paths in written]
    if skipped:
        lines += ["", "Not drawn:"] + [f"- {s}" for s in skipped]
    for title, paths in written:
        png = next((p for p in paths if p.suffix == ".png"), paths[0])
        lines += ["", f"### {title}", "", f"![{title}]({png.name})"]
    atomic_write_text(index, "\n".join(lines) + "\n", guard=True)
    return index


def run(args: argparse.Namespace) -> int:
    from analysis.tables import table_report, to_csv, to_latex, to_markdown
    from study.io import atomic_write_text

    results = load_results(args.results)
    if results.empty:
        raise UserError(f"nothing to report: no runs in {args.results}")
    if args.all:
        index = write_all(results, args.all, str(args.results), baseline=args.baseline)
        print(index.read_text())
        print(f"wrote {index}")
        return 0
    if args.table is None:
        import pandas as pd

        from analysis.study import build_study, study_csv, study_latex, study_markdown

        runs = results
        if args.size is not None and "model.size" in runs:
            runs = runs[runs["model.size"] == args.size]
        if args.img_size is not None and "model.img_size" in runs:
            runs = runs[pd.to_numeric(runs["model.img_size"], errors="coerce") == args.img_size]
        if runs.empty:
            raise UserError(f"nothing to report in {args.results} at size {args.size or 'any'}, input "
                            f"{args.img_size or 'any'}: no run there")
        report = build_study(runs, args.baseline)
        writers = {"md": study_markdown, "tex": study_latex, "csv": study_csv}
    else:
        report = table_report(results, args.table, args.size, args.img_size)
        writers = {"md": to_markdown, "tex": to_latex, "csv": to_csv}
    print(writers[args.format](report), end="")
    for fmt in ("md", "tex", "csv"):
        path = getattr(args, fmt)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, writers[fmt](report), guard=True)
            print(f"wrote {path}")
    if args.plot:
        import matplotlib.pyplot as plt

        from analysis.plots import tradeoff_plot
        from study.io import record_written, refuse_foreign

        path = Path(args.plot)
        refuse_foreign(path)
        fig = tradeoff_plot(results, args.x, args.y)
        fig.savefig(path, dpi=300)
        plt.close(fig)
        record_written(path)
        print(f"wrote {path}")
    return 0
