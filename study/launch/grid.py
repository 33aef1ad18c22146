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
the runs that already exist (whatever readable name their folder has: study/runs.py ``RunDir.for_config``).

Names: a run's ``name`` is made from the keys that set it apart inside the grid (``eomt-L640-lr3e-4-s1``: the
fewest keys, in file order, that tell the runs apart; :func:`readable_names`), unless its entry gives a
``name``. The name is not part of the identity: two entries differing only in ``name`` are the same
configuration and are refused. Every name that becomes a folder (run names, ``grid.name``) passes the one
containment rule of study/schema.py (:func:`path_component`).

Refused: a key written twice in the file (the YAML loader), two axes that set the same key (an axis and a
bundle axis, or two bundles), two runs of the same configuration, an empty ``grid:`` section.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from study.config import (Config, ConfigError, apply_overrides, build_dataclass, config_hash, load_yaml_tree,
                          path_component)
from study.runs import RunDir

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
        return RunDir.for_config(self.config).path


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
    if "grid" not in tree:
        raise ConfigError(f"{path} has no 'grid:' section; a single run is launched with `study train`")
    spec = tree.pop("grid")
    if not spec:
        raise ConfigError(f"the 'grid:' section of {path} is empty: give grid.axes (lists of values) or grid.runs "
                          f"(a list of mappings); see study/launch/grid.py")
    spec = _dotted(f"'grid' in {path}", spec)
    unknown = set(spec) - _GRID_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in the 'grid' section of {path}; it accepts: "
                          f"{', '.join(sorted(_GRID_KEYS))}")
    name = path_component(spec.get("name") or path.stem, f"grid.name in {path}")
    axes = _dotted(f"grid.axes in {path}", spec.get("axes") or {})
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.axes.{key} in {path} must be a non-empty list of values")
    changes: list[dict] = []
    for combo in (itertools.product(*axes.values()) if axes else ()):
        change: dict = {}
        set_by: dict[str, str] = {}
        for axis, value in zip(axes, combo):
            for key, v in (value if _is_bundle(axis, value) else {axis: value}).items():
                if key in set_by:
                    raise ConfigError(f"grid.axes in {path}: axes '{set_by[key]}' and '{axis}' both set '{key}' "
                                      f"(one of the values would be dropped without a word); set each key in one "
                                      f"axis")
                set_by[key] = axis
                change[key] = v
        changes.append(change)
    explicit = spec.get("runs") or []
    if not isinstance(explicit, list):
        raise ConfigError(f"grid.runs in {path} must be a list of mappings")
    changes += [_dotted(f"grid.runs[{i}] in {path}", r) for i, r in enumerate(explicit)]
    if not changes:
        raise ConfigError(f"the grid in {path} has no runs: give grid.axes or grid.runs")

    base_tree = apply_overrides(tree, list(overrides or []), origin)
    auto = readable_names(changes)
    runs, seen = [], {}
    for i, change in enumerate(changes):
        where = ", ".join(f"{k}={v}" for k, v in change.items())
        try:
            run_tree = apply_overrides(base_tree, [_override(k, v) for k, v in change.items()], dict(origin))
            cfg = build_dataclass(Config, run_tree, dict(origin))  # registry names and sizes checked too
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"grid {path}, run {i} ({where}): {e}") from None
        cfg = replace(cfg, output_dir=str(Path(cfg.output_dir) / name),
                      name=cfg.name if "name" in change or not auto[i] else auto[i])
        identity = config_hash(cfg)
        if identity in seen:
            raise ConfigError(f"grid {path}: runs {seen[identity]} and {i} ({where}) are the same configuration "
                              f"(hash {identity}: they differ at most in name, launch, bench or eval settings, "
                              f"which do not change the trained model); a second seed is a seed axis")
        seen[identity] = i
        runs.append(GridRun(change, cfg))
    return name, runs


def _value_text(value: Any, whole_paths: bool = False) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value and (abs(value) < 1e-2 or abs(value) >= 1e5):
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"  # 0.0003 -> 3e-4
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if isinstance(value, str):
        if "/" in value and not whole_paths:
            return Path(value).stem  # a weights path: its file name
        return value.strip("/").replace("/", "_") if "/" in value else value
    return yaml.safe_dump(value, default_flow_style=True).strip()


# Keys whose token is the value alone (words that say what they are) or a short prefix; any other key's token
# is its last part and the value (``weight_decay0.1``).
_PREFIX = {"model.variant": "", "model.size": "", "model.img_size": "", "model.backbone": "", "task": "",
           "data.dataset": "", "train.lr": "lr", "seed": "s", "model.num_queries": "q", "train.max_steps": "steps",
           "train.batch_size": "bs"}


def _token(key: str, value: Any, whole_paths: bool = False) -> str:
    prefix = _PREFIX.get(key, key.rsplit(".", 1)[-1])
    text = _value_text(value, whole_paths)
    return (prefix + text) if not isinstance(value, bool) else (f"{prefix}-{text}" if prefix else text)


def readable_names(changes: list[dict]) -> list[str]:
    """A readable name per run from the keys that differ inside the grid, in file order; of keys that change
    together (a bundle's, e.g. ``model.size`` with its ``model.pretrained``) the first gives the token;
    ``model.size`` and ``model.img_size`` join (``L640``). Sanitised (:func:`path_component`); '' when nothing
    differs. Paths give their file name, or their whole path where file names alone would give two runs one
    name (``w/dinov2/model.pt`` and ``w/eva02/model.pt``)."""
    names = _names(changes, whole_paths=False)
    return names if len(set(names)) == len(names) else _names(changes, whole_paths=True)


def _names(changes: list[dict], whole_paths: bool) -> list[str]:
    keys = list(dict.fromkeys(k for c in changes for k in c if k != "name"))

    def partition(key: str) -> tuple[int, ...]:  # runs labelled by the first run holding the same value
        first: dict[str, int] = {}
        return tuple(first.setdefault(json.dumps(c.get(key), sort_keys=True, default=str), i)
                     for i, c in enumerate(changes))

    chosen, taken = [], set()
    for key in keys:
        p = partition(key)
        if len(set(p)) > 1 and p not in taken:
            chosen.append(key)
            taken.add(p)
    names = []
    for c in changes:
        tokens = ({k: _token(k, c[k], whole_paths) for k in chosen if k in c}
                  or {k: _token(k, v, whole_paths) for k, v in c.items() if k != "name"})
        if "model.size" in tokens and "model.img_size" in tokens:
            tokens["model.size"] += tokens.pop("model.img_size")
        text = "-".join(t for t in tokens.values() if t).replace("/", "_").replace("\\", "_").lstrip(".")
        names.append(path_component(text, "readable run name") if text else "")
    return names
