"""The baseline chain of Table 1 (rows 0-3), as a table of small named differences.

Placeholder registry until the baseline chain lands: it registers no variant yet.
"""
from __future__ import annotations

BUILDERS: dict = {}
