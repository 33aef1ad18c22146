"""The paper's tables from the results table (study/launch/collect.py): pure functions of a DataFrame.

Runs that differ only in ``seed`` are one table row: the mean, with the number of seeds and the standard
deviation of the main metric. The paper's own numbers (study/paper_numbers.csv) sit next to ours.
"""
from __future__ import annotations

import pandas as pd

from study.paper_numbers import paper_numbers

KEY = ["model.variant", "model.size", "model.img_size"]
METRICS = ["params_M", "GFLOPs", "FPS", "PQ", "PQ_th", "PQ_st", "AP", "mIoU"]
# Table 1 order (docs/paper.md section 2): row 0 (ViT-Adapter + Mask2Former) to row 5 (EoMT).
TABLE1 = ["vit_adapter_m2f", "sfp_m2f", "sfp_no_pixel_decoder", "single_scale", "eomt_masked", "eomt"]
# Table 3 (docs/paper.md section 3): the three models at every size, largest first.
TABLE3_VARIANTS = ["vit_adapter_m2f", "eomt_masked", "eomt"]
SIZES = ["g", "L", "B", "S", "tiny"]


# Columns of the results table that are not configuration keys (study/launch/collect.py), and configuration
# keys that do not tell two models apart: a table row averages the runs that differ only in these.
_NOT_CONFIG = {"run", "path", "state", "step", "total_steps", "job_id", "error", "n", *METRICS, "PQ_th", "PQ_st"}
_REPEATS = ("seed", "name", "output_dir")
_REPEAT_SECTIONS = ("launch.", "bench.", "eval.", "metrics.")


def identity_columns(results: pd.DataFrame) -> list[str]:
    """Configuration columns that make two runs different models (everything but the seed, names, places,
    and the launch, benchmark and evaluation settings), in table order."""
    return [c for c in results.columns if c not in _NOT_CONFIG and c not in _REPEATS
            and not c.startswith(_REPEAT_SECTIONS) and not c.endswith("_std")]


def summarize(results: pd.DataFrame, main: str = "PQ") -> pd.DataFrame:
    """One row per model: the mean of every metric over the complete runs that differ only in their seed (or
    launch / benchmark / evaluation settings), ``n`` runs and ``<main>_std``. Besides variant, size and input
    size, the configuration keys that differ between rows are kept as columns (e.g. ``model.num_query_blocks``
    of Table D), so no two different models are ever averaged together."""
    missing = [k for k in KEY if k not in results]
    if missing:
        raise ValueError(f"the results table has no column(s) {missing}: is it the output of `study collect`?")
    done = results[results["state"] == "complete"] if "state" in results else results
    metrics = [m for m in METRICS if m in done]
    identity = identity_columns(done)
    if done.empty:
        return pd.DataFrame(columns=KEY + metrics + ["n"])
    grouped = done.groupby(identity, sort=False, dropna=False)
    out = grouped[metrics].mean()
    out["n"] = grouped.size()
    if main in done:
        out[f"{main}_std"] = grouped[main].std(ddof=1)  # NaN for a single seed
    out = out.reset_index()
    varying = [c for c in identity if c not in KEY and out[c].nunique(dropna=False) > 1]
    return out[KEY + varying + [c for c in out.columns if c not in identity]]


def _with_paper(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with the paper's params, GFLOPs, FPS and PQ for the same (variant, size, input size)."""
    keys = [(r["model.variant"], r["model.size"], int(r["model.img_size"])) for _, r in rows.iterrows()]
    published = [paper_numbers(*k) or {} for k in keys]
    return rows.assign(**{f"paper_{m}": [p.get(m) for p in published] for m in ("params_M", "GFLOPs", "FPS", "PQ")})


def table1(results: pd.DataFrame, size: str = "L", img_size: int = 640) -> pd.DataFrame:
    """Table 1: the stepwise removal, rows 0-5 of one size, in the paper's order (rows with no run left out)."""
    s = summarize(results)
    s = s[(s["model.size"] == size) & (s["model.img_size"] == img_size) & s["model.variant"].isin(TABLE1)]
    s = s.assign(row=s["model.variant"].map(TABLE1.index)).sort_values("row")
    s = s[["row"] + [c for c in s.columns if c != "row"]]
    return _with_paper(s).reset_index(drop=True)


def table3(results: pd.DataFrame, img_size: int = 640) -> pd.DataFrame:
    """Table 3: ViT-Adapter + Mask2Former, EoMT with masking and EoMT at every size present, largest first."""
    s = summarize(results)
    s = s[(s["model.img_size"] == img_size) & s["model.variant"].isin(TABLE3_VARIANTS)]
    order = s["model.size"].map(lambda z: SIZES.index(z) if z in SIZES else len(SIZES))
    s = s.assign(_size=order, _variant=s["model.variant"].map(TABLE3_VARIANTS.index))
    s = s.sort_values(["_size", "_variant"]).drop(columns=["_size", "_variant"])
    return _with_paper(s).reset_index(drop=True)


def to_markdown(table: pd.DataFrame, digits: int = 1) -> str:
    """A GitHub table; numbers rounded to ``digits``, missing values as '-'."""
    cols = [c for c in table.columns if not table[c].isna().all()]

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for _, r in table.iterrows()]
    return "\n".join(lines)
