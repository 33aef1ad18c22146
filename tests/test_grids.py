"""Every grid in experiments/ passes `study launch GRID --dry-run`: its runs load and validate, and the files
they name exist (the test makes them, empty, where each run names one; data.root a folder of its own)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from study.cli import main
from study.launch.grid import expand_grid

GRIDS = sorted(p.name for p in (REPO / "experiments").glob("*.yaml") if "grid" in (yaml.safe_load(p.read_text()) or {}))


def test_the_tables_have_grids():
    for name in ("table1", "table2", "table3", "table4_coco", "table4_ade20k", "table5_ade20k", "table5_cityscapes",
                 "table6", "table7", "tableC", "tableD_l2", "table2_dinov3"):
        assert f"{name}.yaml" in GRIDS, name


@pytest.mark.parametrize("grid", GRIDS)
def test_grid_dry_run(grid, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    sets = [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}"]
    path = REPO / "experiments" / grid
    _, runs = expand_grid(path, sets)
    for r in runs:
        m = r.config.model
        for f in (m.pretrained, m.checkpoint, m.init_from):
            if f:
                Path(f).parent.mkdir(parents=True, exist_ok=True)
                Path(f).touch()
    assert main(["launch", str(path), "--dry-run", *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert f"{len(runs)} submit" in out


@pytest.mark.parametrize("grid,key,values", [
    ("table7.yaml", "model.mask_setting", ["masked", "masked_train_only", "unmasked", "annealed"]),
    ("tableC.yaml", "model.mask_setting", ["masked", "unmasked", "annealed"] * 2),
])
def test_mask_grids_reproduce_the_table_rows(grid, key, values):
    """Each run of the Table 7 and C grids is one row of its table (study/paper_numbers.csv)."""
    from study import paper_numbers as pn
    from study.config import to_dict

    _, runs = expand_grid(REPO / "experiments" / grid)
    assert sorted(getattr(r.config.model, key.split(".")[1]) for r in runs) == sorted(values)
    table = grid[len("table"):-len(".yaml")]
    rows = set()
    for r in runs:
        flat = {f"{s}.{k}": v for s, sec in to_dict(r.config).items() if isinstance(sec, dict) for k, v in sec.items()}
        hit = pn.lookup({**flat, "task": r.config.task}, table)
        assert hit is not None, r.changes
        rows.add((hit["group"], hit["row"]))
    assert len(rows) == len(runs)


def test_table4_ade20k_runs_start_from_coco_with_a_new_class_head():
    _, runs = expand_grid(REPO / "experiments" / "table4_ade20k.yaml")
    assert len(runs) == 5
    for r in runs:
        m = r.config.model
        assert m.init_from and m.reinit_class_head and m.num_classes == 150
        assert r.config.data.dataset == "ade20k_panoptic"
