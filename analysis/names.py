"""How a run is named in reports and figure file names: its readable name (study.runs.display_name, e.g.
``eomt-L640-lr3e-4-s1``: the folder name without its hash suffix), the folder name where no folder is known."""
from __future__ import annotations

import re

import pandas as pd


def run_name(row: pd.Series | dict) -> str:
    """A run's name as reports print it."""
    from study.runs import display_name

    name = row.get("run") if hasattr(row, "get") else None
    if not isinstance(name, str) or not name:
        return "?"
    return display_name(name)


def file_stem(text: str) -> str:
    """``text`` as a safe file-name part (letters, digits, '.', '_', '-'; at most 80 characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "run"
