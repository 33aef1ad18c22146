"""Command-line flags that set configuration keys: one path for ``--set`` and every shorthand flag.

Each flag declares the dotted config key it sets. Its action appends ``("key=value", "--flag")`` to
``args.overrides``, the same list ``--set key=value`` appends to, in command-line order; ``load_config(path,
args.overrides)`` then applies them all through the same code (the last one wins) and validates the result,
so a flag can do nothing ``--set`` cannot, and a bad value names the flag it came from. Flags state no
defaults: the value comes from the config (its file, else the dataclass default).

API, for a sub-command's ``register()``::

    from study.flags import add_set_flag, config_flag

    add_set_flag(p)                                            # --set KEY=VALUE, repeatable
    config_flag(p, "--img-size", "bench.img_size", type=int, help="square input size")
    config_flag(p, "--no-fps", "bench.fps", const=False, help="parameters and GFLOPs only")
    config_flag(p, "--sizes", "bench.sizes", type=csv, help="comma-separated sizes")
    ...
    cfg = load_config(args.config, args.overrides)            # in run()

``const=`` makes a switch without an argument that sets that value; ``type=`` converts the flag's text (the
value is then written as JSON, which the YAML reader of ``--set`` reads back unchanged: a string stays a
string, a list a list). Without ``type`` the text is read as YAML, exactly like ``--set``'s.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Optional

DEST = "overrides"
_UNSET = object()


def csv(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (a flag ``type``)."""
    return [t.strip() for t in text.split(",") if t.strip()]


class _SetKey(argparse.Action):
    def __init__(self, option_strings, dest, key: str, const: Any = _UNSET, convert: Optional[Callable] = None,
                 **kw):
        self.key, self.value, self.convert = key, const, convert
        super().__init__(option_strings, dest, nargs=0 if const is not _UNSET else None, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.value is not _UNSET:
            text = f"{self.key}={json.dumps(self.value)}"
        elif self.convert is not None:
            try:
                text = f"{self.key}={json.dumps(self.convert(values))}"
            except ValueError:
                raise argparse.ArgumentError(self, f"invalid value {values!r}") from None
        else:
            text = f"{self.key}={values}"
        items = list(getattr(namespace, DEST, None) or [])
        items.append((text, option_string))
        setattr(namespace, DEST, items)


class _SetText(argparse.Action):
    """``--set key=value``: appended as plain text (its source is "--set")."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, DEST, None) or [])
        items.append(values)
        setattr(namespace, DEST, items)


def add_set_flag(parser: argparse.ArgumentParser, example: str = "train.max_steps=200",
                 help: str | None = None) -> None:
    """``--set KEY=VALUE`` (repeatable), into ``args.overrides``."""
    parser.add_argument("--set", dest=DEST, action=_SetText, default=[], metavar="KEY=VALUE",
                        help=help or f"dotted config override, repeatable (e.g. --set {example})")


def config_flag(parser: argparse.ArgumentParser, flag: str, key: str, *, help: str, type: Callable | None = None,
                const: Any = _UNSET, metavar: str | None = None) -> None:
    """Add ``flag``, which sets config ``key`` (the help says which key). See the module docstring."""
    if parser.get_default(DEST) is None:
        parser.set_defaults(**{DEST: []})
    extra = {} if const is not _UNSET else {"metavar": metavar or key.rsplit(".", 1)[-1].upper()}
    shown = f"{key}={json.dumps(const)}" if const is not _UNSET else key
    parser.add_argument(flag, action=_SetKey, dest=f"_flag_{key}", key=key, const=const, convert=type,
                        default=argparse.SUPPRESS, help=f"{help} (sets {shown})", **extra)
