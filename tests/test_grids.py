"""Every grid in experiments/ passes `study launch GRID --dry-run`: its runs load and validate, and the files
they name exist (the test makes them, empty, where each run names one; data.root a folder of its own)."""
from __future__ import annotations

import os
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
    """The dry run opens what each run names: the weights files (written here as loadable, empty state dicts),
    the data set's splits in their layout (recorded here: reading real layouts is tests/test_cli_faults.py's
    job), and for a Slurm grid sbatch and srun (stand-ins on PATH) with the sbatch settings shown."""
    import torch

    import study.data.build

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    opened = []
    monkeypatch.setattr(study.data.build, "build_dataset",
                        lambda data, split, task: opened.append((data.dataset, split, task)) or [None])
    sets = [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}"]
    path = REPO / "experiments" / grid
    _, runs = expand_grid(path, sets)
    for r in runs:
        m = r.config.model
        for f in (m.pretrained, m.checkpoint, m.init_from):
            if f:
                Path(f).parent.mkdir(parents=True, exist_ok=True)
                if f.endswith(".safetensors"):
                    from safetensors.torch import save_file

                    save_file({"x": torch.zeros(1)}, f)
                else:
                    torch.save({}, f)
    assert main(["launch", str(path), "--dry-run", *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert f"{len(runs)} submit" in out
    real = {(r.config.data.dataset, r.config.task) for r in runs if r.config.data.dataset != "synthetic"}
    assert {(d, t) for d, _, t in opened} == real  # every data set a run names was opened
    if any(r.config.launch.cluster == "slurm" for r in runs):
        assert f"sbatch ({bin_dir / 'sbatch'})" in out  # the Slurm dry run shows its settings


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
