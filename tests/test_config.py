"""Configuration: base files, dotted overrides, strict validation with messages naming key and file."""
from __future__ import annotations

import pytest
import yaml

from study.config import ConfigError, config_hash, load_config, save_config


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_then_base_then_file_then_overrides(tmp_path):
    write(tmp_path / "base.yaml", {"model": {"size": "S", "num_queries": 100}, "train": {"lr": 2e-4}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "model": {"size": "B"}})
    cfg = load_config(child, ["model.img_size=1280", "train.lr=3e-4"])
    assert cfg.model.size == "B"  # the file overrides its base
    assert cfg.model.num_queries == 100  # the base's value survives the deep merge
    assert cfg.model.img_size == 1280 and cfg.train.lr == 3e-4  # --set wins
    assert cfg.model.num_classes == 133  # untouched default


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path / "bad.yaml", {"model": {"sise": "L"}})
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.sise' \(from .*bad\.yaml\)"):
        load_config(path)


def test_unknown_key_in_base_file_names_the_base(tmp_path):
    write(tmp_path / "base.yaml", {"train": {"learning_rate": 1.0}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml"})
    with pytest.raises(ConfigError, match=r"'train\.learning_rate' \(from .*base\.yaml\)"):
        load_config(child)


@pytest.mark.parametrize("override, key", [
    ("model.img_size=big", "model.img_size"),
    ("model.size=XL", "model.size"),
    ("model.masked_attention=3", "model.masked_attention"),
    ("bench.sizes=L", "bench.sizes"),
])
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}' \(from --set\) must be"):
        load_config(None, [override])


def test_missing_file_and_missing_base(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    child = write(tmp_path / "child.yaml", {"base": "gone.yaml"})
    with pytest.raises(ConfigError, match="config file not found: .*gone.yaml"):
        load_config(child)


def test_validate_rejects_indivisible_input():
    with pytest.raises(ConfigError, match="img_size 650 is not divisible by the patch size 16"):
        load_config(None, ["model.img_size=650"])


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["model.size=S", "train.lr=5e-5", "bench.sizes=[S,B]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(None, ["model.size=B"])) != config_hash(cfg)


# ----------------------------------------------------------------- checks at load time (issue 15 item 5)


def test_mistyped_baseline_option_is_refused_at_load_naming_key_and_file(tmp_path):
    path = write(tmp_path / "run.yaml", {"model": {"variant": "sfp_m2f", "baseline": {"deform_head": 4}}})
    with pytest.raises(ConfigError, match=r"'model\.baseline\.deform_head' \(from .*run\.yaml\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'model\.baseline\.hidden_dim' \(from --set\) must be int"):
        load_config(None, ["model.variant=sfp_m2f", "model.baseline.hidden_dim=wide"])
    # a value the options' validate() refuses names its key too
    with pytest.raises(ConfigError, match=r"'model\.baseline\.hidden_dim' \(from --set\).*multiple of 32"):
        load_config(None, ["model.variant=sfp_m2f", "model.baseline.hidden_dim=100"])
    assert load_config(None, ["model.variant=sfp_m2f", "model.baseline.hidden_dim=64"]).model.baseline == \
        {"hidden_dim": 64}


def test_baseline_options_on_eomt_and_unknown_variant_are_refused_at_load(tmp_path):
    path = write(tmp_path / "run.yaml", {"model": {"baseline": {"hidden_dim": 64}}})
    with pytest.raises(ConfigError, match=r"'model\.baseline' \(from .*run\.yaml\).*do not apply to variant 'eomt'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'model\.variant' \(from --set\): unknown variant 'eomt_xl'.*"
                                          r"registered variants: vit_adapter_m2f, .*eomt.*pip install -e"):
        load_config(None, ["model.variant=eomt_xl"])


@pytest.mark.parametrize("override, key, why", [
    ("model.img_size=0", "model.img_size", "at least the patch size"),
    ("model.img_size=-32", "model.img_size", "at least the patch size"),
    ("model.patch_size=0", "model.patch_size", "must be >= 1"),
    ("model.num_queries=0", "model.num_queries", "must be >= 1"),
    ("eval.input_size=512", "eval.input_size", "model.img_size .* is 640"),
    ("bench.img_size=0", "bench.img_size", "must be >= 1"),
    ("bench.img_size=650", "bench.img_size", "650 is not divisible by the patch size 16"),
    ("bench.iters=0", "bench.iters", "must be >= 1"),
    ("bench.sizes=[S,XL]", "bench.sizes", "unknown model size 'XL'"),
    ("bench.sizes=[]", "bench.sizes", "empty"),
    ("bench.variants=[eomt,eomt_xl]", "bench.variants", "unknown variant 'eomt_xl'"),
    ("bench.device=gpu", "bench.device", "not auto, cpu, cuda"),
    ("launch.steps=[train,evil]", "launch.steps", r"unknown step\(s\) \['evil'\]"),
])
def test_bad_values_are_refused_at_load_naming_the_key(override, key, why):
    with pytest.raises(ConfigError, match=rf"config key '{key}' \(from --set\).*{why}"):
        load_config(None, [override])


def test_eval_input_size_may_equal_the_model_size():
    cfg = load_config(None, ["model.img_size=512", "eval.input_size=512", "bench.img_size=320"])
    assert (cfg.model.img_size, cfg.eval.input_size, cfg.bench.img_size) == (512, 512, 320)


def test_an_override_pair_names_its_flag():
    with pytest.raises(ConfigError, match=r"'bench\.iters' \(from --iters\): iters must be >= 1"):
        load_config(None, [("bench.iters=0", "--iters")])


def test_grid_runs_get_the_same_load_time_checks(tmp_path):
    from study.launch.grid import expand_grid

    grid = write(tmp_path / "grid.yaml", {"model": {"size": "tiny"},
                                          "grid": {"name": "g", "axes": {"model.variant": ["eomt", "sfp_m2f"]}}})
    assert len(expand_grid(grid)[1]) == 2
    # what --dry-run expands: a mistyped option fails here, not in the job
    with pytest.raises(ConfigError, match=r"run 0 \(model.variant=eomt\).*'model\.baseline' \(from --set\)"):
        expand_grid(grid, ["model.baseline.hidden_dim=64"])
    grid = write(tmp_path / "grid.yaml", {"model": {"size": "tiny"},
                                          "grid": {"name": "g", "axes": {"model.variant": ["sfp_m2f"]}}})
    with pytest.raises(ConfigError, match=r"run 0 \(model.variant=sfp_m2f\).*'model\.baseline\.deform_head' "
                                          r"\(from --set\)"):
        expand_grid(grid, ["model.baseline.deform_head=4"])
