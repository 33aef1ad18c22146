"""Model section of the configuration (see study/models/build.py for how it becomes a model)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

# ViT sizes: S, B, L, g (DINOv2 with registers), or "tiny" (a 4-block, 64-wide ViT for tests and demos); the
# widths and depths are in study/models/backbone.py.
SizeName = Literal["tiny", "S", "B", "L", "g"]


@dataclass
class ModelConfig:
    # A name from the variant registry (`study variants` lists them): eomt, eomt_masked, and the baseline
    # chain of Table 1 (vit_adapter_m2f, sfp_m2f, sfp_no_pixel_decoder, single_scale).
    variant: str = "eomt"
    # ViT size: S, B, L, g (DINOv2 with registers), or "tiny" (a 4-block, 64-wide ViT for tests and demos).
    size: SizeName = "L"
    # timm backbone name; None takes vit_{small,base,large,giant}_patch14_reg4_dinov2 for the size.
    # Table 2 backbones: eva02_large_patch14_224.mim.m38m, deit3_large_patch16_384.fb.in22k.ft.in1k, ...
    backbone: Optional[str] = None
    img_size: int = 640  # input size (square, padded); docs/paper.md section 6: COCO 640
    patch_size: int = 16  # docs/paper.md section 5: DINOv2 re-created with patch 16
    num_classes: int = 133  # COCO panoptic: 80 things + 53 stuff
    num_queries: int = 200  # K, docs/paper.md section 5: 200 panoptic / instance, 100 semantic
    # L2, blocks that see the queries; None takes the paper's 3/3/4/5 for S/B/L/g (docs/paper.md section 5).
    num_query_blocks: Optional[int] = None
    # Masked attention in training (Table 7 "never masked" sets this False: one prediction set, no
    # intermediate supervision).
    masked_attention: bool = True
    # Keep masked attention on at inference (Table 1 row 4). None: the variant decides (eomt_masked: on).
    masked_inference: Optional[bool] = None
    pretrained: Optional[str] = None  # local backbone weights (DINOv2 original or timm layout); never downloaded
    checkpoint: Optional[str] = None  # a whole-model checkpoint: ours, official EoMT, or Hugging Face EoMT
    drop_path: float = 0.0  # stochastic depth of the backbone; the paper is silent, the official configs use 0
    # Options of the baseline chain (ViT-Adapter, pyramid, pixel decoder, decoder): validated strictly when the
    # config is loaded, against the options the variant registered (baselines/config.py; see that file for the
    # keys). EoMT takes none.
    baseline: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        # Messages start with the field at fault: study.config names its dotted key and source from that.
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.img_size < self.patch_size:
            raise ValueError(f"img_size must be at least the patch size {self.patch_size}, got {self.img_size}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by the patch size {self.patch_size}")
        for name in ("num_queries", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_query_blocks is not None and self.num_query_blocks < 1:
            raise ValueError(f"num_query_blocks must be >= 1 (or unset), got {self.num_query_blocks}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
