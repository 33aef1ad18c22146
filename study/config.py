"""Configuration: typed dataclasses, YAML files that build on a base file, dotted command-line overrides.

One override layer, in this order: the dataclass defaults, then the YAML file (and the files it builds on,
through a top-level ``base:`` key holding a path relative to the file), then the command line: ``--set
key=value`` and every other flag that sets a config key (study/flags.py), in the order they are written, the
last one winning. Validation is strict: an unknown key, a value of the wrong type, a value a section's
``validate()`` refuses or a missing file ends in one :class:`ConfigError` (a ``UserError``) naming the key and
the file or flag it came from. ``model.baseline`` is checked against the options of the chosen variant
(study/models/build.py) when the config is loaded, not when the model is built.

Each section of the schema lives next to the code it configures (``study/models/config.py`` and so on) and
is a plain dataclass; modules never see the configuration object, builders translate it to arguments.

Input sizes: the three keys and how they relate (checked by :func:`load_config`)
- ``model.img_size``: the side of the square input the model is built for (the backbone's position grid).
  Training crops and pads to it; a built model accepts only this size. It must be a positive multiple of
  ``model.patch_size`` (which must be >= 1).
- ``eval.input_size``: the side of the padded protocol's square and of the windowed protocol's crops.
  Unset (None) means ``model.img_size``; since the model takes only its own size, a value other than
  ``model.img_size`` is refused.
- ``bench.img_size``: the side ``study bench`` builds and measures every variant at (it replaces
  ``model.img_size`` for the benchmark only; the launcher's bench step measures the run's own model at
  ``model.img_size``). It must be a positive multiple of ``model.patch_size``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Literal

import yaml

# The generic machinery lives below the sections (study/schema.py); its names are re-exported here for callers.
from study.schema import (ConfigError, Override, apply_overrides, build_dataclass,  # noqa: F401
                          load_yaml_tree, path_component, to_dict)
from study.bench.config import BenchConfig
from study.data.config import DataConfig
from study.eval.config import EvalConfig
from study.launch.config import LaunchConfig
from study.errors import UserError
from study.models.config import ModelConfig, check_masking
from study.train.config import TrainConfig


@dataclass
class Config:
    """The whole configuration of one run (train, evaluate, benchmark)."""

    # The run's readable name, the folder's prefix (the folder also carries the hash). Not part of the
    # identity. A grid sets it from the keys that differ inside the grid unless an entry gives its own.
    name: str = "run"
    task: Literal["panoptic", "instance", "semantic"] = "panoptic"
    seed: int = field(default=0, metadata={"range": (0, 2**32 - 1)})  # numpy's seeds are 32-bit unsigned
    output_dir: str = "runs"  # runs/<grid>/<name>-<hash>/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def check_loaded(self, origin: dict) -> None:
        """Called by study/schema.py's build_dataclass once the whole configuration is built."""
        check_config(self, origin)


def load_config(path: str | os.PathLike | None = None, overrides: list[Override] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``; validated.

    ``overrides`` items are ``"key=value"`` texts (``--set``), or ``("key=value", "--flag")`` pairs that
    study/flags.py makes so that an error names the flag.
    """
    origin: dict = {}
    tree = load_yaml_tree(path, origin) if path is not None else {}
    tree = apply_overrides(tree, list(overrides or []), origin)
    return build_dataclass(Config, tree, origin)


def check_config(cfg: Config, origin: dict | None = None) -> None:
    """The checks across sections, run whenever a whole :class:`Config` is built (``load_config``, a grid's
    runs): the variant and its ``model.baseline`` options against the registry, ``bench.variants`` against
    the registry, and the input sizes against each other (the rules are in the module docstring)."""
    from study.models.build import check_model_config, variants

    origin = origin or {}
    m = cfg.model

    def src(key: str) -> str:
        return origin.get(key, "defaults")

    path_component(cfg.name, f"config key 'name' (from {src('name')}): the run name")
    check_model_config(m, origin)
    try:  # the one mask-setting resolver (study/models/config.py): a clash is refused at load, --dry-run included
        check_masking(m, cfg.train.mask_annealing)
    except UserError as e:
        raise ConfigError(f"{e} (model.mask_setting from {src('model.mask_setting')}, train.mask_annealing from "
                          f"{src('train.mask_annealing')})") from None
    known = variants()
    unknown = [v for v in cfg.bench.variants if v not in known]
    if unknown:
        raise ConfigError(f"config key 'bench.variants' (from {src('bench.variants')}): unknown variant "
                          f"'{unknown[0]}'; registered variants: {', '.join(known)}")
    if cfg.eval.input_size is not None and cfg.eval.input_size != m.img_size:
        raise ConfigError(f"config key 'eval.input_size' (from {src('eval.input_size')}) is "
                          f"{cfg.eval.input_size} but model.img_size (from {src('model.img_size')}) is "
                          f"{m.img_size}: the model takes only its own input size; leave eval.input_size unset "
                          f"or set model.img_size instead")
    if cfg.bench.img_size % m.patch_size:
        raise ConfigError(f"config key 'bench.img_size' (from {src('bench.img_size')}): {cfg.bench.img_size} is "
                          f"not divisible by the patch size {m.patch_size} (model.patch_size, from "
                          f"{src('model.patch_size')})")


# ------------------------------------------------------------------------------------- saving, identity


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved configuration atomically (temporary file, then rename)."""
    from study.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# Keys that do not change the trained model, left out of a run's identity hash. Evaluation and benchmark
# settings change only those steps' numbers, which record their own settings (study/runs.py).
_NOT_IDENTITY = {"name", "output_dir", "launch", "bench", "eval",
                 # how a run is followed, not what it computes: the weights are bitwise the same with any of these
                 # (tests/test_train_hooks.py), and runs made before these keys existed keep their hash
                 "train.log_every", "train.log_every_s", "train.eval_every", "train.eval_max_images"}


def config_hash(cfg: Config, length: int = 8) -> str:
    """A short hash of everything that changes the result: the run's identity."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IDENTITY}
    for dotted in (k for k in _NOT_IDENTITY if "." in k):
        section, key = dotted.split(".", 1)
        if isinstance(d.get(section), dict):
            d[section] = {k: v for k, v in d[section].items() if k != key}
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def run_name(cfg: Config) -> str:
    """The folder name of a new run: its readable name (sanitised, contained: :func:`path_component`), then
    the hash. An existing folder of the same hash is found by study/runs.py whatever its name."""
    return f"{path_component(cfg.name, 'run name')}-{config_hash(cfg)}"
