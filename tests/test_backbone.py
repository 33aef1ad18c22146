"""The timm backbone wrapper: sizes, Table 2 backbones, patch 16, local weights in both layouts, errors."""
from __future__ import annotations

import pytest
import torch
from timm.layers import resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

from study.errors import UserError
from study.models.backbone import BACKBONES, SIZES, TINY_ARGS, TINY_OF, TINY_WIDTH, ViTBackbone, build_backbone


@pytest.mark.parametrize("name", [b for b in BACKBONES if b != "tiny"])
def test_every_study_backbone_builds_with_patch_16(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost, no download
        bb = ViTBackbone(name, img_size=640)
    assert bb.patch_size == 16 and bb.grid_size == (40, 40)
    if bb.vit.pos_embed is not None:  # DINOv3 has rotary embeddings only
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
    with pytest.raises(UserError, match="input size 650 is not divisible by the patch size 16"):
        ViTBackbone("tiny", 650)
    with pytest.raises(ValueError, match="unknown backbone 'vit_huge_nope'"):
        ViTBackbone("vit_huge_nope", 64)
    with pytest.raises(ValueError, match="unknown model size 'XL'"):
        build_backbone("XL", None, 64)
    with pytest.raises(UserError, match="model.pretrained .*absent.pth does not exist"):
        ViTBackbone("tiny", 64, pretrained=str(tmp_path / "absent.pth"))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(UserError, match="model.pretrained .*damaged.safetensors is damaged"):  # was a traceback
        ViTBackbone("tiny", 64, pretrained=str(damaged))


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


# ------------------------------------------------------------------ the final norm (issue 17 item 4)
import timm  # noqa: E402
from torch import nn  # noqa: E402

TABLE2_TINY = ["tiny", "tiny_eva02", "tiny_deit3", "tiny_dinov3"]  # DINOv2, EVA-02, DeiT-III layouts; DINOv3


@pytest.mark.parametrize("name", [b for b in BACKBONES if not b.startswith("tiny")])
def test_every_full_size_backbone_has_its_final_norm_as_norm(name):
    """EVA-02 (average pooling in timm) keeps its LayerNorm in fc_norm; the wrapper moves it to norm."""
    with torch.device("meta"):
        bb = ViTBackbone(name, img_size=640)
    assert isinstance(bb.final_norm, nn.LayerNorm) and bb.final_norm is bb.vit.norm
    assert isinstance(getattr(bb.vit, "fc_norm", nn.Identity()), nn.Identity)
    assert isinstance(bb.vit.head, nn.Identity) and getattr(bb.vit, "attn_pool", None) is None


def _timm_source(name: str, img: int = 64) -> nn.Module:
    """The same architecture as timm builds it by default (fc_norm where timm puts it), seeded."""
    torch.manual_seed(5)
    if name == "tiny":
        return VisionTransformer(img_size=img, patch_size=16, num_classes=0, **TINY_ARGS)
    m = timm.create_model(TINY_OF[name], pretrained=False, img_size=img, patch_size=16, num_classes=0,
                          **TINY_WIDTH)
    with torch.no_grad():  # non-trivial norms, so that a missing or wrong norm shows
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    return m


@pytest.mark.parametrize("name", TABLE2_TINY)
def test_tokens_equal_timms_forward_features_then_its_final_norm(name, tmp_path):
    """Oracle: timm's own forward_features with the same weights, followed by the norm timm applies to the
    features (fc_norm after pooling for EVA-02, already inside forward_features otherwise)."""
    src = _timm_source(name).eval()
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    bb = ViTBackbone(name, 64, pretrained=str(path)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = src.forward_features(bb.normalize(x))
        fc_norm = getattr(src, "fc_norm", nn.Identity())
        expected = fc_norm(feats)
        ours = bb(x)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    if name == "tiny_eva02":  # the bug: without the move, the tokens were never normalised
        assert isinstance(src.norm, nn.Identity) and not torch.allclose(feats, ours, atol=1e-3)


def test_eva02_mim_layout_loads_its_final_norm(tmp_path):
    """EVA-02's MIM checkpoints name the final norm ``norm`` beside a mask token; timm's converter renames it
    fc_norm, the wrapper uses it as the final norm."""
    src = _timm_source("tiny_eva02").eval()
    sd = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in src.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, 1, 64)
    path = tmp_path / "eva02_mim.pth"
    torch.save(sd, path)
    bb = ViTBackbone("tiny_eva02", 64, pretrained=str(path))
    torch.testing.assert_close(bb.final_norm.weight, src.fc_norm.weight)
    torch.testing.assert_close(bb.final_norm.bias, src.fc_norm.bias)


@pytest.mark.parametrize("name", TABLE2_TINY)
@pytest.mark.parametrize("masked", [True, False])
def test_every_parameter_of_eomt_gets_a_gradient(name, masked):
    """DDP with find_unused_parameters=False needs a gradient for every trainable parameter."""
    from study.models.eomt import EoMT

    model = EoMT(ViTBackbone(name, 64), num_classes=3, num_queries=5, num_query_blocks=2,
                 masked_attention=masked).train()
    sets = model(torch.rand(2, 3, 64, 64))
    sum(s.mask_logits.sum() + s.class_logits.sum() for s in sets).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing


@pytest.mark.parametrize("name", ["tiny_eva02", "tiny_dinov3"])
def test_rope_leaves_queries_and_prefix_unrotated(name):
    """RoPE backbones rotate the patch tokens only; EoMT's queries, prepended, count as prefix tokens (as in
    Hugging Face's EomtDinov3, which rotates the last grid-size tokens). Oracle: the same block run by timm on
    the ViT's own tokens gives the same patch and prefix outputs when the queries cannot be attended to."""
    bb = ViTBackbone(name, 64).eval()
    x = bb.embed(bb.normalize(torch.rand(1, 3, 64, 64)))
    q = torch.randn(1, 3, 64)
    n = x.shape[1] + 3
    mask = torch.ones(1, n, n, dtype=torch.bool)
    mask[:, 3:, :3] = False  # ViT tokens do not see the queries
    with torch.no_grad():
        ours = bb.run_block(0, torch.cat([q, x], 1), mask, extra_prefix=3)[:, 3:]
        plain = bb.run_block(0, x)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    assert bb.vit.blocks[0].attn.num_prefix_tokens == bb.num_prefix_tokens  # restored after the call
