"""Figures of the generic study (analysis/study.py), one paper column wide (3.3 in): each metric against each
axis with 95% interval bars, the main metric against FPS and GFLOPs with the Pareto front, and the training
curves of every group overlaid (loss, and the validation metric at intervals where the run recorded it).
Each group keeps one colour in every figure (its place in the study's order)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from analysis.plots import UNITS, WIDTH, _style
from analysis.study import TASK_METRICS, Study, _numeric
from study.errors import UserError

PALETTE = [f"C{i}" for i in range(10)]
MARKERS = "osD^v<>ph*"


def group_label(study: Study, i: int, skip: tuple[str, ...] = ()) -> str:
    keys = study.frame.iloc[i]
    parts = []
    for a in study.axes:
        if a in skip:
            continue
        value = keys["label"] if a == "model.variant" and "label" in keys else keys[a]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            value = "default"  # the key unset in these runs: the variant's own default
        parts.append(str(value) if a == "model.variant" else f"{a.split('.')[-1]} {value}")
    return ", ".join(parts) or "all runs"


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _bars(study: Study, i: int, m: str) -> tuple[float, float]:
    r = study.frame.iloc[i]
    if int(r[f"{m} n"]) < 2 or math.isnan(r[f"{m} lo"]):
        return 0.0, 0.0
    return r[m] - r[f"{m} lo"], r[f"{m} hi"] - r[m]


def _legend_below(fig, handles, labels) -> None:
    """The legend under the axes, one column (long group labels never run into each other)."""
    if not handles:
        fig.tight_layout()
        return
    fig.legend(handles, labels, loc="lower center", ncol=1, frameon=False, fontsize=5.5)
    fig.canvas.draw()
    height = fig.legends[0].get_window_extent().height / fig.dpi
    fig.tight_layout(rect=(0, min(0.6, (height + 0.08) / fig.get_figheight()), 1, 1))


def metric_plots(study: Study) -> list[tuple[str, str, object]]:
    """(title, file stem, maker) of one figure per axis: a panel per metric (the task's, then FPS), the
    axis's values along x (numeric) or y (categories), a line per combination of the other axes."""
    metrics = [m for m in (*TASK_METRICS, "FPS") if m in study.metrics]
    out = []
    for axis in study.axes:
        out.append((f"{', '.join(metrics)} vs {axis}", f"study_{axis.replace('.', '_')}",
                    lambda axis=axis: _metric_plot(study, axis, metrics)))
    return out


def _metric_plot(study: Study, axis: str, metrics: list[str]):
    plt = _style()
    f = study.frame
    values = list(dict.fromkeys(f[axis]))
    numeric = _numeric(values)
    others = tuple(a for a in study.axes if a != axis)
    lines: dict[str, list[int]] = {}
    for i in range(len(f)):
        lines.setdefault(group_label(study, i, skip=(axis,)), []).append(i)
    cats = [str(f.iloc[i]["label"]) if axis == "model.variant" else str(v) for i, v in
            ((list(f[axis]).index(v), v) for v in values)]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(WIDTH, 0.5 + (1.05 + 0.12 * len(cats) * (not numeric))
                                                     * len(metrics)), sharex=numeric, squeeze=False)
    handles = {}
    for ax, m in zip(axes[:, 0], metrics):
        for k, (name, idx) in enumerate(lines.items()):
            xs = [f.iloc[i][axis] if numeric else values.index(f.iloc[i][axis]) for i in idx]
            ys = [f.iloc[i][m] for i in idx]
            err = list(zip(*[_bars(study, i, m) for i in idx]))
            col = colour(idx[0]) if not others else colour(k)
            if numeric:
                h = ax.errorbar(xs, ys, yerr=err, marker=MARKERS[k % len(MARKERS)], ms=3, lw=1, capsize=2,
                                color=col)
            else:
                h = ax.errorbar(ys, xs, xerr=err, marker=MARKERS[k % len(MARKERS)], ms=3, lw=0, elinewidth=1,
                                capsize=2, color=col)
            handles[name] = h
        _percent_limits(ax, m, "y" if numeric else "x")  # a categorical axis puts the metric on x
        if numeric:
            ax.set_ylabel(UNITS.get(m, m))
            if all(v > 0 for v in values) and max(values) / min(values) >= 10:
                ax.set_xscale("log")
            if len(values) <= 8:  # a tick at each value of the axis, nowhere else
                ax.set_xticks(sorted(values), [f"{v:g}" for v in sorted(values)])
                ax.xaxis.set_minor_locator(plt.NullLocator())
        else:
            ax.set_xlabel(UNITS.get(m, m))
            ax.set_yticks(range(len(cats)), cats)
            ax.tick_params(axis="x", labelbottom=True)
        ax.grid(True, alpha=0.3, lw=0.4)
    if numeric:
        axes[-1, 0].set_xlabel(axis)
    fig.suptitle(f"vs {axis}: mean, 95% interval over seeds", fontsize=7)
    if others:
        _legend_below(fig, list(handles.values()), list(handles))
    else:
        fig.tight_layout()
    return fig


def _percent_limits(ax, m: str, axis: str = "y") -> None:
    """A percentage axis (``axis``, where the metric is) spans at least 2 points and stays within 0-100 (a flat
    0 is not drawn as noise; a wide interval of two seeds runs off the axis instead of stretching it to 400)."""
    if m not in TASK_METRICS:
        return
    get, set_ = (ax.get_ylim, ax.set_ylim) if axis == "y" else (ax.get_xlim, ax.set_xlim)
    lo, hi = get()
    if hi - lo < 2:
        lo, hi = (hi + lo) / 2 - 1, (hi + lo) / 2 + 1
    set_(max(0.0, lo), min(100.0, hi) if hi - max(0.0, lo) > 2 else hi)


def pareto_front(xs: list[float], ys: list[float], higher_x: bool) -> list[int]:
    """Indices of the points no other point beats on both (higher y, and higher or lower x), by x."""
    keep = []
    for i in range(len(xs)):
        beaten = any((ys[j] >= ys[i] and (xs[j] >= xs[i] if higher_x else xs[j] <= xs[i]))
                     and (ys[j] > ys[i] or xs[j] != xs[i]) for j in range(len(xs)))
        if not beaten:
            keep.append(i)
    return sorted(keep, key=lambda i: xs[i])


def tradeoff(study: Study, x: str):
    """The main metric against ``x`` (FPS or GFLOPs), a point per group with its interval bars both ways, the
    Pareto front dashed."""
    plt = _style()
    m = study.main
    if m is None or x not in study.metrics:
        raise UserError(f"no {m or 'task metric'} or no {x} in these runs: nothing to plot")
    f = study.frame
    rows = [i for i in range(len(f)) if not math.isnan(f.iloc[i][x]) and not math.isnan(f.iloc[i][m])]
    fig, ax = plt.subplots(figsize=(WIDTH, 2.4))
    handles, labels = [], []
    for i in rows:
        xerr = [[v] for v in _bars(study, i, x)]
        yerr = [[v] for v in _bars(study, i, m)]
        h = ax.errorbar([f.iloc[i][x]], [f.iloc[i][m]], xerr=xerr, yerr=yerr, marker=MARKERS[i % len(MARKERS)],
                        ms=3.5, lw=0, elinewidth=0.8, capsize=2, color=colour(i))
        handles.append(h)
        labels.append(group_label(study, i))
    front = pareto_front([f.iloc[i][x] for i in rows], [f.iloc[i][m] for i in rows], higher_x=(x != "GFLOPs"))
    if len(front) > 1:
        ax.plot([f.iloc[rows[k]][x] for k in front], [f.iloc[rows[k]][m] for k in front], ls="--", lw=0.8,
                color="0.4", zorder=0)
        handles.append(ax.lines[-1])
        labels.append("Pareto front")
    ax.set_xlabel(UNITS.get(x, x))
    ax.set_ylabel(UNITS.get(m, m))
    _percent_limits(ax, m)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.grid(True, alpha=0.3, lw=0.4)
    title = f"{m} vs {x}: mean, 95% interval over seeds"
    if x == "FPS" and study.environment:
        title += f"\n{study.environment[0].split(', torch')[0]}"
    ax.set_title(title)
    _legend_below(fig, handles, labels)
    return fig


# ------------------------------------------------------------------------------------------- training curves


def validation_history(metrics: dict) -> list[tuple[int, float]]:
    """(step, metric in percent) of the validation during training, where the run recorded it: a list of
    {step, metric} entries under ``history`` / ``val_history`` / ``eval_history`` (top level or under
    ``train`` / ``eval``); a metric given as a fraction (pq, ap, miou) is put in percent."""
    for holder in (metrics, metrics.get("train") or {}, metrics.get("eval") or {}):
        for key in ("history", "val_history", "eval_history"):
            entries = holder.get(key) if isinstance(holder, dict) else None
            if not isinstance(entries, list):
                continue
            out = []
            for e in entries:
                if not isinstance(e, dict) or "step" not in e:
                    continue
                for k, scale in (("PQ", 1), ("AP", 1), ("mIoU", 1), ("pq", 100), ("ap", 100), ("miou", 100)):
                    v = e.get(k)
                    if isinstance(v, dict):
                        v = (v.get("All") or {}).get("pq") if k == "pq" else None
                    if isinstance(v, (int, float)):
                        out.append((int(e["step"]), float(v) * scale))
                        break
            if out:
                return out
    return []


def curves(study: Study, results: pd.DataFrame):
    """The training loss of every run (its ``logs/train.csv``), a colour per group, and below it the
    validation metric at intervals (:func:`validation_history`) with the final evaluation at the last step."""
    plt = _style()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(WIDTH, 3.6), sharex=True)
    handles, labels, drawn, top_value = [], [], 0, 0.0
    by_name = {str(r.get("run")): r for _, r in results.iterrows()}
    for i, line in study.frame.iterrows():
        h = None
        for name in line["folders"].split(", "):
            r = by_name.get(name)
            if r is None or not isinstance(r.get("path"), str):
                continue
            log = Path(r["path"]) / "logs" / "train.csv"
            if log.is_file():
                c = pd.read_csv(log)
                if {"step", "loss"} <= set(c.columns):
                    (h,) = top.plot(c["step"], c["loss"], lw=0.8, alpha=0.8, color=colour(i))
                    drawn += 1
            hist = _history_of(Path(r["path"]))
            m = study.main
            final = r.get(m) if m else None
            steps = [s for s, _ in hist]
            vals = [v for _, v in hist]
            if final is not None and not pd.isna(final) and pd.notna(r.get("step")):
                if not steps or steps[-1] != int(r["step"]):
                    steps, vals = steps + [int(r["step"])], vals + [float(final)]
            if steps:
                bottom.plot(steps, vals, marker=".", ms=3, lw=0.8, color=colour(i))
                top_value = max(top_value, *vals)
        if h is not None:
            handles.append(h)
            labels.append(group_label(study, i))
    if not drawn:
        plt.close(fig)
        raise UserError("no training log (logs/train.csv) in these runs: no training curves")
    top.set_ylabel("training loss")
    top.grid(True, alpha=0.3, lw=0.4)
    bottom.set_ylabel(f"validation {UNITS.get(study.main, study.main or 'metric')}")
    bottom.set_xlabel("optimiser step")
    bottom.set_ylim(0, max(5.0, top_value * 1.1))  # percent from 0: a flat 0 reads as 0, not as noise
    bottom.grid(True, alpha=0.3, lw=0.4)
    top.set_title("Training curves, a colour per group (every seed drawn)")
    _legend_below(fig, handles, labels)
    return fig


def _history_of(folder: Path) -> list[tuple[int, float]]:
    try:
        return validation_history(json.loads((folder / "metrics.json").read_text()))
    except (OSError, ValueError):
        return []


def study_figures(study: Study, results: pd.DataFrame) -> list[tuple[str, str, object]]:
    """(title, file stem, maker) of every figure of the generic study."""
    figs = metric_plots(study)
    m = study.main or "metric"
    figs += [(f"{m} vs FPS (Pareto front)", "study_tradeoff_fps", lambda: tradeoff(study, "FPS")),
             (f"{m} vs GFLOPs (Pareto front)", "study_tradeoff_gflops", lambda: tradeoff(study, "GFLOPs")),
             ("Training curves per group", "study_curves", lambda: curves(study, results))]
    return figs
