"""From configuration to model: the variant registry (one explicit dict) and the builder.

Every row of Table 1 is a name here. EoMT's two rows differ only in whether masked attention stays on at
inference; the baseline rows (0-3) come from ``baselines/variants.py``, their own table of small
differences, so that ``study`` never needs to know how they are built.
"""
from __future__ import annotations

from typing import Callable

from study.models.backbone import build_backbone, check_size
from study.models.config import ModelConfig
from study.models.contract import Segmenter
from study.models.eomt import EoMT

# Table 1 rows 4 and 5 (docs/paper.md section 2).
EOMT_VARIANTS: dict[str, dict] = {
    "eomt_masked": dict(masked_inference=True),  # row 4: masked attention kept at inference
    "eomt": dict(masked_inference=False),  # row 5: masking annealed away, off at inference
}


def _eomt_builder(defaults: dict) -> Callable[[ModelConfig], Segmenter]:
    def build(cfg: ModelConfig) -> Segmenter:
        spec = check_size(cfg.size)
        backbone = build_backbone(cfg.size, cfg.backbone, cfg.img_size, cfg.patch_size, cfg.pretrained,
                                  cfg.drop_path)
        masked_inference = defaults["masked_inference"] if cfg.masked_inference is None else cfg.masked_inference
        if cfg.baseline:
            raise ValueError(f"model.baseline options {sorted(cfg.baseline)} do not apply to EoMT "
                             f"(variant '{cfg.variant}')")
        return EoMT(backbone, cfg.num_classes, cfg.num_queries, cfg.num_query_blocks or spec.query_blocks,
                    cfg.masked_attention, masked_inference)

    return build


def variants() -> dict[str, Callable[[ModelConfig], Segmenter]]:
    """Every registered variant name -> its builder, in Table 1 order (row 0 first)."""
    from baselines.variants import BUILDERS as baseline_builders

    table = dict(baseline_builders)
    table.update({name: _eomt_builder(kw) for name, kw in EOMT_VARIANTS.items()})
    return table


def check_variant(name: str) -> None:
    names = variants()
    if name not in names:
        raise ValueError(f"unknown variant '{name}'; registered variants: {', '.join(names)}")


def build_model(cfg: ModelConfig) -> Segmenter:
    """Build the model a :class:`ModelConfig` describes, loading ``cfg.checkpoint`` if given."""
    check_variant(cfg.variant)
    model = variants()[cfg.variant](cfg)
    if cfg.checkpoint:
        from study.models.checkpoint import load_checkpoint

        load_checkpoint(model, cfg.checkpoint)
    return model
