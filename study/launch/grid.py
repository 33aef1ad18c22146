"""Grids: one YAML file describing many runs (one per row of a paper table, or a sweep).

A grid file is a run configuration (it may build on another with ``base:``) plus a ``grid:`` section::

    base: quickstart.yaml            # the configuration every run starts from
    train: {max_steps: 100}          # ... changed for all runs of the grid
    grid:
      name: table1                   # runs go to <output_dir>/<name>/ (default: the file's stem)
      axes:                          # every combination of these dotted keys (a Cartesian product)
        model.variant: [vit_adapter_m2f, sfp_m2f, eomt]
        seed: [0, 1]
        size:                        # a value may be a mapping: keys that change together (the axis name
          - {model.size: S, model.pretrained: weights/dinov2_vits14_reg4_pretrain.pth}  # is only a label)
          - {model.size: L, model.pretrained: weights/dinov2_vitl14_reg4_pretrain.pth}
      runs:                          # and/or an explicit list, each a mapping of dotted keys
        - {model.variant: eomt, model.size: S}

Each run's configuration is validated like any other (an unknown key or a wrong value names the run and the
key), its folder is ``<output_dir>/<grid name>/<name>-<hash>`` and the hash makes launching a grid twice find
the runs that already exist.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from study.config import Config, ConfigError, apply_overrides, build_dataclass, load_yaml_tree, run_name

_GRID_KEYS = {"name", "axes", "runs"}
_TOP_LEVEL = {f.name for f in fields(Config)}
# configuration keys whose value is itself a mapping: an axis over them lists values, never bundles
_DICT_SETTINGS = {"model.baseline", "launch.slurm_extra"}


@dataclass(frozen=True)
class GridRun:
    """One run of a grid: what sets it apart from the grid's base, and its resolved configuration."""

    changes: dict[str, Any]  # dotted key -> value
    config: Config

    @property
    def folder(self) -> Path:
        return Path(self.config.output_dir) / run_name(self.config)


def _override(key: str, value: Any) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def _dotted(where: str, mapping: Any) -> dict[str, Any]:
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise ConfigError(f"{where} must be a mapping of dotted config keys to values")
    return dict(mapping)


def _is_bundle(axis: str, value: Any) -> bool:
    """An axis value that is a mapping of configuration keys (dotted, or top-level sections) changes them all
    together; a mapping under a configuration key (e.g. an axis ``model.baseline`` of dicts) is a value."""
    if not isinstance(value, dict) or axis in _DICT_SETTINGS:
        return False
    return bool(value) and all(isinstance(k, str) and ("." in k or k in _TOP_LEVEL) for k in value)


def expand_grid(path: str | Path, overrides: list[str] | None = None) -> tuple[str, list[GridRun]]:
    """Read a grid file; return the grid's name and its runs in file order (axes first, then ``runs``).

    ``overrides`` (``key=value``) apply to every run, after the file and before each run's own changes.
    """
    path = Path(path)
    origin: dict = {}
    tree = load_yaml_tree(path, origin)
    spec = tree.pop("grid", None)
    if spec is None:
        raise ConfigError(f"{path} has no 'grid:' section; a single run is launched with `study train`")
    spec = _dotted(f"'grid' in {path}", spec)
    unknown = set(spec) - _GRID_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in the 'grid' section of {path}; it accepts: "
                          f"{', '.join(sorted(_GRID_KEYS))}")
    name = str(spec.get("name") or path.stem)
    axes = _dotted(f"grid.axes in {path}", spec.get("axes") or {})
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.axes.{key} in {path} must be a non-empty list of values")
    changes: list[dict] = []
    for combo in (itertools.product(*axes.values()) if axes else ()):
        change: dict = {}
        for key, value in zip(axes, combo):
            change.update(value if _is_bundle(key, value) else {key: value})
        changes.append(change)
    explicit = spec.get("runs") or []
    if not isinstance(explicit, list):
        raise ConfigError(f"grid.runs in {path} must be a list of mappings")
    changes += [_dotted(f"grid.runs[{i}] in {path}", r) for i, r in enumerate(explicit)]
    if not changes:
        raise ConfigError(f"the grid in {path} has no runs: give grid.axes or grid.runs")

    base_tree = apply_overrides(tree, list(overrides or []), origin)
    runs, seen = [], {}
    for i, change in enumerate(changes):
        where = ", ".join(f"{k}={v}" for k, v in change.items())
        try:
            run_tree = apply_overrides(base_tree, [_override(k, v) for k, v in change.items()], dict(origin))
            cfg = build_dataclass(Config, run_tree, dict(origin))  # registry names and sizes checked too
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"grid {path}, run {i} ({where}): {e}") from None
        cfg = replace(cfg, output_dir=str(Path(cfg.output_dir) / name))
        folder = run_name(cfg)
        if folder in seen:
            raise ConfigError(f"grid {path}: runs {seen[folder]} and {i} ({where}) are the same configuration "
                              f"(they differ at most in name, launch, bench or eval settings, which do not "
                              f"change the trained model) and would share one run folder")
        seen[folder] = i
        runs.append(GridRun(change, cfg))
    return name, runs
