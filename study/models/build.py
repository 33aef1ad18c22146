"""From configuration to model: the variant registry and the builder.

Every row of Table 1 is a registered :class:`Variant`: a name, a builder ``ModelConfig -> Segmenter``, its
Table 1 row number and the row's label as printed in Table 1 (docs/paper.md section 2). ``variants()`` lists
them in Table 1 order, ``table1_rows()`` gives rows 0-5 for tables, plots and benchmarks.

How variants get registered (and why this way)
----------------------------------------------
- EoMT's two rows (4 and 5) are registered here, by study itself.
- Every other package registers its variants through a Python entry point of group ``study.variants``
  (declared in its ``pyproject.toml``), naming a function ``hook(register)`` that calls
  ``register(name, builder, row=..., label=..., eomt=..., masked_inference=..., components=...)`` once per
  variant: the variant's traits live in its record, and the tables, plots and evaluation read them from
  here. The baseline chain (rows 0-3) is ``baselines = "baselines.variants:register_variants"`` in this project's ``pyproject.toml``.
- The entry points are loaded once, explicitly, on the first read of the registry (``variants()``,
  ``check_variant()``, ``build_model()``, ``table1_rows()``), never as a side effect of importing something.

Why entry points: the registry must be complete in every process that builds a model, and those processes
start in different places: the ``study`` command, ``torchrun -m study.cli train``, the submitit job
processes that unpickle ``study.launch.pipeline.RunJob`` and never run ``study/cli.py``, and tests that call
``build_model`` directly. Registering from the command line's composition root would miss the last two;
registering as a side effect of importing ``baselines`` would miss any process that happened not to import it,
and fail as "not in the registry" far from the cause. The installed package metadata is the same in all of
them, and ``study/`` still imports nothing from ``baselines/`` (tests/test_layering.py checks that). The cost:
after changing an entry point in ``pyproject.toml`` the package must be reinstalled (``pip install -e .``); an
unknown name's error says so, and lists the registered names.

Adding a variant touches one file (its builder module, plus one ``register(...)`` line in its hook) and its
test; a new package adds one entry point.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Optional

from study.errors import UserError
from study.models.backbone import build_backbone, check_size
from study.models.config import ModelConfig
from study.models.contract import Segmenter
from study.models.eomt import EoMT

ENTRY_POINT_GROUP = "study.variants"


@dataclass(frozen=True)
class Variant:
    """One registered model variant."""

    name: str
    builder: Callable[[ModelConfig], Segmenter]
    row: Optional[int]  # Table 1 row (docs/paper.md section 2), None for a variant outside Table 1
    label: str  # the row's label as printed in Table 1 (the name, outside Table 1)
    # The dataclass that ``model.baseline`` must fit for this variant (checked when the config is loaded,
    # through study.config.build_dataclass); None: the variant takes no ``model.baseline`` options.
    options: Optional[type] = None
    eomt: bool = False  # an EoMT model (token merging and the EoMT-only settings apply)
    # masked attention kept at inference when model.mask_setting / model.masked_inference are unset
    masked_inference: bool = True
    # the names of ``model.components()`` in forward order: the parts of the time and GFLOPs breakdowns
    components: tuple[str, ...] = ()


_REGISTRY: dict[str, Variant] = {}
_loaded = False  # entry points loaded (or being loaded)


def register_variant(name: str, builder: Callable[[ModelConfig], Segmenter], row: int | None = None,
                     label: str | None = None, options: type | None = None, eomt: bool = False,
                     masked_inference: bool = True, components: tuple[str, ...] = ()) -> Variant:
    """Add a variant to the registry with its traits (see :class:`Variant`); a name or a Table 1 row registered
    twice is refused (ValueError)."""
    if name in _REGISTRY:
        old = _REGISTRY[name]
        raise ValueError(f"variant '{name}' is already registered (builder {_where(old.builder)}); "
                         f"refusing a second registration from {_where(builder)}")
    if row is not None:
        taken = [v.name for v in _REGISTRY.values() if v.row == row]
        if taken:
            raise ValueError(f"Table 1 row {row} is already registered as '{taken[0]}'; refusing '{name}'")
    variant = Variant(name, builder, row, label or name, options, bool(eomt), bool(masked_inference),
                      tuple(components))
    _REGISTRY[name] = variant
    return variant


def _where(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _load_entry_points() -> None:
    """Run every ``study.variants`` entry point's hook once (the first time the registry is read)."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # set first: a hook may read the registry while registering
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        hook = ep.load()  # an ImportError here is a bug in that package: keep its traceback
        hook(register_variant)


def variants() -> dict[str, Variant]:
    """Every registered variant, in Table 1 order (row 0 first), then the others in registration order."""
    _load_entry_points()
    ordered = sorted(_REGISTRY.values(), key=lambda v: (v.row is None, v.row if v.row is not None else 0))
    return {v.name: v for v in ordered}


def table1_rows() -> list[Variant]:
    """The variants of Table 1's rows 0-5, in row order (refuses a registry with a row missing)."""
    rows = [v for v in variants().values() if v.row is not None]
    missing = sorted(set(range(6)) - {v.row for v in rows})
    if missing:
        raise UserError(f"Table 1 rows {missing} are not registered (registered: {_registered()}); "
                        f"{_HOW}")
    return rows


_HOW = (f"variants are registered by study/models/build.py (EoMT) and by the '{ENTRY_POINT_GROUP}' entry points "
        f"of installed packages (the baselines: pyproject.toml); after changing pyproject.toml run "
        f"`pip install -e .` again")


def _registered() -> str:
    return ", ".join(variants()) or "none"


def eomt_variants() -> tuple[str, ...]:
    """The names of the registered EoMT variants (``Variant.eomt``)."""
    return tuple(v.name for v in variants().values() if v.eomt)


def unmasked_at_inference() -> tuple[str, ...]:
    """The variants that drop masked attention at inference by default (``Variant.masked_inference`` False)."""
    return tuple(v.name for v in variants().values() if not v.masked_inference)


def all_components() -> list[str]:
    """Every registered variant's components, each once, in registry order (then 'other', the breakdowns'
    remainder): one fixed order, so that a component keeps one colour in every figure."""
    out: list[str] = []
    for v in variants().values():
        out += [c for c in v.components if c not in out]
    return out + (["other"] if "other" not in out else [])


def get_variant(name: str) -> Variant:
    """The registered variant ``name``; an unknown name is a UserError listing the registered ones."""
    table = variants()
    if name not in table:
        raise UserError(f"unknown variant '{name}'; registered variants: {_registered()} ({_HOW})")
    return table[name]


def check_variant(name: str) -> None:
    get_variant(name)


def check_model_config(cfg: ModelConfig, origin: dict | None = None) -> None:
    """Load-time checks that need the registry: the variant exists, and ``model.baseline`` fits its options.

    ``origin`` maps dotted keys to the file (or flag) that set them, so that an error names both.
    """
    from study.schema import ConfigError, build_dataclass

    origin = origin or {}
    table = variants()
    if cfg.variant not in table:
        src = origin.get("model.variant", "defaults")
        raise ConfigError(f"config key 'model.variant' (from {src}): unknown variant '{cfg.variant}'; "
                          f"registered variants: {_registered()} ({_HOW})")
    v = table[cfg.variant]
    if cfg.token_merging.enabled and not v.eomt:  # the record's trait
        src = origin.get("model.token_merging.enabled", "defaults")
        raise ConfigError(f"config key 'model.token_merging.enabled' (from {src}): token merging applies to EoMT "
                          f"variants ({', '.join(eomt_variants())}), not to '{cfg.variant}'")
    if v.options is None:
        if cfg.baseline:
            src = sorted({origin.get(f"model.baseline.{k}", origin.get("model.baseline", "defaults"))
                          for k in cfg.baseline})
            raise ConfigError(f"config key 'model.baseline' (from {', '.join(src)}): options "
                              f"{sorted(cfg.baseline)} do not apply to variant '{cfg.variant}', which takes none")
        return
    build_dataclass(v.options, dict(cfg.baseline), origin, prefix="model.baseline.")


def build_model(cfg: ModelConfig) -> Segmenter:
    """Build the model a :class:`ModelConfig` describes, loading ``cfg.checkpoint`` if given."""
    check_model_config(cfg)
    model = get_variant(cfg.variant).builder(cfg)
    if cfg.checkpoint:
        from study.models.checkpoint import load_checkpoint

        load_checkpoint(model, cfg.checkpoint, delta_weights=cfg.delta_weights)
    elif cfg.init_from:
        from study.models.checkpoint import init_from_checkpoint

        init_from_checkpoint(model, cfg.init_from, cfg.reinit_class_head, cfg.delta_weights)
    return model


# ---------------------------------------------------------------------------------- EoMT (Table 1 rows 4-5)


def _eomt_builder(masked_inference_default: bool) -> Callable[[ModelConfig], Segmenter]:
    def build(cfg: ModelConfig) -> Segmenter:
        spec = check_size(cfg.size)
        backbone = build_backbone(cfg.size, cfg.backbone, cfg.img_size, cfg.patch_size, cfg.pretrained,
                                  cfg.drop_path)
        m = cfg.masking(masked_inference_default)  # model.mask_setting, or the variant's default
        return EoMT(backbone, cfg.num_classes, cfg.num_queries, cfg.num_query_blocks or spec.query_blocks,
                    m.attention, m.inference, m.annealing, token_merging=cfg.token_merging.resolve(cfg.size))

    build.__name__ = build.__qualname__ = f"build_eomt_masked_inference_{masked_inference_default}"
    return build


# The parts of EoMT's time and GFLOPs breakdowns (EoMT.components, study/models/eomt.py).
EOMT_COMPONENTS = ("patch_embed", "blocks_before_queries", "blocks_with_queries", "mask_module_and_upscaler")
# Table 1 rows 4 and 5 (docs/paper.md section 2), labels as printed there.
register_variant("eomt_masked", _eomt_builder(True), row=4,  # masked attention kept at inference
                 label="w/o Transformer decoder", eomt=True, masked_inference=True, components=EOMT_COMPONENTS)
register_variant("eomt", _eomt_builder(False), row=5,  # masking annealed away, off at inference
                 label="w/o Masking = EoMT", eomt=True, masked_inference=False, components=EOMT_COMPONENTS)


def describe(v: Variant) -> dict[str, Any]:
    """One line's worth of a variant, for ``study bench --list``."""
    return {"name": v.name, "row": v.row, "label": v.label, "builder": _where(v.builder), "eomt": v.eomt,
            "masked_inference": v.masked_inference, "components": list(v.components)}
