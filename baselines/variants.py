"""The baseline chain of Table 1 (rows 0-3), as a table of small named differences.

Each row is its parent with one or two fields replaced (docs/paper.md section 2); tests/test_baselines_variants.py
prints the difference between consecutive rows and checks it is the intended one. :func:`register_variants` puts
the rows in study's variant registry; it is this package's ``study.variants`` entry point (pyproject.toml, see
study/models/build.py for why). Rows 4-5 (EoMT) are registered by study/models/build.py. Sizes (S, B, L, g,
tiny) are a separate axis: ``ModelConfig.size``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Literal

from baselines.config import BaselineConfig
from baselines.m2f_decoder import MaskedAttentionDecoder
from baselines.model import BaselineSegmenter
from baselines.pixel_decoder import LevelProjection, PixelDecoder
from baselines.pyramid import SimpleFeaturePyramid
from baselines.vit_adapter import ViTAdapter
from study.errors import UserError
from study.models.backbone import build_backbone, check_size
from study.models.config import ModelConfig
from study.models.contract import Segmenter


@dataclass(frozen=True)
class ChainRow:
    """The structure of one row (widths come from :class:`BaselineConfig`)."""

    name: str
    label: str  # the row's label as printed in Table 1
    neck: Literal["adapter", "pyramid"]  # ViT-Adapter, or the simple feature pyramid from the last ViT map
    pixel_decoder: bool  # Mask2Former's deformable pixel decoder, or 1x1 projections of the neck's maps
    neck_strides: tuple[int, ...]  # the maps the neck makes (the adapter always makes 4, 8, 16, 32)
    decoder_strides: tuple[int, ...]  # the maps the decoder attends to, round robin
    row: int  # Table 1 row


# Table 1 (docs/paper.md section 2). Row 0: ViT-Adapter + Mask2Former.
ROW0 = ChainRow("vit_adapter_m2f", "ViT-Adapter + Mask2Former", neck="adapter", pixel_decoder=True, neck_strides=(4, 8, 16, 32),
               decoder_strides=(32, 16, 8), row=0)
# Row 1 "w/o ViT-Adapter": a ViTDet-style simple feature pyramid from F16 instead.
ROW1 = replace(ROW0, name="sfp_m2f", label="w/o ViT-Adapter", neck="pyramid", row=1)
# Row 2 "w/o Pixel decoder": the decoder reads the pyramid's F8, F16, F32 (and F4 for the masks) directly.
ROW2 = replace(ROW1, name="sfp_no_pixel_decoder", label="w/o Pixel decoder", pixel_decoder=False, row=2)
# Row 3 "w/o Multi-scale": no F8 and F32; every layer attends to F16; F4 (upscaled F16) only for the masks.
ROW3 = replace(ROW2, name="single_scale", label="w/o Multi-scale", neck_strides=(4, 16), decoder_strides=(16,),
               row=3)

VARIANTS: dict[str, ChainRow] = {v.name: v for v in (ROW0, ROW1, ROW2, ROW3)}


def differences(parent: ChainRow, child: ChainRow) -> dict[str, tuple]:
    """Fields that differ between two rows (name, label and row number aside): {field: (parent's, child's)}."""
    return {f.name: (getattr(parent, f.name), getattr(child, f.name)) for f in fields(ChainRow)
            if f.name not in ("name", "label", "row") and getattr(parent, f.name) != getattr(child, f.name)}


def check_variant(name: str) -> ChainRow:
    if name not in VARIANTS:
        raise UserError(f"unknown baseline variant '{name}'; baseline variants: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def baseline_config(cfg: ModelConfig) -> BaselineConfig:
    """``cfg.baseline`` validated strictly (unknown key or wrong type -> ConfigError naming model.baseline.<key>)."""
    from study.schema import build_dataclass

    return build_dataclass(BaselineConfig, dict(cfg.baseline), prefix="model.baseline.")


def build_variant(variant: ChainRow | str, cfg: ModelConfig) -> BaselineSegmenter:
    """Build one row at ``cfg.size`` with the options of ``cfg.baseline``."""
    v = check_variant(variant) if isinstance(variant, str) else variant
    check_size(cfg.size)
    opts = baseline_config(cfg)
    backbone = build_backbone(cfg.size, cfg.backbone, cfg.img_size, cfg.patch_size, cfg.pretrained, cfg.drop_path)
    dim, compiled = backbone.embed_dim, opts.use_compiled_deform_attn
    if v.neck == "adapter":
        a = opts.adapter(cfg.size, backbone.depth, dim)
        neck = ViTAdapter(backbone, a.interaction_indexes, a.deform_heads, a.deform_ratio, opts.deform_points,
                          opts.cffn_ratio, opts.conv_inplane, opts.extra_extractors, opts.adapter_init_values,
                          opts.adapter_norm, compiled)
        strides = (4, 8, 16, 32)
    else:
        neck = SimpleFeaturePyramid(dim, backbone.patch_size, v.neck_strides)
        strides = v.neck_strides
    missing = [s for s in (4, *v.decoder_strides) if s not in strides]
    if missing:  # a table mistake, not a user's
        raise ValueError(f"variant '{v.name}': the decoder needs strides {missing} that the neck does not make")
    if v.pixel_decoder:
        if v.decoder_strides != (32, 16, 8):
            raise ValueError(f"variant '{v.name}': the pixel decoder feeds the decoder 1/32, 1/16, 1/8 only")
        head = PixelDecoder(dim, opts.hidden_dim, opts.encoder_layers, opts.encoder_heads, opts.encoder_points,
                            opts.encoder_ffn, compiled)
    else:
        head = LevelProjection(dim, opts.hidden_dim, v.decoder_strides)
    decoder = MaskedAttentionDecoder(opts.hidden_dim, opts.decoder_heads, opts.decoder_ffn, opts.decoder_layers,
                                     len(v.decoder_strides), cfg.num_queries, cfg.num_classes)
    # Mask2Former keeps masked attention at inference: rows 0-3 default to it (paper Table 1 was measured so);
    # model.mask_setting gives Table C's other settings (study/models/config.py).
    m = cfg.masking(True)
    return BaselineSegmenter(backbone, neck, head, decoder, cfg.num_classes, cfg.num_queries, m.attention,
                             m.inference, m.annealing)


def _builder(name: str) -> Callable[[ModelConfig], Segmenter]:
    def build(cfg: ModelConfig) -> Segmenter:
        return build_variant(name, cfg)

    build.__name__ = f"build_{name}"
    return build


# One builder per row, in Table 1 order.
BUILDERS: dict[str, Callable[[ModelConfig], Segmenter]] = {name: _builder(name) for name in VARIANTS}


def components(row: ChainRow) -> tuple[str, ...]:
    """The parts of a row's time and GFLOPs breakdowns, in forward order (BaselineSegmenter.components)."""
    return ("backbone", "adapter" if row.neck == "adapter" else "pyramid",
            "pixel_decoder" if row.pixel_decoder else "projection", "decoder")


def register_variants(register: Callable[..., object]) -> None:
    """The ``study.variants`` entry point: register rows 0-3 with ``register`` (study's ``register_variant``),
    with their traits: not EoMT, masked attention kept at inference (Mask2Former's; Table 1 was measured so),
    their components."""
    for name, row in VARIANTS.items():
        register(name, BUILDERS[name], row=row.row, label=row.label, options=BaselineConfig, eomt=False,
                 masked_inference=True, components=components(row))
