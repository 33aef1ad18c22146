"""Model section of the configuration (see study/models/build.py for how it becomes a model)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass
class ModelConfig:
    # A name from the variant registry (`study variants` lists them): eomt, eomt_masked, and the baseline
    # chain of Table 1 (vit_adapter_m2f, sfp_m2f, sfp_no_pixel_decoder, single_scale).
    variant: str = "eomt"
    # ViT size: S, B, L, g (DINOv2 with registers), or "tiny" (a 4-block, 64-wide ViT for tests and demos).
    size: Literal["tiny", "S", "B", "L", "g"] = "L"
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
    # Options of the baseline chain (ViT-Adapter, pyramid, pixel decoder, decoder): validated strictly against
    # baselines/config.py when the model is built; see that file for the keys.
    baseline: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by the patch size {self.patch_size}")
        if self.num_queries < 1 or self.num_classes < 1:
            raise ValueError("num_queries and num_classes must be positive")
