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
