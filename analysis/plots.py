"""Figures from the results table alone (study/launch/collect.py), sized for a paper column (3.3 in wide).

Each function returns a matplotlib Figure; :func:`save` writes it as PNG and PDF. Nothing here trains or
measures. Ours are filled markers with solid lines, the paper's hollow markers with dashed lines, one colour
per variant.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.names import file_stem, run_name
from analysis.tables import complete, environment, summarize
from study.errors import UserError

WIDTH = 3.3  # inches: one column of a two-column paper
UNITS = {"FPS": "FPS (images/s, batch 1)", "GFLOPs": "GFLOPs per image", "params_M": "parameters (M)",
         "PQ": "PQ (%)", "AP": "AP (%)", "mIoU": "mIoU (%)"}
SIZE_ORDER = ["tiny", "S", "B", "L", "g"]  # left to right on a size axis


def _style():
    import matplotlib.pyplot as plt  # headless, matplotlib falls back to Agg by itself; notebooks stay inline

    plt.rcParams.update({"font.size": 7, "axes.titlesize": 7, "legend.fontsize": 6, "xtick.labelsize": 6,
                         "ytick.labelsize": 6, "axes.labelsize": 7})
    return plt


def _registry() -> dict:
    from study.models.build import variants

    return variants()


def variant_label(variant: str) -> str:
    """A variant's label, from its record in the registry (study/models/build.py); its name if unregistered."""
    v = _registry().get(variant)
    return v.label if v is not None else str(variant)


def _colour(variant: str) -> str:
    """One colour per registered variant (its place in the registry: Table 1 order first)."""
    order = list(_registry())
    return f"C{(order.index(variant) if variant in order else len(order)) % 10}"


def component_colour(component: str) -> str:
    """One colour per component in every figure (the registry's list of all components, 'other' last)."""
    from study.models.build import all_components

    order = all_components()
    cmap = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
            "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2"]
    if component == "other":
        return "#7f7f7f"
    i = order.index(component) if component in order else len(order)
    return cmap[i % len(cmap)]


def _variants(names) -> list[str]:
    names = set(names)
    order = list(_registry())
    return [v for v in order if v in names] + sorted(names - set(order))


def _by_size(d: pd.DataFrame) -> pd.DataFrame:
    return d.assign(_o=d["model.size"].map(lambda z: SIZE_ORDER.index(z) if z in SIZE_ORDER else -1)) \
        .sort_values("_o").drop(columns="_o")


def paper_points(img_size: int = 640, task: str = "panoptic", tables=("3",)) -> pd.DataFrame:
    """The paper's models at ``img_size`` (Table 3 by default: the three models through the sizes, COCO, H100
    FPS; add "1" for the other rows of Table 1 at L), one row per (variant, size)."""
    from study.paper_numbers import paper_rows

    rows = paper_rows()
    rows = rows[rows["table"].isin(list(tables)) & (rows["task"] == task) & (rows["model.variant"] != "")]
    rows = rows.assign(**{"model.img_size": rows["model.img_size"].astype(int)})
    return rows[rows["model.img_size"] == img_size].drop_duplicates(["model.variant", "model.size"])


def ours(results: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    s = summarize(results)
    for axis in (x, y):
        if axis not in s or s[axis].isna().all():
            raise UserError(f"no '{axis}' values to plot: complete runs that measured it are needed")
    return s.dropna(subset=[x, y])


def _fps_caption(results: pd.DataFrame) -> str:
    env = environment(results, short=True)
    return ("ours: " + "; ".join(env)) if env else "ours: device not recorded"


def _legend_below(fig, ax, rows_per_col: int | None = None) -> None:
    """The legend under the axes (it never hides a point at column width): two columns, one where a label is
    too long for half the width; the axes shrink to leave it room."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    ncol = 2 if max(len(label) for label in labels) <= 26 else 1
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, fontsize=5.5)
    fig.canvas.draw()
    height = fig.legends[0].get_window_extent().height / fig.dpi
    fig.tight_layout(rect=(0, (height + 0.05) / fig.get_figheight(), 1, 1))


def series(data: pd.DataFrame, along: tuple[str, ...] = ("model.size",)) -> list[tuple[str, str, pd.DataFrame]]:
    """``data`` (rows of :func:`analysis.tables.summarize`) split into lines that run ``along`` the given
    columns (the model size): (variant, what else sets the line apart, its rows in size order). Rows of one
    variant that differ in another setting (Table 7's ``model.mask_setting``, Table D's L2, the input size)
    are separate lines, never joined; the second element names the settings that are not the variant's
    default ("" for the variant's default line)."""
    keys = [c for c in data.columns if c.startswith("model.") and c != "model.variant" and c not in along]
    out = []
    for variant in _variants(data["model.variant"]):
        d = data[data["model.variant"] == variant]
        differ = [c for c in keys if d[c].nunique(dropna=False) > 1]
        if not differ:
            out.append((variant, "", _by_size(d)))
            continue
        for values, part in d.groupby(differ, sort=False, dropna=False):
            values = values if isinstance(values, tuple) else (values,)
            # a setting left at the variant's default (NaN) is not named; mask_setting by its value alone
            name = ", ".join(str(v) if c == "model.mask_setting" else f"{c.removeprefix('model.')} {v}"
                             for c, v in zip(differ, values) if not pd.isna(v))
            out.append((variant, name, _by_size(part)))
    return out


MARKERS = "osD^v<>p"  # the lines of one variant (one colour) that differ in a setting


def _our_lines(data: pd.DataFrame):
    """(variant, legend label, marker, rows) of each of our lines (:func:`series`), a marker per line of a
    variant."""
    seen: dict[str, int] = {}
    for variant, setting, d in series(data):
        k = seen[variant] = seen.get(variant, -1) + 1
        yield (variant, variant_label(variant) + (f" {setting}" if setting else "") + " (ours)",
               MARKERS[k % len(MARKERS)], d)


def _log_axis(axis, lo: float | None = None, hi: float | None = None) -> None:
    """A log axis with plain numbers: at 1, 2 and 5 per decade over at most about a decade and a half, at each
    power of ten over a wider range (2x10^1 labels of the minor ticks, or 1-2-5 labels over several decades,
    run into each other at column width)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    wide = lo is not None and hi is not None and lo > 0 and hi / lo > 30
    axis.set_major_locator(LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def tradeoff_plot(results: pd.DataFrame, x: str = "FPS", y: str = "PQ", paper: bool = True,
                  img_size: int = 640):
    """``y`` against ``x`` through the sizes, one line per variant and setting (:func:`series`). With ``paper``
    two panels side by side, ours (left, on our device and data) and the paper's points at ``img_size`` (right,
    one H100, COCO): they never share axes, since a tiny model on a CPU and the paper's on an H100 do not
    compare point by point. Points are labelled by size (ours: size/input when there is more than one). The
    paper's Figure 1 is ``x="FPS"``; our panel's title names the device and precision of our FPS."""
    plt = _style()
    data = ours(results, x, y)
    p = paper_points(img_size) if paper else None
    fig, axes = plt.subplots(1, 2 if paper else 1, figsize=(WIDTH, 2.9), squeeze=False)
    ax = axes[0, 0]
    where = {f"{r['model.size']}/{int(r['model.img_size'])}" for _, r in data.iterrows()}
    entries: dict[str, object] = {}
    for variant, label, marker, d in _our_lines(data):
        (h,) = ax.plot(d[x], d[y], marker=marker, ms=3.5, lw=1, color=_colour(variant), label=label)
        entries[label.removesuffix(" (ours)")] = h
        if len(where) > 1:
            for _, r in d.iterrows():
                ax.annotate(f"{r['model.size']}/{int(r['model.img_size'])}", (r[x], r[y]),
                            textcoords="offset points", xytext=(2, 2), fontsize=4.5)
    panels = [(ax, data)]
    if paper:
        right = axes[0, 1]
        for variant in _variants(p["model.variant"]):
            d = _by_size(p[p["model.variant"] == variant]).dropna(subset=[x, y])
            if d.empty:
                continue
            (h,) = right.plot(d[x], d[y], marker="o", ms=3.5, lw=0.8, ls="--", mfc="none", color=_colour(variant),
                              label=f"{variant_label(variant)} (paper)")
            entries.setdefault(variant_label(variant), h)
            for _, r in d.iterrows():
                right.annotate(r["model.size"], (r[x], r[y]), textcoords="offset points", xytext=(2, -6),
                               fontsize=4.5, color="0.35")
        right.set_title(f"paper: COCO {img_size}" + (", H100" if "FPS" in (x, y) else ""))
        panels.append((right, p.dropna(subset=[x, y])))
    for a, d in panels:
        if x in ("FPS", "GFLOPs", "params_M"):
            a.set_xscale("log")
            vals = pd.to_numeric(d[x], errors="coerce").dropna()
            _log_axis(a.xaxis, vals.min() if len(vals) else None, vals.max() if len(vals) else None)
            if len(vals) and vals.max() / vals.min() <= 30:
                a.margins(x=0.15)
        a.set_xlabel(UNITS.get(x, x))
        a.grid(True, alpha=0.3, which="both", lw=0.4)
    ax.set_ylabel(UNITS.get(y, y))
    ax.margins(y=0.12)  # room for the point labels
    only = f"size/input {next(iter(where))}" if len(where) == 1 else ""
    ax.set_title("ours" + (f", {only}" if only else ""))
    if paper:
        axes[0, 1].margins(y=0.08)
    caption = f"\n{_fps_caption(results)}" if "FPS" in (x, y) else ""
    fig.suptitle(f"{y} vs {x} through the model sizes{caption}", fontsize=6.5)
    handles = list(entries.values())
    fig.legend(handles, list(entries), loc="lower center", ncol=2, frameon=False, fontsize=5.5)
    fig.canvas.draw()
    height = fig.legends[0].get_window_extent().height / fig.dpi
    fig.tight_layout(rect=(0, (height + 0.05) / fig.get_figheight(), 1, 1))
    return fig


def size_plot(results: pd.DataFrame, paper: bool = True, img_size: int = 640):
    """Parameters (left) and GFLOPs (right) against the model size, one line per variant and setting
    (:func:`series`; ours solid, the paper's at ``img_size`` dashed and hollow)."""
    plt = _style()
    data = ours(results, "params_M", "GFLOPs")
    p = paper_points(img_size) if paper else data.iloc[0:0]
    sizes = [z for z in SIZE_ORDER if z in set(data["model.size"]) | set(p["model.size"])]
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 2.6))
    for ax, col in zip(axes, ("params_M", "GFLOPs")):
        for variant, label, marker, d in _our_lines(data):
            ax.plot([sizes.index(z) for z in d["model.size"]], d[col], marker=marker, ms=3, lw=1,
                    color=_colour(variant), label=label)
        for variant in _variants(p["model.variant"]):
            d = _by_size(p[p["model.variant"] == variant]).dropna(subset=[col])
            ax.plot([sizes.index(z) for z in d["model.size"]], d[col], marker="o", ms=3, lw=0.8, ls="--",
                    mfc="none", color=_colour(variant), label=f"{variant_label(variant)} (paper)")
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_xlabel("model size")
        ax.set_ylabel(UNITS[col])
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3, lw=0.4)
    _legend_below(fig, axes[0])
    return fig


def component_columns(results: pd.DataFrame, quantity: str = "time") -> tuple[str, list[str]]:
    """The results columns of the benchmark's breakdown: per-component milliseconds
    (``metrics.bench.breakdown_ms.*``) or GFLOPs (``metrics.bench.gflops_by_component.*``)."""
    prefix = {"time": "metrics.bench.breakdown_ms.", "GFLOPs": "metrics.bench.gflops_by_component."}[quantity]
    cols = [c for c in results.columns if c.startswith(prefix) and not c.endswith(".total")]
    if not cols or results[cols].isna().all().all():
        raise UserError(f"no per-component {quantity} in the results ({prefix}*): the benchmark step of these "
                        f"runs did not record one")
    return prefix, cols


def component_plot(results: pd.DataFrame, quantity: str = "time"):
    """A stacked horizontal bar per registered variant with a complete run and a breakdown (registry order:
    Table 1 rows 0-5, then the others; one bar per size and input size, labelled by the variant's label): the
    time per forward (``quantity="time"``) or GFLOPs of each component. The components and their order are
    the registry's (``Variant.components``, then 'other'); a component has one colour in every figure."""
    from study.models.build import all_components

    plt = _style()
    done = complete(results)
    registry = _registry()
    done = done[done["model.variant"].isin(list(registry))]
    prefix, cols = component_columns(done, quantity)
    done = done.dropna(subset=cols, how="all")
    if done.empty:
        raise UserError(f"no complete run of a registered variant with a per-component {quantity}")
    key = ["model.variant", "model.size", "model.img_size"]
    bars = done.groupby(key, sort=False)[cols].mean().reset_index()
    order = list(registry)
    bars = bars.assign(_r=bars["model.variant"].map(order.index)).sort_values(["model.size", "_r"])
    bars = bars.iloc[::-1].reset_index(drop=True)  # the first row at the top
    known = all_components()
    names = [c.removeprefix(prefix) for c in cols]
    parts = sorted((c for c, n in zip(cols, names) if bars[c].fillna(0).gt(0).any()),
                   key=lambda c: known.index(c.removeprefix(prefix)) if c.removeprefix(prefix) in known
                   else len(known))
    fig, ax = plt.subplots(figsize=(WIDTH, 1.3 + 0.28 * len(bars) + 0.1 * len(parts)))
    left = [0.0] * len(bars)
    for c in parts:
        values = bars[c].fillna(0).tolist()
        name = c.removeprefix(prefix)
        ax.barh(range(len(bars)), values, left=left, color=component_colour(name), label=name.replace("_", " "))
        left = [b + v for b, v in zip(left, values)]
    rows = [registry[v].row for v in bars["model.variant"]]
    ax.set_yticks(range(len(bars)), [(f"{r}. " if r is not None else "") + f"{variant_label(v)} {z}/{int(i)}"
                                     for r, v, z, i in zip(rows, bars["model.variant"], bars["model.size"],
                                                           bars["model.img_size"])])
    ax.set_xlabel("ms per forward" if quantity == "time" else "GFLOPs per image")
    title = "Time per component" if quantity == "time" else "GFLOPs per component"
    if quantity == "time":
        title += f"\n{_fps_caption(done)}"
    fig.suptitle(title, fontsize=7)
    ax.grid(True, axis="x", alpha=0.3, lw=0.4)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False, fontsize=5.5)
    fig.canvas.draw()
    height = fig.legends[0].get_window_extent().height / fig.dpi
    fig.tight_layout(rect=(0, (height + 0.05) / fig.get_figheight(), 1, 1))
    return fig


def training_curves(results: pd.DataFrame, run: str):
    """Loss against step of one run (its ``logs/train.csv``, found through the results table's ``path``),
    and the validation metric against step on the right axis: any ``val*`` column of the log, and the final
    evaluation (the run's PQ / AP / mIoU) at its last step."""
    plt = _style()
    row = results[results["run"] == run]
    if row.empty:
        raise UserError(f"no run '{run}' in the results table")
    row = row.iloc[0]
    if not isinstance(row.get("path"), str):
        raise UserError(f"run '{run}' has no folder in the results table (column 'path'): collect a folder of runs")
    log = Path(row["path"]) / "logs" / "train.csv"
    if not log.is_file():
        raise UserError(f"run '{run}' has no training log ({log})")
    curve = pd.read_csv(log)
    fig, ax = plt.subplots(figsize=(WIDTH, 2.2))
    ax.plot(curve["step"], curve["loss"], lw=1, color="C0", label="training loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3, lw=0.4)
    metric = next((m for m in ("PQ", "AP", "mIoU") if m in row and pd.notna(row[m])), None)
    val_cols = [c for c in curve.columns if c.startswith("val")]
    handles, labels = ax.get_legend_handles_labels()
    if metric or val_cols:
        right = ax.twinx()
        for i, c in enumerate(val_cols):
            d = curve.dropna(subset=[c])
            right.plot(d["step"], d[c], lw=1, color=f"C{2 + i}", marker=".", label=c)
        if metric:
            right.plot([curve["step"].max()], [row[metric]], "s", color="C3", ms=4,
                       label=f"validation {metric} (final)")
            right.set_ylim(0, 100)
        right.set_ylabel("validation " + UNITS.get(metric, "metric"))
        h, lab = right.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    ax.legend(handles, labels, frameon=False, loc="upper right")
    setting = row.get("model.mask_setting")
    ax.set_title(f"{run_name(row)}: {variant_label(row.get('model.variant'))} {row.get('model.size')}/"
                 f"{row.get('model.img_size')}" + (f", {setting}" if isinstance(setting, str) and setting else ""))
    fig.tight_layout()
    return fig


def save(fig, stem: str | Path, dpi: int = 300) -> list[Path]:
    """Write ``stem``.png and ``stem``.pdf (refusing to replace a file the suite did not write); returns the
    paths."""
    import matplotlib.pyplot as plt

    from study.io import record_written, refuse_foreign

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(f"{stem.name}.png"), stem.with_name(f"{stem.name}.pdf")]
    try:
        for p in paths:  # never over a file the suite did not write (study/io.py's manifest)
            refuse_foreign(p)
        for p in paths:
            fig.savefig(p, dpi=dpi)
            record_written(p)
    finally:
        plt.close(fig)
    return paths


def figure_makers(results: pd.DataFrame) -> list[tuple[str, str, object]]:
    """(title, file stem, function drawing it) of every figure of the report, training curves per run."""
    figures = [("Figure 1: PQ vs FPS through the sizes", "fig1_pq_fps", lambda: tradeoff_plot(results, "FPS")),
               ("PQ vs GFLOPs", "pq_gflops", lambda: tradeoff_plot(results, "GFLOPs")),
               ("Parameters and GFLOPs vs size", "params_gflops_size", lambda: size_plot(results)),
               ("Time per component of each Table 1 row", "components_time", lambda: component_plot(results)),
               ("GFLOPs per component of each Table 1 row", "components_gflops",
                lambda: component_plot(results, "GFLOPs"))]
    done = complete(results)
    names = [run_name(r) for _, r in done.iterrows()]
    for name, (_, r) in zip(names, done.iterrows()):
        run = r.get("run")
        stem = name if names.count(name) == 1 else str(run)  # readable, unless two runs share it
        figures.append((f"Training curves of {name}", f"curves_{file_stem(stem)}",
                        lambda run=run: training_curves(results, run)))
    return figures


def all_figures(results: pd.DataFrame, out: str | Path) -> tuple[list[tuple[str, list[Path]]], list[str]]:
    """Every figure the results allow, written under ``out`` (PNG and PDF): (title, paths) of each, and why
    each other one was not drawn."""
    out = Path(out)
    written, skipped = [], []
    for title, stem, make in figure_makers(results):
        try:
            written.append((title, save(make(), out / stem)))
        except UserError as e:
            skipped.append(f"{title}: {e}")
    return written, skipped
