"""How a run is named in reports and figure file names: the one place to change when the launcher exposes a
readable run name (``eomt-L640-lr3e-4-s1``); until then the folder's name (``<name>-<hash>``)."""
from __future__ import annotations

import re

import pandas as pd


def run_name(row: pd.Series | dict) -> str:
    """A run's name as reports print it (its folder name; the results table's ``run`` column)."""
    name = row.get("run") if hasattr(row, "get") else None
    return str(name) if isinstance(name, str) and name else "?"


def file_stem(text: str) -> str:
    """``text`` as a safe file-name part (letters, digits, '.', '_', '-'; at most 80 characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "run"
