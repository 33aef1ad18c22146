"""Generic configuration machinery, below every section that uses it: YAML files that build on a base file,
dotted overrides, and building a typed dataclass from a mapping with strict validation.

Nothing here knows a section of the suite's schema (study/config.py assembles those); sections and the model
registry import it freely, and it imports none of them, so no import circle runs through it.

Validation, one rule for every dataclass built here:
- an unknown key, or a value of the wrong type, names the dotted key and the file or flag that set it;
- a float must be finite: ``.nan``, ``.inf`` and ``-.inf`` are refused everywhere (a NaN learning rate or
  clip norm otherwise reaches torch and ends in a traceback or a "non-finite loss" that names no key);
- a field may declare its range in its metadata, ``field(default=0, metadata={"range": (0, 2**32 - 1)})``
  (bounds inclusive, None for open), checked for numbers and for each number of a list;
- then the section's own ``validate()`` (a ValueError becomes a ConfigError naming the key its message
  starts with), then, for a whole configuration, its ``check_loaded(origin)`` (checks across sections).

YAML files are read with a loader that refuses a key written twice in one mapping (PyYAML keeps the last one
silently: a grid's ``seed`` axis written twice lost its first list).

Names that become paths (a run's name, a grid's name) go through :func:`path_component`: one containment rule,
so that no name climbs out of ``output_dir``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from study.errors import UserError


class ConfigError(UserError):
    """A user mistake in a configuration: the message names the key and the file."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # merge keys (<<) first: a merged key may be overridden on purpose
    first: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            line = first.setdefault(key, key_node.start_mark.line)
        except TypeError:  # an unhashable key: SafeConstructor refuses it with its own message
            continue
        if line != key_node.start_mark.line:
            where = key_node.start_mark.name
            raise ConfigError(f"{where}: the key {key!r} is written twice in one mapping (lines {line + 1} and "
                              f"{key_node.start_mark.line + 1}); YAML would keep only the last one. Write it "
                              f"once (for a grid axis, one list holding every value)")
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(stream) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (a ConfigError naming the file, the key and the lines)."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


# Characters a name that becomes a folder keeps; any other is replaced by '_'.
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")


def path_component(name: Any, what: str) -> str:
    """``name`` as one folder name inside its parent: the one containment rule for every name that becomes a
    path. A name that would leave the parent or hide (a path separator, '..', a leading '.', empty) is refused
    with a ConfigError naming ``what``; other unsafe characters (spaces, quotes, ...) become '_'."""
    text = str(name)
    if (not text.strip() or "/" in text or "\\" in text or "\0" in text or text.startswith(".")
            or text in (".", "..")):
        raise ConfigError(f"{what} {text!r} cannot name a folder: it must be one plain folder name (no '/', no "
                          f"'..', not starting with '.'), so that the run stays inside output_dir")
    return _UNSAFE.sub("_", text.strip())[:120]


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = load_yaml(f)
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
        value = load_yaml(raw) if raw.strip() else ""
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
        src = origin.get(key) or origin.get(re.sub(r"\[\d+\]", "", key), "defaults")  # a list item: its list's
        msg = f"config key '{key}' (from {src}) must be {_type_name(tp)}, got {value!r}"
        return ConfigError(msg + (f": {why}" if why else ""))

    o = get_origin(tp)
    if tp is Any:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise fail("not a finite number (nan and inf are refused)")
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
            _check_range(kwargs[name], f.metadata.get("range"), key, origin)
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
    whole = getattr(obj, "check_loaded", None)  # checks across sections (study/config.py's Config)
    if callable(whole):
        whole(origin)
    return obj


def _check_range(value: Any, bounds: Any, key: str, origin: dict) -> None:
    """A field's declared range (``metadata={"range": (lo, hi)}``, inclusive, None = open) on a number or on
    each number of a list."""
    if bounds is None or value is None:
        return
    lo, hi = bounds
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and \
                ((lo is not None and v < lo) or (hi is not None and v > hi)):
            span = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise ConfigError(f"config key '{key}' (from {origin.get(key, 'defaults')}) is {v}, outside its range "
                              f"{span}")


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


def to_dict(cfg: Any) -> dict:
    """A dataclass as plain JSON-able data (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))
