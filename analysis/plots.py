"""Scaling plots from the results table (paper Figure 1 / Table 3: accuracy against speed across sizes).

Pure functions of a DataFrame that return a matplotlib Figure; nothing here trains or measures.
"""
from __future__ import annotations

import pandas as pd

from analysis.tables import SIZES, TABLE1, summarize

LABELS = {"vit_adapter_m2f": "ViT-Adapter + Mask2Former", "sfp_m2f": "w/o ViT-Adapter",
          "sfp_no_pixel_decoder": "w/o pixel decoder", "single_scale": "w/o multi-scale",
          "eomt_masked": "EoMT w/ masking", "eomt": "EoMT"}


def scaling_plot(results: pd.DataFrame, x: str = "FPS", y: str = "PQ", img_size: int = 640,
                 paper: bool = False):
    """One line per variant through its sizes (points labelled S, B, L, g), ``y`` against ``x``.

    ``paper=True`` draws the paper's own Table 3 points (H100 FPS, COCO PQ) instead of the results.
    """
    import matplotlib.pyplot as plt  # headless, matplotlib falls back to Agg by itself; notebooks keep inline

    if paper:
        from study.paper_numbers import paper_rows

        rows = paper_rows()
        rows = rows[rows["table"].isin(["1", "3"])].drop_duplicates(["model.variant", "model.size", "model.img_size"])
        data = rows.assign(**{"model.img_size": rows["model.img_size"].astype(int)})
    else:
        data = summarize(results)
    for axis in (x, y):
        if axis not in data or data[axis].isna().all():
            raise ValueError(f"no '{axis}' values to plot (complete runs with that metric are needed)")
    data = data[data["model.img_size"] == img_size]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for variant in [v for v in TABLE1 if v in set(data["model.variant"])] + \
            sorted(set(data["model.variant"]) - set(TABLE1)):
        d = data[data["model.variant"] == variant].copy()
        d = d.assign(_o=d["model.size"].map(lambda z: SIZES.index(z) if z in SIZES else -1)).sort_values("_o")
        ax.plot(d[x], d[y], marker="o", label=LABELS.get(variant, variant))
        for _, r in d.iterrows():
            ax.annotate(r["model.size"], (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if x == "FPS":
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{y} vs {x} at {img_size}px" + (" (paper, H100)" if paper else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
