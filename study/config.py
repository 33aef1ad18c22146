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

import copy
import dataclasses
import hashlib
import json
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from study.errors import UserError
from study.bench.config import BenchConfig
from study.data.config import DataConfig
from study.eval.config import EvalConfig
from study.launch.config import LaunchConfig
from study.models.config import ModelConfig
from study.train.config import TrainConfig


class ConfigError(UserError):
    """A user mistake in a configuration: the message names the key and the file."""


@dataclass
class Config:
    """The whole configuration of one run (train, evaluate, benchmark)."""

    name: str = "run"  # human-readable prefix of the run folder; the folder also carries a hash
    task: Literal["panoptic", "instance", "semantic"] = "panoptic"
    seed: int = 0
    output_dir: str = "runs"  # runs/<grid>/<name>-<hash>/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


# ----------------------------------------------------------------------------------------------- YAML files


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def _merge(base: dict, over: dict, origin: dict, src: str, prefix: str = "") -> dict:
    """Deep-merge ``over`` into a copy of ``base``; ``origin`` records which file set each dotted key."""
    out = dict(base)
    for k, v in over.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, origin, src, key + ".")
        else:
            out[k] = v
            _record(origin, key, v, src)
    return out


def _record(origin: dict, key: str, value: Any, src: str) -> None:
    origin[key] = src
    if isinstance(value, dict):
        for k, v in value.items():
            _record(origin, f"{key}.{k}", v, src)


def load_yaml_tree(path: str | os.PathLike, origin: dict | None = None, _seen: tuple = ()) -> dict:
    """Read a YAML file and the chain of files it builds on (``base: relative/path.yaml``)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config file {path} builds on itself (base chain: {' -> '.join(map(str, _seen))})")
    origin = {} if origin is None else origin
    data = _read_yaml(path)
    base = data.pop("base", None)
    merged: dict = {}
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"'base' in {path} must be a path string, not {type(base).__name__}")
        merged = load_yaml_tree(path.parent / base, origin, _seen + (path,))
    return _merge(merged, data, origin, str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """``model.size=L`` -> ("model.size", "L"); the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (for example model.size=L)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


Override = Union[str, tuple[str, str]]  # "key=value" (from --set), or ("key=value", the flag that set it)


def apply_overrides(tree: dict, overrides: list[Override], origin: dict) -> dict:
    tree = copy.deepcopy(tree)
    for item in overrides:
        text, source = (item, "--set") if isinstance(item, str) else item
        key, value = parse_override(text)
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{text}': '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
        _record(origin, key, value, source)
    return tree


# -------------------------------------------------------------------------------------------- validation


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, origin: dict) -> Any:
    """Check ``value`` against type ``tp``; return it converted (lists to tuples, dicts to dataclasses)."""

    def fail(why: str = "") -> ConfigError:
        src = origin.get(key, "defaults")
        msg = f"config key '{key}' (from {src}) must be {_type_name(tp)}, got {value!r}"
        return ConfigError(msg + (f": {why}" if why else ""))

    o = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail("expected a section (mapping)")
        return build_dataclass(tp, value, origin, key + ".")
    if o is Literal:
        if value not in get_args(tp):
            raise fail()
        return value
    if o in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, origin)
            except ConfigError:
                continue
        raise fail()
    if o in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail("expected a list")
        args = get_args(tp)
        if o is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail(f"expected {len(args)} items")
            items = [_convert(v, a, f"{key}[{i}]", origin) for i, (v, a) in enumerate(zip(value, args))]
        else:
            a = args[0] if args else Any
            items = [_convert(v, a, f"{key}[{i}]", origin) for i, v in enumerate(value)]
        return tuple(items) if o is tuple else items
    if o is dict:
        if not isinstance(value, dict):
            raise fail("expected a mapping")
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(k, kt, key, origin): _convert(v, vt, f"{key}.{k}", origin) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        # PyYAML (YAML 1.1) reads "3e-4" as a string; accept numeric literals written that way.
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


def build_dataclass(cls: type, values: dict, origin: dict | None = None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (partial) mapping, rejecting unknown keys and wrong types."""
    origin = {} if origin is None else origin
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in values:
        if k not in fields:
            src = origin.get(f"{prefix}{k}", "defaults")
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{prefix}{k}' (from {src}); '{prefix or 'top level'}' "
                              f"accepts: {known}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name in values:
            kwargs[name] = _convert(values[name], hints[name], key, origin)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build_dataclass(hints[name], {}, origin, key + ".")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(_refused(str(e), list(fields), prefix, origin)) from None
    if cls is Config:
        check_config(obj, origin)
    return obj


def _refused(msg: str, names: list[str], prefix: str, origin: dict) -> str:
    """A section's ``validate()`` message, with the dotted key and its source: the first field name the
    message mentions is taken as the key at fault (validate messages start with it, by convention)."""
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", msg)
    name = next((w for w in words if w in names), None)
    if name is None:
        section = prefix.rstrip(".") or "top level"
        srcs = sorted({v for k, v in origin.items() if k.startswith(prefix)}) or ["defaults"]
        return f"config section '{section}' (from {', '.join(srcs)}): {msg}"
    key = prefix + name
    return f"config key '{key}' (from {origin.get(key, 'defaults')}): {msg}"


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

    check_model_config(m, origin)
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


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved configuration atomically (temporary file, then rename)."""
    from study.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# Keys that do not change the trained model, left out of a run's identity hash. Evaluation and benchmark
# settings change only those steps' numbers, which record their own settings (study/runs.py).
_NOT_IDENTITY = {"name", "output_dir", "launch", "bench", "eval"}


def config_hash(cfg: Config, length: int = 8) -> str:
    """A short hash of everything that changes the result: the run's identity."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IDENTITY}
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def run_name(cfg: Config) -> str:
    return f"{cfg.name}-{config_hash(cfg)}"
