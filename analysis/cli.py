"""``study report RESULTS``: the paper's Table 1 or Table 3 and the scaling plot from a results table."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="paper tables and scaling plots from collected results",
                       description="Table 1 (stepwise removal at one size) or Table 3 (sizes), ours next to the "
                                   "paper's, from a folder of runs or the CSV of `study collect`.")
    p.add_argument("results", help="folder of runs, or results.csv")
    p.add_argument("--table", choices=["1", "3"], default="1")
    p.add_argument("--size", default="L", help="Table 1: the model size (default L)")
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--md", metavar="PATH", help="also write the table as Markdown")
    p.add_argument("--plot", metavar="PATH", help="write the scaling plot (PQ vs FPS by default) as an image")
    p.add_argument("--x", default="FPS", help="plot x axis (a results column: FPS, GFLOPs, params_M)")
    p.add_argument("--y", default="PQ", help="plot y axis (PQ, AP, mIoU)")
    p.set_defaults(func=run)


def load_results(path: str | Path):
    import pandas as pd

    from study.launch.collect import collect

    path = Path(path)
    if path.is_file():
        return pd.read_csv(path)
    return collect(path)


def run(args: argparse.Namespace) -> int:
    from analysis.tables import table1, table3, to_markdown
    from study.io import atomic_write_text

    results = load_results(args.results)
    if results.empty:
        print(f"study report: no runs in {args.results}")
        return 0
    table = table1(results, args.size, args.img_size) if args.table == "1" else table3(results, args.img_size)
    if table.empty:
        where = f"size {args.size}, {args.img_size} px" if args.table == "1" else f"{args.img_size} px"
        done = results[results["state"] == "complete"] if "state" in results else results
        have = sorted({f"{r['model.variant']} {r['model.size']} {r['model.img_size']}px"
                       for _, r in done.iterrows()}) if not done.empty else []
        print(f"study report: no complete run of a Table {args.table} model at {where} in {args.results}; "
              f"complete runs: {', '.join(have) or 'none'}")
    else:
        text = to_markdown(table)
        print(text)
        if args.md:
            atomic_write_text(args.md, text + "\n")
            print(f"wrote {args.md}")
    if args.plot and not table.empty:
        from analysis.plots import scaling_plot

        fig = scaling_plot(results, args.x, args.y, args.img_size)
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    return 0
