"""The timm backbone wrapper: sizes, Table 2 backbones, patch 16, local weights in both layouts, errors."""
from __future__ import annotations

import pytest
import torch
from timm.layers import resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

from study.models.backbone import BACKBONES, SIZES, TINY_ARGS, ViTBackbone, build_backbone


@pytest.mark.parametrize("name", [b for b in BACKBONES if b != "tiny"])
def test_every_study_backbone_builds_with_patch_16(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost, no download
        bb = ViTBackbone(name, img_size=640)
    assert bb.patch_size == 16 and bb.grid_size == (40, 40)
    assert bb.vit.pos_embed.shape[1] in (1600, 1601)  # resized to the 40x40 grid (plus CLS for EVA-02)


def test_size_table_matches_paper():
    # docs/paper.md section 5: widths 384/768/1024/1536, depths 12/12/24/40, L2 = 3/3/4/5
    expect = {"S": (384, 12, 3), "B": (768, 12, 3), "L": (1024, 24, 4), "g": (1536, 40, 5)}
    for size, (dim, depth, l2) in expect.items():
        with torch.device("meta"):
            bb = build_backbone(size, None, 640)
        assert (bb.embed_dim, bb.depth, SIZES[size].query_blocks) == (dim, depth, l2)
        assert bb.num_prefix_tokens == 5  # CLS + 4 registers


def test_bad_inputs_name_the_culprit(tmp_path):
    with pytest.raises(ValueError, match="input size 650 is not divisible by the patch size 16"):
        ViTBackbone("tiny", 650)
    with pytest.raises(ValueError, match="unknown backbone 'vit_huge_nope'"):
        ViTBackbone("vit_huge_nope", 64)
    with pytest.raises(ValueError, match="unknown model size 'XL'"):
        build_backbone("XL", None, 64)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*absent.pth"):
        ViTBackbone("tiny", 64, pretrained=str(tmp_path / "absent.pth"))


def _source_vit(patch: int, img: int) -> VisionTransformer:
    torch.manual_seed(3)
    return VisionTransformer(img_size=img, patch_size=patch, num_classes=0, **TINY_ARGS)


def test_loads_timm_layout_exactly(tmp_path):
    src = _source_vit(16, 64)
    path = tmp_path / "timm.pth"
    torch.save(src.state_dict(), path)
    bb = ViTBackbone("tiny", 64, pretrained=str(path))
    x = torch.rand(2, 3, 64, 64)
    expected = src.forward_features(bb.normalize(x))
    torch.testing.assert_close(bb(x), expected, rtol=0, atol=0)


def test_loads_original_dinov2_layout_with_patch_resampling(tmp_path):
    src = _source_vit(14, 56)  # DINOv2 is patch 14; the study re-creates it with patch 16
    sd = src.state_dict()
    cls_pos = torch.randn(1, 1, 64)
    original = {k: v for k, v in sd.items() if k not in ("reg_token", "pos_embed")}
    original["register_tokens"] = sd["reg_token"]
    original["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)  # DINOv2 keeps a CLS position
    original["mask_token"] = torch.zeros(1, 64)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(original, path)
    bb = ViTBackbone("tiny", 64, patch_size=16, pretrained=str(path))  # same 4x4 grid
    vit = bb.vit
    torch.testing.assert_close(vit.reg_token, sd["reg_token"])
    torch.testing.assert_close(vit.cls_token, sd["cls_token"] + cls_pos)  # CLS position folded in
    torch.testing.assert_close(vit.pos_embed, sd["pos_embed"])
    torch.testing.assert_close(vit.patch_embed.proj.weight, resample_patch_embed(sd["patch_embed.proj.weight"],
                                                                                 [16, 16]))
    torch.testing.assert_close(vit.blocks[2].attn.qkv.weight, sd["blocks.2.attn.qkv.weight"])


def test_weights_of_another_width_are_rejected(tmp_path):
    other = VisionTransformer(img_size=64, patch_size=16, num_classes=0, **{**TINY_ARGS, "embed_dim": 32})
    path = tmp_path / "narrow.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ValueError, match=r"narrow\.pth do not fit .tiny.: .* shape mismatches"):
        ViTBackbone("tiny", 64, pretrained=str(path))
