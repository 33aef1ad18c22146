"""Figures from the results table alone (study/launch/collect.py), sized for a paper column (3.3 in wide).

Each function returns a matplotlib Figure; :func:`save` writes it as PNG and PDF. Nothing here trains or
measures. Ours are filled markers with solid lines, the paper's hollow markers with dashed lines, one colour
per variant.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.tables import SIZES, TABLE1, complete, environment, summarize
from study.errors import UserError

LABELS = {"vit_adapter_m2f": "ViT-Adapter + M2F", "sfp_m2f": "w/o ViT-Adapter",
          "sfp_no_pixel_decoder": "w/o pixel decoder", "single_scale": "w/o multi-scale",
          "eomt_masked": "EoMT w/ masking", "eomt": "EoMT"}
WIDTH = 3.3  # inches: one column of a two-column paper
UNITS = {"FPS": "FPS (images/s, batch 1)", "GFLOPs": "GFLOPs per image", "params_M": "parameters (M)",
         "PQ": "PQ (%)", "AP": "AP (%)", "mIoU": "mIoU (%)"}
SIZE_ORDER = ["tiny", "S", "B", "L", "g"]  # left to right on a size axis


def _style():
    import matplotlib.pyplot as plt  # headless, matplotlib falls back to Agg by itself; notebooks stay inline

    plt.rcParams.update({"font.size": 7, "axes.titlesize": 7, "legend.fontsize": 6, "xtick.labelsize": 6,
                         "ytick.labelsize": 6, "axes.labelsize": 7})
    return plt


def _colour(variant: str) -> str:
    order = TABLE1 + ["eomt_tiny"]
    return f"C{order.index(variant) if variant in order else len(order)}"


def _variants(names) -> list[str]:
    names = set(names)
    return [v for v in TABLE1 if v in names] + sorted(names - set(TABLE1))


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
    """The legend in two columns under the axes (it never hides a point at column width)."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    n = (len(labels) + 1) // 2
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False, fontsize=5.5)
    fig.tight_layout(rect=(0, 0.02 + 0.045 * n * 3.3 / fig.get_figheight(), 1, 1))


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
        yield (variant, LABELS.get(variant, variant) + (f" {setting}" if setting else "") + " (ours)",
               MARKERS[k % len(MARKERS)], d)


def _log_axis(axis) -> None:
    """A log axis with plain numbers at 1, 2 and 5 per decade (matplotlib's 2x10^1 labels of the minor
    ticks overlap on a short range)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def tradeoff_plot(results: pd.DataFrame, x: str = "FPS", y: str = "PQ", paper: bool = True,
                  img_size: int = 640):
    """``y`` against ``x`` through the sizes, one line per variant and setting (:func:`series`): ours (points
    labelled size/input, or, where every point of ours has one size and input, that in the caption) and, with
    ``paper``, the paper's points at ``img_size`` on the same axes. The paper's Figure 1 is ``x="FPS"``; the
    title names the device and precision of our FPS."""
    plt = _style()
    data = ours(results, x, y)
    fig, ax = plt.subplots(figsize=(WIDTH, 3.3))
    where = {f"{r['model.size']}/{int(r['model.img_size'])}" for _, r in data.iterrows()}
    for variant, label, marker, d in _our_lines(data):
        ax.plot(d[x], d[y], marker=marker, ms=3.5, lw=1, color=_colour(variant), label=label)
        if len(where) > 1:
            for _, r in d.iterrows():
                ax.annotate(f"{r['model.size']}/{int(r['model.img_size'])}", (r[x], r[y]),
                            textcoords="offset points", xytext=(3, 3), fontsize=5)
    if paper:
        p = paper_points(img_size)
        for variant in _variants(p["model.variant"]):
            d = _by_size(p[p["model.variant"] == variant]).dropna(subset=[x, y])
            if d.empty:
                continue
            ax.plot(d[x], d[y], marker="o", ms=3.5, lw=0.8, ls="--", mfc="none", color=_colour(variant),
                    label=f"{LABELS.get(variant, variant)} (paper)")
            for _, r in d.iterrows():
                ax.annotate(r["model.size"], (r[x], r[y]), textcoords="offset points", xytext=(3, -7), fontsize=5,
                            color="0.35")
    if x in ("FPS", "GFLOPs", "params_M"):
        ax.set_xscale("log")
        _log_axis(ax.xaxis)
    ax.set_xlabel(UNITS.get(x, x))
    ax.set_ylabel(UNITS.get(y, y))
    title = f"{y} vs {x} through the model sizes"
    only = f"ours: size/input {next(iter(where))}" if len(where) == 1 else ""
    if x == "FPS" or y == "FPS":
        caption = _fps_caption(results)
        title += f"\n{caption}" + (f"; {only.removeprefix('ours: ')}" if only else "") \
            + ("\npaper: one H100, mixed precision" if paper else "")
    elif only:
        title += f"\n{only}"
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both", lw=0.4)
    _legend_below(fig, ax)
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
                    mfc="none", color=_colour(variant), label=f"{LABELS.get(variant, variant)} (paper)")
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
    """A stacked bar per Table 1 row with a complete run (rows 0-5 in order, one bar per size and input
    size): the time per forward (``quantity="time"``) or GFLOPs of each component, from the benchmark's
    breakdown in the results table."""
    plt = _style()
    done = complete(results)
    done = done[done["model.variant"].isin(TABLE1)]
    prefix, cols = component_columns(done, quantity)
    done = done.dropna(subset=cols, how="all")
    if done.empty:
        raise UserError(f"no complete run of a Table 1 row with a per-component {quantity}")
    key = ["model.variant", "model.size", "model.img_size"]
    bars = done.groupby(key, sort=False)[cols].mean().reset_index()
    bars = bars.assign(_r=bars["model.variant"].map(TABLE1.index)).sort_values(["model.size", "_r"])
    parts = [c for c in cols if bars[c].fillna(0).gt(0).any()]
    fig, ax = plt.subplots(figsize=(WIDTH, 2.4))
    bottom = [0.0] * len(bars)
    for i, c in enumerate(parts):
        values = bars[c].fillna(0).tolist()
        ax.bar(range(len(bars)), values, bottom=bottom, color=f"C{i}", label=c.removeprefix(prefix).replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(bars)), [f"row {TABLE1.index(r['model.variant'])}\n{r['model.size']}/"
                                     f"{int(r['model.img_size'])}" for _, r in bars.iterrows()])
    ax.set_ylabel("ms per forward" if quantity == "time" else "GFLOPs per image")
    title = "Time per component, Table 1 rows" if quantity == "time" else "GFLOPs per component, Table 1 rows"
    if quantity == "time":
        title += f"\n{_fps_caption(done)}"
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=5, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(True, axis="y", alpha=0.3, lw=0.4)
    fig.tight_layout()
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
    ax.set_title(f"{run}: {row.get('model.variant')} {row.get('model.size')}/{row.get('model.img_size')}")
    fig.tight_layout()
    return fig


def save(fig, stem: str | Path, dpi: int = 300) -> list[Path]:
    """Write ``stem``.png and ``stem``.pdf; returns the paths."""
    import matplotlib.pyplot as plt

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(f"{stem.name}.png"), stem.with_name(f"{stem.name}.pdf")]
    for p in paths:
        fig.savefig(p, dpi=dpi)
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
    for run in complete(results).get("run", []):
        figures.append((f"Training curves of {run}", f"curves_{run}",
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
