"""Configuration and grid faults of issue 28 and the run identity of issue 24 item 2, each by its mechanism:
non-finite and out-of-range numbers refused by one rule over every dataclass (study/schema.py), duplicate YAML
keys, conflicting axes and duplicate configurations refused by grid expansion, one containment rule for every
name that becomes a path, readable run names outside the hash, folders named before readable names still
found."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest
import yaml

from study.cli import main
from study.config import ConfigError, config_hash, load_config
from study.launch.grid import expand_grid, readable_names
from study.runs import RunDir, display_name
from study.schema import build_dataclass, path_component
from test_launch import TINY, synthetic_root, write_grid  # noqa: F401 (fixture)


# ------------------------------------------------------------------------ numbers: finite and in range


@pytest.mark.parametrize("override, key", [
    ("train.lr=.nan", "train.lr"),
    ("train.oversample_ratio=.inf", "train.oversample_ratio"),
    ("train.weight_decay=.nan", "train.weight_decay"),
    ("train.grad_clip=.nan", "train.grad_clip"),  # Optional[float]: named, not "non-finite loss" at step 1
    ("train.betas=[0.9, .nan]", "train.betas[1]"),  # inside a tuple too
    ("eval.score_threshold=-.inf", "eval.score_threshold"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}' \(from --set\) .*not a finite number"):
        load_config(None, [override])


def test_seed_out_of_range_is_refused_by_its_declared_range():
    with pytest.raises(ConfigError, match=r"config key 'seed' \(from --set\) is -1, outside its range \[0, 4294967295\]"):
        load_config(None, ["seed=-1"])
    with pytest.raises(ConfigError, match="outside its range"):
        load_config(None, [f"seed={2**32}"])
    assert load_config(None, [f"seed={2**32 - 1}"]).seed == 2**32 - 1  # the largest numpy accepts


def test_the_range_rule_is_generic_over_dataclasses():
    @dataclass
    class Section:
        ratio: float = field(default=0.5, metadata={"range": (0.0, 1.0)})
        sizes: list[int] = field(default_factory=list, metadata={"range": (1, None)})

    assert build_dataclass(Section, {"ratio": 1.0, "sizes": [1, 7]}).sizes == [1, 7]
    with pytest.raises(ConfigError, match=r"'sizes' .* is 0, outside its range \[1, inf\]"):
        build_dataclass(Section, {"sizes": [3, 0]})
    with pytest.raises(ConfigError, match=r"'ratio' .* is 1.5"):
        build_dataclass(Section, {"ratio": 1.5})


# ------------------------------------------------------------------------ YAML: a key written twice


def test_a_key_written_twice_is_refused_naming_file_and_lines(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("grid:\n  axes:\n    seed: [0, 1]\n    seed: [2]\n")
    with pytest.raises(ConfigError, match=r"g\.yaml: the key 'seed' is written twice .*lines 3 and 4"):
        expand_grid(path)
    with pytest.raises(ConfigError, match="written twice"):
        load_config(path)  # every reader of a config file, not only grids


# ------------------------------------------------------------------------ grids


def test_an_axis_and_a_bundle_setting_the_same_key_are_refused(tmp_path, synthetic_root):
    grid = write_grid(tmp_path, synthetic_root, {"axes": {
        "model.variant": ["eomt"], "arch": [{"model.variant": "eomt_masked", "model.num_queries": 4}]}})
    with pytest.raises(ConfigError, match=r"axes 'model.variant' and 'arch' both set 'model.variant'"):
        expand_grid(grid)


def test_entries_differing_only_in_name_are_one_configuration(tmp_path, synthetic_root):
    grid = write_grid(tmp_path, synthetic_root, {"runs": [{"name": "a", "seed": 1}, {"name": "b", "seed": 1}]})
    with pytest.raises(ConfigError, match=r"runs 0 and 1 .* are the same configuration \(hash [0-9a-f]{8}"):
        expand_grid(grid)


def test_an_empty_grid_section_has_its_own_message(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("train: {max_steps: 2}\ngrid:\n")
    with pytest.raises(ConfigError, match=r"the 'grid:' section of .*g\.yaml is empty"):
        expand_grid(path)
    path.write_text("train: {max_steps: 2}\n")
    with pytest.raises(ConfigError, match="has no 'grid:' section"):
        expand_grid(path)


# ------------------------------------------------------------------------ names that become paths


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".hidden", "", "x\\y"])
def test_every_name_that_becomes_a_path_is_contained(tmp_path, synthetic_root, name, capsys):
    with pytest.raises(ConfigError, match="cannot name a folder"):
        path_component(name, "a name")
    with pytest.raises(ConfigError, match=r"config key 'name' \(from --set\)"):
        load_config(None, [f"name={json.dumps(name)}"])
    grid = write_grid(tmp_path, synthetic_root, {"name": name or " ", "axes": {"seed": [0]}})
    with pytest.raises(ConfigError, match="grid.name"):
        expand_grid(grid)
    # through the command: one line, nothing written outside output_dir
    assert main(["train", "--set", f"name={json.dumps(name)}", "--set", f"output_dir={tmp_path / 'out'}"]) == 2
    assert "cannot name a folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape").exists()


def test_readable_names_come_from_the_keys_that_differ(tmp_path, synthetic_root):
    grid = write_grid(tmp_path, synthetic_root, {"axes": {
        "model.variant": ["eomt", "eomt_masked"], "train.lr": [3e-4, 1e-4], "seed": [1, 2],
        "size": [{"model.size": "tiny", "model.img_size": 64, "model.num_queries": 8}]}})
    _, runs = expand_grid(grid)
    names = [r.config.name for r in runs]
    assert names[:2] == ["eomt-lr3e-4-s1", "eomt-lr3e-4-s2"] and names[-1] == "eomt_masked-lr1e-4-s2"
    assert len(set(names)) == 8  # unique inside the grid
    for r in runs:  # the folder: the name, then the hash of the identity (which the name is not part of)
        assert r.folder.name == f"{r.config.name}-{config_hash(r.config)}"
        assert display_name(RunDir(r.folder)) == r.config.name
    # a bundle's keys that change together give one token (the first: model.size); size and image size join
    assert readable_names([{"model.size": "S", "model.pretrained": "w/s.pth", "model.img_size": 640},
                           {"model.size": "L", "model.pretrained": "w/l.pth", "model.img_size": 640},
                           {"model.size": "L", "model.pretrained": "w/l.pth", "model.img_size": 1280}]) == \
        ["S640", "L640", "L1280"]


def test_a_name_in_an_entry_overrides_and_stays_out_of_the_identity(tmp_path, synthetic_root):
    grid = write_grid(tmp_path, synthetic_root, {"runs": [{"name": "mine", "seed": 1}, {"seed": 2}]})
    _, (a, b) = expand_grid(grid)
    assert a.config.name == "mine" and b.config.name == "s2"
    renamed = write_grid(tmp_path, synthetic_root, {"runs": [{"name": "other", "seed": 1}]})
    _, (c,) = expand_grid(renamed)
    assert config_hash(c.config) == config_hash(a.config)


def test_a_folder_named_before_readable_names_is_still_found(tmp_path, synthetic_root):
    grid = write_grid(tmp_path, synthetic_root, {"axes": {"seed": [1, 2]}})
    _, runs = expand_grid(grid)
    cfg = runs[0].config
    old = RunDir(tmp_path / "runs" / "grid" / f"tiny-{config_hash(cfg)}")  # the old <grid name>-<hash> form
    old.claim(cfg)
    _, again = expand_grid(grid)
    assert again[0].folder == old.path and again[1].folder.name.startswith("s2-")
    assert display_name(old) == "tiny"


def test_readable_names_stay_apart_when_file_names_alone_would_collide():
    """Two weights files of one name in two folders: the names take the whole path rather than give two runs
    one name (tables and figure titles show names without the hash)."""
    from study.launch.grid import readable_names

    assert readable_names([{"model.pretrained": "w/dinov2.pth"}, {"model.pretrained": "w/eva02.pth"}]) == \
        ["pretraineddinov2", "pretrainedeva02"]  # file names suffice: short names
    names = readable_names([{"model.pretrained": "w/dinov2/model.pt"}, {"model.pretrained": "w/eva02/model.pt"}])
    assert len(set(names)) == 2 and all("model" in n for n in names)
    assert len(set(readable_names([{"data.root": "/d/coco"}, {"data.root": "/e/coco"}]))) == 2
