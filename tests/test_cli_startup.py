"""The `study` command starts lean: building its parser imports neither torch nor pandas, so `study score`
(which needs neither) and every `--help` start in a fraction of a second; each sub-command imports what it
needs when it runs."""
from __future__ import annotations

import subprocess
import sys

from conftest import data_dir


def test_the_parser_imports_neither_torch_nor_pandas():
    code = ("import sys; from study.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_study_score_imports_no_torch():
    """`study score panoptic` scores the COCO panoptic sample against itself (PQ 100) without importing torch."""
    root = data_dir("coco_panoptic_sample")
    gt, pngs = root / "panoptic_examples.json", root / "panoptic_examples"
    code = ("import sys; from study.cli import main; "
            f"rc = main(['score', 'panoptic', '--gt-json', '{gt}', '--gt-dir', '{pngs}', '--pred-json', '{gt}', "
            f"'--pred-dir', '{pngs}', '--categories', '{root / 'panoptic_coco_categories.json'}']); "
            "print(rc, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.split()[-2:] == ["0", "False"], (res.stdout, res.stderr)
    assert "100.0" in res.stdout  # it really scored
