"""``study report RESULTS``: any table of the paper (ours beside the paper's, with the difference) in
Markdown, LaTeX and CSV, the figures, or everything at once (``--all OUT_DIR``) with an index."""
from __future__ import annotations

import argparse
from pathlib import Path

from study.errors import UserError
from study.paper_numbers import TABLES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="paper tables and figures from collected results",
                       description="A table of the paper (1, B, 2, 3, 4, 5, 6, 7, C, D, 9), ours next to the "
                                   "paper's, from a folder of runs or the CSV of `study collect`; or with "
                                   "--all every table that has complete runs and every figure.")
    p.add_argument("results", help="folder of runs, or results.csv")
    p.add_argument("--table", choices=list(TABLES), default="1")
    p.add_argument("--size", default=None, help="keep only runs of this model size (default: the size there is)")
    p.add_argument("--img-size", type=int, default=None, help="keep only runs at this input size")
    p.add_argument("--md", metavar="PATH", help="also write the table as Markdown")
    p.add_argument("--tex", metavar="PATH", help="also write the table as LaTeX (booktabs)")
    p.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    p.add_argument("--format", choices=["md", "tex", "csv"], default="md", help="what is printed (default md)")
    p.add_argument("--all", metavar="OUT_DIR", help="write every table with complete runs (md, tex, csv), every "
                                                    "figure (png, pdf) and index.md into OUT_DIR")
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


def write_all(results, out: str | Path, source: str = "", extra=()) -> Path:
    """Every table that has complete runs and every figure under ``out``; ``out``/index.md shows them all
    (each table's Markdown inline, each figure's PNG embedded, links to every format), says what was not
    written and why, and names the machine, precision and threads the times were taken with. ``extra``:
    (title, Markdown) sections put before the tables (``make study`` adds its count table there)."""
    from analysis.plots import all_figures
    from analysis.tables import environment, reportable_tables, to_markdown, write_report
    from study.io import atomic_write_text

    out = Path(out)
    reports = reportable_tables(results)
    done = {t: r for t, r in reports.items() if not isinstance(r, str)}
    if not done:
        raise UserError(f"nothing to report in {source or 'the results'}: no complete run matches a row of any "
                        f"table ({reports['1']})")
    env = environment(results)
    written, skipped = all_figures(results, out)
    lines = [f"# Results{f' of {source}' if source else ''}", "",
             "Times taken on: " + ("; ".join(env) if env else "no time measured (bench.fps off)"), ""]
    lines += ["Contents: " + ", ".join([title for title, _ in extra] + [f"Table {t}" for t in done]
                                       + [f"{len(written)} figures"]), ""]
    for title, body in extra:
        lines += [f"## {title}", "", body.rstrip(), ""]
    lines += ["## Tables", ""]
    for t, r in done.items():
        paths = write_report(r, out / f"table_{t}")
        lines.append(f"- Table {t}: " + ", ".join(f"[{p.suffix[1:]}]({p.name})" for p in paths)
                     + (f" ({len(r.missing)} rows or runs missing)" if r.missing else ""))
    not_done = [t for t in reports if t not in done]
    if not_done:
        lines += ["", "Not written: " + ", ".join(f"Table {t}" for t in not_done) + " (no complete run matches "
                  "one of their rows)"]
    for t, r in done.items():  # each table shown, one heading level down
        lines += [""] + [("#" + line) if line.startswith("#") else line for line in to_markdown(r).splitlines()]
    lines += ["", "## Figures", ""]
    lines += [f"- {title}: " + ", ".join(f"[{p.suffix[1:]}]({p.name})" for p in paths) for title, paths in written]
    if skipped:
        lines += ["", "Not drawn:"] + [f"- {s}" for s in skipped]
    for title, paths in written:
        png = next((p for p in paths if p.suffix == ".png"), paths[0])
        lines += ["", f"### {title}", "", f"![{title}]({png.name})"]
    index = out / "index.md"
    atomic_write_text(index, "\n".join(lines) + "\n")
    return index


def run(args: argparse.Namespace) -> int:
    from analysis.tables import table_report, to_csv, to_latex, to_markdown
    from study.io import atomic_write_text

    results = load_results(args.results)
    if results.empty:
        raise UserError(f"nothing to report: no runs in {args.results}")
    if args.all:
        index = write_all(results, args.all, str(args.results))
        print(index.read_text())
        print(f"wrote {index}")
        return 0
    report = table_report(results, args.table, args.size, args.img_size)
    writers = {"md": to_markdown, "tex": to_latex, "csv": to_csv}
    print(writers[args.format](report), end="")
    for fmt in ("md", "tex", "csv"):
        path = getattr(args, fmt)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, writers[fmt](report))
            print(f"wrote {path}")
    if args.plot:
        from analysis.plots import tradeoff_plot

        stem = Path(args.plot)
        fig = tradeoff_plot(results, args.x, args.y)
        fig.savefig(stem, dpi=300)
        print(f"wrote {stem}")
    return 0
