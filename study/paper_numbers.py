"""The paper's published numbers (study/paper_numbers.csv), read once; everything that prints a paper number
reads it from here (docs/paper.md sections 2-4).

:func:`paper_table` gives the rows, :func:`row_keys` the configuration of a row with every default filled in
and resolved (so a run and a row compare key by key), :func:`lookup` the published columns of the row that a
configuration reproduces.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING
from importlib import resources

from study.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

TABLES = ("1", "B", "2", "3", "4", "5", "6", "7", "C", "D", "9")
# Reference rows from outside the paper, marked by a table id of their own so that nothing takes them for the
# paper's: the official model zoo's EoMT-DINOv3 (tue-mps/eomt model_zoo/dinov3.md, the official DINOv3 recipe).
REFERENCE_TABLES = ("zoo-dinov3",)
METRICS = ("params_M", "GFLOPs", "FPS", "throughput", "PQ", "PQ_th", "PQ_st", "AP", "mIoU")
ROW_ID = ("table", "group", "row")


@functools.lru_cache(maxsize=1)
def _read() -> pd.DataFrame:
    import pandas as pd  # here, not at the top: `study score` and the other commands start without pandas

    with resources.files("study").joinpath("paper_numbers.csv").open() as f:
        data = pd.read_csv(f, comment="#", dtype=str, keep_default_na=False)
    for m in METRICS:
        data[m] = pd.to_numeric(data[m].replace("", None))
    return data


def paper_rows() -> pd.DataFrame:
    """Every published row (a copy): ``table, group, row``, the config columns (strings, '' = default),
    ``needs``, the metric columns (floats, NaN = not printed) and ``note``."""
    return _read().copy()


def config_columns(data: pd.DataFrame | None = None) -> list[str]:
    """The configuration keys the rows are made of (dotted names of study/config.py)."""
    data = _read() if data is None else data
    return [c for c in data.columns if c not in (*ROW_ID, "needs", "note", *METRICS)]


def paper_table(table: str) -> pd.DataFrame:
    """The rows of one table in the paper's order (or of a reference table, :data:`REFERENCE_TABLES`)."""
    if str(table) not in TABLES + REFERENCE_TABLES:
        raise UserError(f"unknown table '{table}'; the paper's tables are {', '.join(TABLES)} (reference rows: "
                        f"{', '.join(REFERENCE_TABLES)})")
    return _read()[_read()["table"] == str(table)].reset_index(drop=True)


@functools.lru_cache(maxsize=1)
def config_defaults() -> dict:
    """Every configuration key (dotted) with its default value."""
    from study.config import Config, to_dict

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v and k != "baseline":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    return flat(to_dict(Config()))


def _parse(text: str, default):
    """A CSV cell as the type of the key's default ('' = the default)."""
    if text == "":
        return default
    if isinstance(default, bool) or text in ("true", "false"):
        return text == "true"
    if isinstance(default, int) or (default is None and text.lstrip("-").isdigit()):
        return int(text)
    return text


def _normal(value):
    """A results-table cell (NaN for missing, floats for ints after a CSV) as a plain value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if hasattr(value, "item"):
        return _normal(value.item())
    return value


def resolve(keys: dict) -> dict:
    """Fill the defaults that depend on other keys, as the model builder and trainer do: L2 and the DINOv2
    backbone from the size (docs/paper.md section 5), and the mask setting (study/models/config.py
    ``MASK_SETTINGS``, Tables 7 and C): ``model.mask_setting`` when given, else masked attention, masked
    inference (the variant's default when unset) and mask annealing (study/train/config.py: annealed exactly
    when not masked at inference, when unset). The result holds all four keys resolved, ``model.mask_setting``
    named after the three others ('custom' for a combination without a name), so that a run configured by
    name and one configured key by key compare equal. ``eomt_masked`` is EoMT with masked inference by
    default: it resolves to ``eomt`` with the setting ``masked``."""
    from study.models.backbone import SIZES
    from study.models.config import mask_setting_name, resolve_masking

    out = dict(keys)
    spec = SIZES.get(out.get("model.size"))
    if "model.num_query_blocks" in out and out["model.num_query_blocks"] is None and spec is not None:
        out["model.num_query_blocks"] = spec.query_blocks
    if "model.backbone" in out and out["model.backbone"] is None and spec is not None:
        out["model.backbone"] = spec.backbone
    masking_keys = ("model.mask_setting", "model.masked_attention", "model.masked_inference", "train.mask_annealing")
    if any(k in out for k in masking_keys):
        # the one resolver of the model builder and the trainer (study/models/config.py)
        from study.models.build import unmasked_at_inference  # the variant registry's trait

        m = resolve_masking(out.get("model.mask_setting") or None, out.get("model.masked_attention") is not False,
                            out.get("model.masked_inference"),
                            out.get("model.variant") not in unmasked_at_inference(), out.get("train.mask_annealing"))
        resolved = dict(zip(masking_keys, (mask_setting_name(m) or "custom", m.attention, m.inference, m.annealing)))
        out.update({k: v for k, v in resolved.items() if k in out})
    if out.get("model.variant") == "eomt_masked":
        out["model.variant"] = "eomt"
    return out


def row_keys(row: pd.Series) -> dict:
    """The resolved configuration of one paper row (every config column)."""
    defaults = config_defaults()
    return resolve({k: _parse(row[k], defaults[k]) for k in config_columns()})


def run_keys(run: pd.Series | dict) -> dict:
    """The resolved configuration of one results-table row, on the same keys as :func:`row_keys`."""
    defaults = config_defaults()
    values = {k: _normal(run[k]) if k in run else None for k in config_columns()}
    return resolve({k: defaults[k] if v is None else v for k, v in values.items()})


def lookup(config: dict, table: str | None = None) -> dict | None:
    """The published columns (and ``table``, ``group``, ``row``, ``note``) of the first row, of ``table`` or of
    any table in :data:`TABLES` order (the paper's only: reference rows need ``table``), whose configuration is
    ``config`` (dotted keys; missing = default)."""
    import pandas as pd

    want = run_keys(config)
    rows = _read()[_read()["table"].isin(TABLES)] if table is None else paper_table(table)
    for _, r in rows.iterrows():
        if r["needs"] == "" and row_keys(r) == want:
            return {k: (None if k in METRICS and pd.isna(r[k]) else r[k])
                    for k in (*ROW_ID, *METRICS, "note")}
    return None


def paper_numbers(variant: str, size: str, img_size: int, task: str = "panoptic",
                  backbone: str | None = None) -> dict | None:
    """The published params, GFLOPs and FPS of a model in the paper's default setting of ``task`` (COCO
    panoptic or instance at ``img_size``; semantic: Cityscapes at 1024, ADE20K at 512), or None. ``backbone``
    (``model.backbone``; None = the size's DINOv2) must be the row's too: the paper has no DINOv3 row."""
    setting = {"panoptic": {"data.dataset": "coco_panoptic"},
               "instance": {"data.dataset": "coco_instance", "model.num_classes": 80}}.get(task)
    if setting is None:
        return None
    return lookup({"task": task, "model.variant": variant, "model.size": size, "model.img_size": img_size,
                   "model.backbone": backbone, **setting})


def check_config_keys() -> None:
    """Every config column is a configuration key (the data file and study/config.py agree)."""
    unknown = [c for c in config_columns() if c not in config_defaults()]
    if unknown:
        raise UserError(f"study/paper_numbers.csv: column(s) {unknown} are not configuration keys")


__all__ = ["TABLES", "REFERENCE_TABLES", "METRICS", "paper_rows", "paper_table", "config_columns", "row_keys", "run_keys", "lookup",
           "paper_numbers", "resolve", "config_defaults", "check_config_keys"]
