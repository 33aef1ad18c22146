"""One segmenter for Table 1 rows 0-3: ViT -> neck (ViT-Adapter or pyramid) -> pixel decoder (or projections)
-> masked-attention Transformer decoder, following the suite's model contract (study/models/contract.py).

Which parts a row has is decided by ``baselines/variants.py``; this class only wires given parts together.
"""
from __future__ import annotations

import torch
from torch import nn

from baselines import deform_attn
from baselines.m2f_decoder import MaskedAttentionDecoder
from baselines.pixel_decoder import LevelProjection, PixelDecoder
from baselines.pyramid import SimpleFeaturePyramid
from baselines.vit_adapter import ViTAdapter, convert_sync_batchnorm
from study.models.backbone import ViTBackbone
from study.models.contract import ParamGroup, PredictionSet, Segmenter, backbone_param_groups


class BaselineSegmenter(Segmenter):
    """Args:
        backbone: the ViT.
        neck: :class:`ViTAdapter` (row 0) or :class:`SimpleFeaturePyramid` (rows 1-3); stored as ``adapter`` or
            ``pyramid``.
        pixel_decoder: :class:`PixelDecoder` (rows 0-1) or :class:`LevelProjection` (rows 2-3); stored as
            ``pixel_decoder`` or ``projection``.
        decoder: the Transformer decoder; its layers are the masked layers of the contract.
        num_classes, num_queries: C and K.
        masked_attention: masked cross-attention in training (and all 10 prediction sets supervised).
        masked_inference: keep it at inference (Mask2Former always does; the default of rows 0-3).
        mask_annealing: the mask setting's annealing in training (None: the trainer's rule;
            study/models/contract.py). Table C's settings are ``model.mask_setting`` (study/models/config.py).
    """

    class_head_prefix = "decoder.class_head."  # model.reinit_class_head (study/models/checkpoint.py)

    def __init__(self, backbone: ViTBackbone, neck: nn.Module, pixel_decoder: nn.Module,
                 decoder: MaskedAttentionDecoder, num_classes: int, num_queries: int, masked_attention: bool = True,
                 masked_inference: bool = True, mask_annealing: bool | None = None):
        super().__init__(num_classes, num_queries, len(decoder.layers), masked_attention, masked_inference,
                         mask_annealing)
        self.backbone = backbone
        if isinstance(neck, ViTAdapter):
            self.adapter = neck
            # ViT-Adapter reads the blocks' outputs, never the ViT's final LayerNorm: freeze it so that it is
            # neither trained nor reported unused by DDP (it is still counted in the parameters).
            backbone.vit.norm.requires_grad_(False)
        elif isinstance(neck, SimpleFeaturePyramid):
            self.pyramid = neck
        else:
            raise TypeError(f"unknown neck {type(neck).__name__}")
        if isinstance(pixel_decoder, PixelDecoder):
            self.pixel_decoder = pixel_decoder
        elif isinstance(pixel_decoder, LevelProjection):
            self.projection = pixel_decoder
        else:
            raise TypeError(f"unknown pixel decoder {type(pixel_decoder).__name__}")
        self.decoder = decoder

    @property
    def neck(self) -> nn.Module:
        return self.adapter if hasattr(self, "adapter") else self.pyramid

    @property
    def neck_strides(self) -> tuple[int, ...]:
        return (4, 8, 16, 32) if hasattr(self, "adapter") else self.pyramid.strides

    def forward(self, images) -> list[PredictionSet]:
        """Images in [0, 1] (B, 3, H, W) -> prediction sets (masks at H/4, classes C + 1), final last."""
        if hasattr(self, "adapter"):
            maps = self.adapter(self.backbone, images)  # [F4, F8, F16, F32], (B, D, H/s, W/s)
        else:
            f16 = self.backbone.patch_map(self.backbone(images))  # (B, D, H/16, W/16), after the final LayerNorm
            maps = self.pyramid(f16)
        feats = dict(zip(self.neck_strides, maps))
        head = self.pixel_decoder if hasattr(self, "pixel_decoder") else self.projection
        mask_features, levels = head(feats)  # (B, 256, H/4, W/4), [(B, 256, h, w)] in round-robin order
        return self.decoder(levels, mask_features, self.masking_active, self.drop_query_masks)

    def prepare_distributed(self, device: torch.device) -> nn.Module:
        """The module to wrap in DDP (the trainer calls this on any model that has it).

        On CUDA the ViT-Adapter's BatchNorm2d become SyncBatchNorm, which pools the statistics over processes
        as the reference does; SyncBatchNorm has no CPU kernel, so on the CPU (gloo) each process keeps its
        own statistics. Without BatchNorm (rows 1-3, or ``norm="group"``) nothing changes. The parameters stay
        the same objects, so an optimiser built on the model still holds them.
        """
        return convert_sync_batchnorm(self) if device.type == "cuda" else self

    def param_groups(self, layer_decay: float = 0.8, decay_query_blocks: bool = True) -> list[ParamGroup]:
        """Layer-wise decay on the ViT (same prefix logic as EoMT); adapter, pyramid and decoders are new.

        ``decay_query_blocks`` (``train.layer_decay_query_blocks``) is accepted so that one recipe fits every
        variant; the baselines' queries live in the Mask2Former decoder, which always has the full lr, and
        every ViT block is decayed either way."""
        return backbone_param_groups(self, self.backbone, layer_decay, prefix="backbone.vit.")

    def components(self) -> dict[str, list[nn.Module]]:
        """Modules per timed component; the adapter's own parts are listed one by one because the ViT blocks
        run between them."""
        vit = self.backbone.vit
        parts = {"backbone": [vit.patch_embed, *self.backbone.blocks]}
        if hasattr(self, "adapter"):
            parts["adapter"] = self.adapter.timed_parts()
        else:
            parts["backbone"].append(vit.norm)
            parts["pyramid"] = [self.pyramid]
        if hasattr(self, "pixel_decoder"):
            parts["pixel_decoder"] = [self.pixel_decoder]
        else:
            parts["projection"] = [self.projection]
        parts["decoder"] = [self.decoder]
        return parts

    def flop_handles(self) -> dict:
        """fvcore handles for what fvcore cannot count here: the deformable attention's sampling (both kernels;
        see baselines/deform_attn.py for what is counted)."""
        return deform_attn.flop_handles()
