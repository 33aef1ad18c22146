"""Rules of the COCO annotation formats that every reader shares: the training readers (study/data/coco.py) and
the scorers (study/eval/pq_files.py) read one annotation the same way. Imports nothing heavy (``study score``
starts without torch)."""
from __future__ import annotations

from study.errors import UserError


def crowd_flag(record: dict, where: str, error: type[UserError] = UserError) -> bool:
    """A segment's or an annotation's ``iscrowd``: absent, 0 or 1 (false / true). Any other value (2, "1", "0")
    raises ``error`` naming ``where``: panopticapi reads only 1 as crowd, hotcoco any non-zero number, and a
    reader that takes ``bool(value)`` makes "0" a crowd, so the only safe rule is to refuse the rest."""
    v = record.get("iscrowd", 0)
    if not isinstance(v, (int, bool)) or v not in (0, 1):
        raise error(f"{where} has iscrowd {v!r:.40}; expected 0 or 1")
    return bool(v)
