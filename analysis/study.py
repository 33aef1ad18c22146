"""The generic study of any folder of runs: ``study report RESULTS`` without ``--table``.

The configuration keys that vary between the complete runs are the study's axes (the seed, names, places
and the launch / benchmark / evaluation settings aside: analysis.tables.identity_columns). Runs are grouped by
every axis; each group gives, per metric of the task (PQ / PQ_th / PQ_st, AP, mIoU) and params, GFLOPs and
FPS, the mean, std, n and the 95% interval over its seeds (analysis/stats.py), and the difference to a
reference group (the first, or ``--baseline KEY=VALUE``) with Welch's interval, "within noise" when it
includes zero. A variant's label comes from the variant registry (study/models/build.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from analysis.names import run_name
from analysis.stats import Stat, describe, noise_word, welch
from analysis.tables import complete, environment, identity_columns
from study.errors import UserError

TASK_METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")
MAIN = ("PQ", "AP", "mIoU")  # the first present is the study's main metric
SHOWN_DIFF = ("PQ", "AP", "mIoU", "FPS")  # differences printed in Markdown / LaTeX (the CSV has every one)


@dataclass
class Study:
    """The groups (``frame``: one row per group, axis values, label, n, runs, and per metric ``m``, ``m std``,
    ``m n``, ``m lo``, ``m hi``, ``Δm``, ``Δm lo``, ``Δm hi``, ``m noise``), the axes, the metrics present,
    the reference group's index, notes and how the times were taken."""
    axes: list[str]
    frame: pd.DataFrame
    metrics: list[str]
    reference: int
    stats: list[dict] = field(default_factory=list)  # per group: {metric: Stat}
    notes: list[str] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)
    title: str = "Study"

    @property
    def main(self) -> str | None:
        return next((m for m in MAIN if m in self.metrics), None)


def _plain(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _numeric(values) -> bool:
    vals = [v for v in values if v is not None]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def study_axes(results: pd.DataFrame) -> tuple[list[str], dict[str, list[str]]]:
    """The configuration keys whose value differs between the complete runs (the seed aside), in the results
    table's order, and the keys left out because an earlier axis already sets them (the main study's
    ``model.baseline.*``, set with the variant): {axis: [keys it sets]}."""
    done = complete(results)
    varying = [c for c in identity_columns(done) if len({repr(_plain(v)) for v in done[c]}) > 1]
    axes: list[str] = []
    implied: dict[str, list[str]] = {}
    for c in varying:
        keys = done[axes].map(lambda v: repr(_plain(v))).agg("|".join, axis=1) if axes else pd.Series(
            "", index=done.index)
        per_group = pd.DataFrame({"g": keys, "v": done[c].map(lambda v: repr(_plain(v)))}).groupby("g")["v"]
        if axes and per_group.nunique().max() == 1:  # one value per group of the earlier axes
            implied.setdefault(axes[0] if len(axes) == 1 else ", ".join(axes), []).append(c)
        else:
            axes.append(c)
    return axes, implied


def _order_key(axis: str, values: list):
    from study.models.build import variants

    if axis == "model.variant":
        order = list(variants())
        return lambda v: (order.index(v) if v in order else len(order), str(v))
    if _numeric(values):
        return lambda v: (0, v) if v is not None else (1, 0)
    return lambda v: ("" if v is None else str(v))


def label_of(variant) -> str:
    """The registry's label of ``variant`` (its name when it is not registered)."""
    from study.models.build import variants

    v = variants().get(variant)
    return v.label if v is not None else str(variant)


def _match(value, wanted: str) -> bool:
    if value is None:
        return wanted.lower() in ("none", "null", "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return math.isclose(float(value), float(wanted), rel_tol=1e-9)
        except ValueError:
            return False
    return str(value) == wanted


def _reference(groups: list[dict], axes: list[str], baseline: list[str] | None) -> int:
    if not baseline:
        return 0
    chosen = list(range(len(groups)))
    for item in baseline:
        key, sep, wanted = item.partition("=")
        if not sep:
            raise UserError(f"--baseline {item!r}: give KEY=VALUE, e.g. --baseline train.lr=0.001")
        hits = [a for a in axes if a == key] or [a for a in axes if a.split(".")[-1] == key]
        if len(hits) != 1:
            raise UserError(f"--baseline {item!r}: '{key}' is not one key that varies in these runs (the keys "
                            f"that vary: {', '.join(axes) or 'none'})")
        chosen = [i for i in chosen if _match(groups[i]["keys"][hits[0]], wanted)]
    if len(chosen) != 1:
        have = "; ".join(_group_text(g["keys"], axes) for g in groups)
        raise UserError(f"--baseline {' '.join(baseline)}: matches {len(chosen)} groups, not one (groups: {have}); "
                        f"name more keys (repeat --baseline)")
    return chosen[0]


def _group_text(keys: dict, axes: list[str]) -> str:
    return ", ".join(f"{a.split('.')[-1]} {keys[a]}" for a in axes) or "all runs"


def build_study(results: pd.DataFrame, baseline: list[str] | None = None) -> Study:
    """The generic study of ``results`` (the output of ``study collect``); UserError when no run is complete."""
    done = complete(results).reset_index(drop=True)
    if done.empty:
        states = dict(results["state"].value_counts()) if "state" in results else {}
        raise UserError(f"nothing to report: no complete run (states: {states or 'none'})")
    axes, implied = study_axes(done)
    metrics = [m for m in (*TASK_METRICS, "params_M", "GFLOPs", "FPS")
               if m in done and pd.to_numeric(done[m], errors="coerce").notna().any()]
    keys = [{a: _plain(r[a]) for a in axes} for _, r in done.iterrows()]
    groups: dict[tuple, dict] = {}
    for j, k in enumerate(keys):
        g = groups.setdefault(tuple(repr(k[a]) for a in axes), {"keys": k, "rows": []})
        g["rows"].append(j)
    ordered = list(groups.values())
    for a in reversed(axes):  # sorted by the first axis, then the second, ...
        ordered.sort(key=lambda g, f=_order_key(a, [k[a] for k in keys]): f(g["keys"][a]))
    ref = _reference(ordered, axes, baseline)
    stats = [{m: describe(pd.to_numeric(done.loc[g["rows"], m], errors="coerce")) for m in metrics}
             for g in ordered]
    lines = []
    for i, g in enumerate(ordered):
        line = dict(g["keys"])
        if "model.variant" in axes:
            line["label"] = label_of(g["keys"]["model.variant"])
        line["n"] = len(g["rows"])
        line["runs"] = ", ".join(run_name(done.loc[j]) for j in g["rows"])
        line["folders"] = ", ".join(str(done.loc[j].get("run")) for j in g["rows"])  # unique, for the curves
        for m in metrics:
            s: Stat = stats[i][m]
            line.update({m: s.mean, f"{m} std": s.std, f"{m} n": s.n, f"{m} lo": s.lo, f"{m} hi": s.hi})
            d = welch(s, stats[ref][m])
            line.update({f"Δ{m}": d.value, f"Δ{m} lo": d.lo, f"Δ{m} hi": d.hi,
                         f"{m} noise": "reference" if i == ref else noise_word(d)})
        lines.append(line)
    frame = pd.DataFrame(lines)
    notes = [f"groups: the runs that differ only in their seed; the keys that vary: {', '.join(axes) or 'none'}",
             "cells: mean ± std over the seeds [95% interval of the mean, Student's t]; n = 1: no std and no "
             "interval exist",
             f"Δ: difference to the reference group ({_group_text(ordered[ref]['keys'], axes)}) [95% Welch "
             f"interval]; 'within noise' when it includes zero"]
    for by, keys in implied.items():
        notes.append(f"set by {by}, not separate axes: {', '.join(keys)}")
    if "model.variant" not in axes and "model.variant" in done:
        v = _plain(done["model.variant"].iloc[0])
        notes.append(f"every run: model.variant {v} ({label_of(v)})")
    return Study(axes, frame, metrics, ref, stats, notes, environment(done),
                 "Study" + (f": {' x '.join(a.split('.')[-1] for a in axes)}" if axes else ""))


# ------------------------------------------------------------------------------------------- writers


def _num(v: float, m: str, like: float | None = None) -> str:
    """Percentages to 1 decimal; other numbers to 0 decimals from 100, 1 from 1, 3 significant digits below;
    ``like``: the decimals of that number (a std printed as its mean)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    ref = abs(v if like is None else like)
    if m in TASK_METRICS or 1 <= ref < 100:
        return f"{v:.1f}"
    if ref >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}" if like is None else f"{v:.2g}"


def cell(line: pd.Series, m: str) -> str:
    """'56.0 ± 0.7 [55.1, 56.9]'; the mean alone for one seed (the n column says no interval) or when every
    seed gave the same (a parameter count)."""
    mean, std, n = line[m], line[f"{m} std"], int(line[f"{m} n"])
    if n == 0:
        return "-"
    if n == 1 or std == 0:
        return _num(mean, m)
    return (f"{_num(mean, m)} ± {_num(std, m, mean)} [{_num(line[f'{m} lo'], m, mean)}, "
            f"{_num(line[f'{m} hi'], m, mean)}]")


def diff_cell(line: pd.Series, m: str) -> str:
    word = line[f"{m} noise"]
    if word == "reference":
        return "reference"
    d = line[f"Δ{m}"]
    if d is None or math.isnan(d):
        return "-"
    if word.startswith("no interval"):
        return f"{d:+.1f} (no interval: n = 1)"
    return f"{d:+.1f} [{line[f'Δ{m} lo']:+.1f}, {line[f'Δ{m} hi']:+.1f}] {word}"


def display(study: Study) -> pd.DataFrame:
    """The study as text cells: the axes (and the variant's label), n, each metric, the differences."""
    f = study.frame
    out = pd.DataFrame(index=f.index)
    for a in study.axes:
        out[a] = ["-" if _plain(v) is None else str(_plain(v)) for v in f[a]]
        if a == "model.variant":
            out["label"] = f["label"]
    out["n"] = [f"{n}" if n > 1 else f"{n} (no interval)" for n in f["n"]]
    for m in study.metrics:
        out[m] = [cell(r, m) for _, r in f.iterrows()]
    for m in (m for m in SHOWN_DIFF if m in study.metrics):
        out[f"Δ{m}"] = [diff_cell(r, m) for _, r in f.iterrows()]
    return out


def study_markdown(study: Study) -> str:
    lines = [f"## {study.title}", "", display(study).to_markdown(index=False, disable_numparse=True), ""]
    lines += [f"- {n}" for n in study.notes]
    if study.environment:
        lines += [f"- times taken on: {'; '.join(study.environment)}"]
    return "\n".join(lines) + "\n"


def study_latex(study: Study) -> str:
    from analysis.tables import _latex_text

    d = display(study)
    styler = d.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    text = styler.to_latex(hrules=True, column_format="l" * len(d.columns)).replace("Δ", r"$\Delta$")
    text = text.replace("±", r"$\pm$")
    notes = " \\\\\n".join(_latex_text(n) for n in study.notes)
    return f"% {study.title} (study report)\n{text}\\par{{\\footnotesize {notes}}}\n"


def study_csv(study: Study) -> str:
    """Every number unrounded: per metric mean, std, n, interval, difference, its interval and the word."""
    return study.frame.to_csv(index=False)


def write_study(study: Study, stem) -> list:
    """``stem``.md, .tex and .csv (never over a file the suite did not write); returns the paths."""
    from pathlib import Path

    from study.io import atomic_write_text

    stem = Path(stem)
    paths = []
    for ext, text in (("md", study_markdown(study)), ("tex", study_latex(study)), ("csv", study_csv(study))):
        path = stem.with_name(f"{stem.name}.{ext}")
        atomic_write_text(path, text, guard=True)
        paths.append(path)
    return paths
