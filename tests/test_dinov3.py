"""EoMT on DINOv3: Hugging Face parity (masking on and off, and in training mode with RoPE's train-time
rescaling), backbone files in Hugging Face's and timm's layouts, whole-model checkpoints in the official code's
layout (absolute and delta) and in Hugging Face's, parameter counts equal to Hugging Face's models."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from conftest import oracle
from study.errors import UserError
from study.models.backbone import IMAGENET_MEAN, IMAGENET_STD, TINY_WIDTH, ViTBackbone
from study.models.dinov3 import load_dinov3_checkpoint_file
from study.models.eomt import EoMT

transformers = oracle("transformers")

IMG, CLASSES, QUERIES, L2, D, DEPTH, HEADS, MLP = 64, 5, 7, 2, 64, 4, 4, 256
assert (D, DEPTH, HEADS) == (TINY_WIDTH["embed_dim"], TINY_WIDTH["depth"], TINY_WIDTH["num_heads"])


def ours(masked_inference=False, pretrained=None) -> EoMT:
    return EoMT(ViTBackbone("tiny_dinov3", IMG, pretrained=pretrained), CLASSES, QUERIES, L2,
                masked_attention=True, masked_inference=masked_inference).eval()


def _randomize(model: nn.Module, seed: int) -> None:
    """Every parameter non-trivial (biases, layer scales and norms included), so a dropped or misplaced
    tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "layernorm" in name) and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "lambda1" in name or "gamma" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.25)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def hf_config(**over):
    return transformers.EomtDinov3Config(
        hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=MLP,
        image_size=IMG, patch_size=16, num_queries=QUERIES, num_blocks=L2, num_labels=CLASSES,
        num_register_tokens=4, layer_norm_eps=1e-5, **over)  # DINOv3's LayerNorm eps (timm's and facebook's)


def hf_eomt(seed=1) -> nn.Module:
    hf = transformers.EomtDinov3ForUniversalSegmentation(hf_config()).eval()
    _randomize(hf, seed)
    return hf


def hf_logits(hf, images):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = hf(pixel_values=(images - mean) / std)  # HF leaves normalisation to its image processor
    return out.masks_queries_logits, out.class_queries_logits


# The explicit key map of the parity test, ours -> Hugging Face EomtDinov3ForUniversalSegmentation, written from
# the two modules' structures (timm Eva, transformers' EomtDinov3); q, k, v are split from timm's fused qkv.
def ours_to_hf(sd: dict) -> dict:
    out = {}
    top = {
        "backbone.vit.cls_token": "embeddings.cls_token",
        "backbone.vit.reg_token": "embeddings.register_tokens",
        "backbone.vit.patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
        "backbone.vit.patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
        "backbone.vit.norm.weight": "layernorm.weight", "backbone.vit.norm.bias": "layernorm.bias",
        "q.weight": "query.weight",
        "head.class_head.weight": "class_predictor.weight", "head.class_head.bias": "class_predictor.bias",
        "attn_mask_probs": "attn_mask_probs",
    }
    for ours_j, hf_j in ((0, 1), (2, 2), (4, 3)):
        for t in ("weight", "bias"):
            top[f"head.mask_head.{ours_j}.{t}"] = f"mask_head.fc{hf_j}.{t}"
    for i in range(2):
        for ours_n, hf_n in (("conv1.weight", "conv1.weight"), ("conv1.bias", "conv1.bias"),
                             ("conv2.weight", "conv2.weight"), ("norm.weight", "layernorm2d.weight"),
                             ("norm.bias", "layernorm2d.bias")):
            top[f"head.upscale.{i}.{ours_n}"] = f"upscale_block.block.{i}.{hf_n}"
    for i in range(DEPTH):
        b, h = f"backbone.vit.blocks.{i}.", f"layers.{i}."
        top.update({b + "gamma_1": h + "layer_scale1.lambda1", b + "gamma_2": h + "layer_scale2.lambda1",
                    b + "attn.q_bias": h + "attention.q_proj.bias", b + "attn.v_bias": h + "attention.v_proj.bias"})
        for t in ("weight", "bias"):
            top.update({b + f"norm1.{t}": h + f"norm1.{t}", b + f"norm2.{t}": h + f"norm2.{t}",
                        b + f"attn.proj.{t}": h + f"attention.o_proj.{t}",
                        b + f"mlp.fc1.{t}": h + f"mlp.up_proj.{t}", b + f"mlp.fc2.{t}": h + f"mlp.down_proj.{t}"})
        q, k, v = sd[b + "attn.qkv.weight"].chunk(3)
        out.update({h + "attention.q_proj.weight": q, h + "attention.k_proj.weight": k,
                    h + "attention.v_proj.weight": v})
    skipped = {"backbone.pixel_mean", "backbone.pixel_std"} | {k for k in sd if k.endswith("attn.qkv.weight")}
    for k, v in sd.items():
        if k not in skipped:
            out[top[k]] = v  # a KeyError: a key of ours the map does not know
    return out


@pytest.mark.parametrize("masked", [False, True])
def test_same_logits_as_huggingface_eomt_dinov3(masked, one_thread):
    model = ours(masked_inference=masked)
    _randomize(model, 3)
    hf = transformers.EomtDinov3ForUniversalSegmentation(hf_config()).eval()
    sd = ours_to_hf(model.state_dict())
    sd["criterion.empty_weight"] = hf.state_dict()["criterion.empty_weight"]
    hf.load_state_dict(sd, strict=True)
    probs = torch.ones(L2) if masked else torch.zeros(L2)  # HF masks at inference iff P_mask > 0
    hf.attn_mask_probs.copy_(probs)
    model.set_mask_probs(probs)
    images = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        masks_hf, classes_hf = hf_logits(hf, images)
        sets = model(images)
    assert len(sets) == (L2 + 1 if masked else 1)
    torch.testing.assert_close(sets[-1].mask_logits, masks_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sets[-1].class_logits, classes_hf, atol=1e-5, rtol=1e-5)


def test_same_logits_in_training_mode_with_rope_rescaling(one_thread):
    """Training mode: DINOv3's RoPE coordinates are rescaled by a random factor (Hugging Face's
    pos_embed_rescale=2, which the official code trains with) and the annealing opens random queries' masks;
    with the same seed both models draw the same numbers in the same order."""
    model = ours().train()
    _randomize(model, 4)
    hf = transformers.EomtDinov3ForUniversalSegmentation(hf_config()).train()
    sd = ours_to_hf(model.state_dict())
    sd["criterion.empty_weight"] = hf.state_dict()["criterion.empty_weight"]
    hf.load_state_dict(sd, strict=True)
    probs = torch.tensor([0.5, 0.7])
    hf.attn_mask_probs.copy_(probs)
    model.set_mask_probs(probs)
    images = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.manual_seed(11)
        masks_hf, classes_hf = hf_logits(hf, images)
        torch.manual_seed(11)
        sets = model(images)
        torch.manual_seed(12)
        other = model(images)
    torch.testing.assert_close(sets[-1].mask_logits, masks_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sets[-1].class_logits, classes_hf, atol=1e-5, rtol=1e-5)
    # guard: the training-mode randomness is real (another seed, other logits)
    assert (other[-1].mask_logits - sets[-1].mask_logits).abs().max() > 1e-4


def test_huggingface_eomt_dinov3_checkpoint_loads_to_its_logits(tmp_path, one_thread):
    hf = hf_eomt()
    path = tmp_path / "model.safetensors"
    hf.save_pretrained(tmp_path)  # transformers' own file layout
    model = ours(masked_inference=True)
    assert load_dinov3_checkpoint_file(model, path) == "huggingface"
    images = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        masks_hf, classes_hf = hf_logits(hf, images)
        sets = model(images)
    torch.testing.assert_close(sets[-1].mask_logits, masks_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sets[-1].class_logits, classes_hf, atol=1e-5, rtol=1e-5)


# ---- backbone files


def hf_dinov3_backbone(seed=2) -> nn.Module:
    cfg = transformers.DINOv3ViTConfig(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                       intermediate_size=MLP, num_register_tokens=4, image_size=IMG,
                                       patch_size=16)
    m = transformers.DINOv3ViTModel(cfg).eval()
    _randomize(m, seed)
    return m


def test_huggingface_backbone_file_gives_its_tokens(tmp_path):
    """facebook/dinov3-vit*16-pretrain-lvd1689m's layout, as transformers writes it; oracle: its own forward."""
    hf = hf_dinov3_backbone()
    hf.save_pretrained(tmp_path)
    sd_keys = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(tmp_path / "model.safetensors")))
    assert "layer.0.attention.q_proj.weight" in sd_keys and "embeddings.mask_token" in sd_keys  # the hub names
    bb = ViTBackbone("tiny_dinov3", IMG, pretrained=str(tmp_path / "model.safetensors")).eval()
    x = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        expected = hf(pixel_values=bb.normalize(x)).last_hidden_state
        torch.testing.assert_close(bb(x), expected, atol=1e-5, rtol=1e-5)
    # transformers 5 names the blocks model.layer.N in memory: that state dict loads too
    path = tmp_path / "in_memory.pth"
    torch.save(hf.state_dict(), path)
    bb2 = ViTBackbone("tiny_dinov3", IMG, pretrained=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(bb2(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["vit_large_patch16_dinov3", "vit_large_patch16_dinov3_qkvb"])
def test_timm_backbone_files_load(tmp_path, arch):
    """timm's plain DINOv3 (no q/v bias: zeros are filled in) and its _qkvb variant; oracle: timm's forward."""
    torch.manual_seed(6)
    src = timm.create_model(arch, pretrained=False, img_size=IMG, num_classes=0, **TINY_WIDTH).eval()
    _randomize(src, 6)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    bb = ViTBackbone("tiny_dinov3", IMG, pretrained=str(tmp_path / "w.pth")).eval()
    x = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        expected = src.fc_norm(src.forward_features(bb.normalize(x)))  # timm: Identity norm, LayerNorm fc_norm
        torch.testing.assert_close(bb(x), expected if not isinstance(src.fc_norm, nn.Identity)
                                   else src.forward_features(bb.normalize(x)), atol=1e-5, rtol=1e-5)


def test_nonzero_key_bias_is_refused(tmp_path):
    hf = hf_dinov3_backbone()
    sd = hf.state_dict()
    sd["model.layer.0.attention.k_proj.bias"] = torch.ones(D)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"w.pth: 'blocks.0.attn.k_bias' .* is not zero"):
        ViTBackbone("tiny_dinov3", IMG, pretrained=str(tmp_path / "w.pth"))


# ---- the official code's layout (github tue-mps/eomt at 7bd19dd), built from its module structure:
# models/vit.py ViT: ``backbone`` = transformers AutoModel (DINOv3ViTModel) with ``embeddings`` renamed
# ``patch_embed`` (its mask_token deleted) and ``layer`` renamed ``blocks``; buffers pixel_mean, pixel_std.
# models/eomt.py EoMT: ``encoder``, buffer ``attn_mask_probs``, ``q``, ``class_head``, ``mask_head``
# (Sequential: Linear, GELU, Linear, GELU, Linear), ``upscale`` (Sequential of ScaleBlock: conv1, act, conv2,
# norm). training/lightning_module.py holds it as ``network``; the panoptic module adds ``criterion``
# (buffer empty_weight).


class OfficialScaleBlock(nn.Module):
    def __init__(self, hf_block):
        super().__init__()
        self.conv1, self.act, self.conv2, self.norm = hf_block.conv1, nn.GELU(), hf_block.conv2, hf_block.layernorm2d


def official_backbone(dinov3_model: nn.Module) -> nn.Module:
    """The official ViT.transformers_to_timm applied to a transformers DINOv3ViTModel (whose blocks
    transformers 5 keeps under ``model.layer``)."""
    bb = dinov3_model
    bb.patch_embed = bb.embeddings
    bb.blocks = bb.model.layer
    del bb.patch_embed.mask_token, bb.embeddings, bb.model
    return bb


def official_module(hf: nn.Module) -> nn.Module:
    """The official Lightning module holding the weights of a Hugging Face EomtDinov3 (modules shared)."""
    bb = hf_dinov3_backbone()
    official_backbone(bb)
    bb.patch_embed, bb.blocks, bb.norm = hf.embeddings, hf.layers, hf.layernorm
    encoder = nn.Module()
    encoder.backbone = bb
    encoder.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).reshape(1, -1, 1, 1))
    encoder.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).reshape(1, -1, 1, 1))
    net = nn.Module()
    net.encoder = encoder
    net.register_buffer("attn_mask_probs", hf.attn_mask_probs.clone())
    net.q = hf.query
    net.class_head = hf.class_predictor
    net.mask_head = nn.Sequential(hf.mask_head.fc1, nn.GELU(), hf.mask_head.fc2, nn.GELU(), hf.mask_head.fc3)
    net.upscale = nn.Sequential(*[OfficialScaleBlock(b) for b in hf.upscale_block.block])
    module = nn.Module()
    module.network = net
    module.criterion = nn.Module()
    module.criterion.register_buffer("empty_weight", torch.ones(CLASSES + 1))
    return module


def test_official_layout_key_names():
    keys = set(official_module(hf_eomt()).state_dict())
    for k in ("network.encoder.backbone.patch_embed.patch_embeddings.weight",
              "network.encoder.backbone.patch_embed.register_tokens",
              "network.encoder.backbone.blocks.0.attention.q_proj.bias",
              "network.encoder.backbone.blocks.0.layer_scale1.lambda1",
              "network.encoder.backbone.blocks.0.mlp.up_proj.weight",
              "network.encoder.backbone.norm.weight", "network.encoder.pixel_mean", "network.mask_head.4.bias",
              "network.upscale.1.norm.weight", "network.attn_mask_probs", "criterion.empty_weight"):
        assert k in keys, k
    assert not any("mask_token" in k or "inv_freq" in k for k in keys)


def _logits_equal(model, hf, images):
    with torch.no_grad():
        masks_hf, classes_hf = hf_logits(hf, images)
        sets = model(images)
    torch.testing.assert_close(sets[-1].mask_logits, masks_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sets[-1].class_logits, classes_hf, atol=1e-5, rtol=1e-5)


def test_official_absolute_checkpoint(tmp_path, one_thread):
    hf = hf_eomt()
    torch.save({"state_dict": official_module(hf).state_dict()}, tmp_path / "official.ckpt")
    model = ours(masked_inference=True)
    assert load_dinov3_checkpoint_file(model, tmp_path / "official.ckpt") == "official"
    _logits_equal(model, hf, torch.rand(1, 3, IMG, IMG))


def write_official_delta(tmp_path):
    """An official-layout delta checkpoint (tmp_path/delta.bin) of a trained EoMT-DINOv3 and its pretrained
    backbone file in Hugging Face's layout; returns the trained model (Hugging Face's) and the backbone file."""
    hf = hf_eomt()
    hf.attn_mask_probs.zero_()  # annealed to 0 at the end of training
    trained = official_module(hf).state_dict()
    pre = hf_dinov3_backbone(seed=9)
    pre.save_pretrained(tmp_path / "dinov3")
    pre_official = {"network.encoder.backbone." + k: v for k, v in official_backbone(pre).state_dict().items()}
    params = {n for n, _ in official_module(hf).named_parameters()}
    delta = {}
    for k, v in trained.items():
        if k.startswith("network.encoder.backbone."):
            delta[k] = v - pre_official[k]
        elif k.startswith("network.encoder."):
            delta[k] = torch.zeros_like(v)
        elif k == "network.attn_mask_probs":
            delta[k] = v - 1
        elif k in params:
            delta[k] = v.clone()
        else:
            delta[k] = v  # criterion.empty_weight: not loaded
    torch.save(delta, tmp_path / "delta.bin")
    return hf, tmp_path / "dinov3" / "model.safetensors"


def test_official_delta_checkpoint(tmp_path, one_thread):
    """delta_weights: the file holds trained - base; the base is the pretrained backbone under
    network.encoder. (a separate Hugging Face backbone file), zero for every other parameter, and the buffer
    attn_mask_probs' initial value 1 (training/lightning_module.py: _zero_init_outside_encoder, _add_state_dicts)."""
    hf, backbone_file = write_official_delta(tmp_path)
    model = ours(masked_inference=False, pretrained=str(backbone_file))
    assert load_dinov3_checkpoint_file(model, tmp_path / "delta.bin", delta_weights=True) == "official"
    torch.testing.assert_close(model.attn_mask_probs, torch.zeros(L2))
    _logits_equal(model, hf, torch.rand(1, 3, IMG, IMG))
    # loading the delta as absolute weights is wrong, and visibly so (zero pixel_std: NaN logits, or others)
    wrong = ours()
    load_dinov3_checkpoint_file(wrong, tmp_path / "delta.bin")
    with torch.no_grad():
        x = torch.rand(1, 3, IMG, IMG)
        assert not torch.allclose(wrong(x)[-1].mask_logits, model(x)[-1].mask_logits, atol=1e-3)
    # a missing backbone file is named
    with pytest.raises(UserError, match=r"delta.bin holds delta weights: its backbone file .*absent.safetensors "
                                        r"\(model.pretrained\) does not exist"):
        load_dinov3_checkpoint_file(ours(), tmp_path / "delta.bin", delta_weights=True,
                                    backbone_file=tmp_path / "absent.safetensors")
    with pytest.raises(UserError, match=r"delta.bin holds delta weights .* set model.pretrained"):
        load_dinov3_checkpoint_file(ours(), tmp_path / "delta.bin", delta_weights=True)


def test_checkpoint_that_does_not_fit_names_keys(tmp_path):
    hf = hf_eomt()
    sd = official_module(hf).state_dict()
    sd["network.q.weight"] = torch.zeros(QUERIES + 1, D)
    torch.save(sd, tmp_path / "bad.ckpt")
    with pytest.raises(UserError, match=r"bad.ckpt \(EoMT-DINOv3, official layout\) .*q.weight: file \(8, 64\)"):
        load_dinov3_checkpoint_file(ours(), tmp_path / "bad.ckpt")


# ---- parameter counts equal Hugging Face's models


def test_tiny_parameter_count_equals_huggingface():
    hf = transformers.EomtDinov3ForUniversalSegmentation(hf_config())
    assert sum(p.numel() for p in ours().parameters()) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("size,dim,depth,heads", [("small", 384, 12, 6), ("base", 768, 12, 12),
                                                  ("large", 1024, 24, 16)])
def test_full_size_backbone_parameter_count_equals_huggingface(size, dim, depth, heads):
    """facebook/dinov3-vit{s,b,l}16: DINOv3ViTConfig's defaults except width, depth, heads, MLP 4x and 4
    registers (their config.json); the pre-training mask token is not part of the segmenter."""
    cfg = transformers.DINOv3ViTConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                                       intermediate_size=4 * dim, num_register_tokens=4, image_size=640)
    with torch.device("meta"):
        hf = transformers.DINOv3ViTModel(cfg)
        bb = ViTBackbone(f"vit_{size}_patch16_dinov3", 640)
    n_hf = sum(p.numel() for n, p in hf.named_parameters() if "mask_token" not in n)
    assert sum(p.numel() for p in bb.vit.parameters()) == n_hf


# ---- the recipe's option and the baseline chain on DINOv3


@pytest.mark.parametrize("backbone", ["tiny", "tiny_dinov3"])  # DINOv2's layout and DINOv3's
def test_query_blocks_without_layer_decay(backbone):
    """llrd_l2_enabled: False (official DINOv3 configs): the L2 query blocks get the full lr; the blocks before
    keep decay^(L-1-i), as in the default (paper) recipe where the query blocks decay too."""
    model = EoMT(ViTBackbone(backbone, IMG), CLASSES, QUERIES, L2)
    scale_of = {}
    for decay_q in (True, False):
        for g in model.param_groups(0.8, decay_query_blocks=decay_q):
            for p in g.params:
                scale_of[(decay_q, id(p))] = g.lr_scale
    for i, block in enumerate(model.backbone.blocks):
        p = next(block.parameters())
        paper = 0.8 ** (DEPTH - 1 - i)
        assert scale_of[(True, id(p))] == pytest.approx(paper)
        assert scale_of[(False, id(p))] == pytest.approx(1.0 if i >= DEPTH - L2 else paper)


@pytest.mark.parametrize("variant", ["vit_adapter_m2f", "sfp_m2f", "sfp_no_pixel_decoder", "single_scale"])
def test_table1_rows_0_to_3_train_on_dinov3(variant, one_thread):
    """Rows 0-3 on the DINOv3 backbone (RoPE on the patch tokens, 4 registers, patch 16): the ViT-Adapter
    injects into and extracts from the patch tokens only, so RoPE's rows stay aligned; every parameter gets a
    gradient (DDP with find_unused_parameters=False)."""
    from study.config import load_config
    from study.models.build import build_model

    cfg = load_config(None, [f"model.variant={variant}", "model.size=tiny", "model.backbone=tiny_dinov3",
                             f"model.img_size={IMG}", "model.num_classes=3", "model.num_queries=5"]).model
    model = build_model(cfg).train()
    assert model.backbone.vit.rope is not None
    sets = model(torch.rand(1, 3, IMG, IMG))
    sum(s.mask_logits.sum() + s.class_logits.sum() for s in sets).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_load_checkpoint_dispatches_dinov3_layouts(tmp_path):
    """study.models.checkpoint.load_checkpoint (model.checkpoint) takes EoMT-DINOv3 files in both layouts."""
    from study.models.checkpoint import load_checkpoint

    hf = hf_eomt()
    torch.save(official_module(hf).state_dict(), tmp_path / "official.ckpt")
    torch.save(hf.state_dict(), tmp_path / "hf.bin")
    x = torch.rand(1, 3, IMG, IMG)
    for name, layout in (("official.ckpt", "official"), ("hf.bin", "huggingface")):
        model = ours(masked_inference=True)  # HF masks at inference: its P_mask is 1
        assert load_checkpoint(model, tmp_path / name) == layout
        _logits_equal(model, hf, x)


def test_model_delta_weights_reach_the_loader(tmp_path, one_thread):
    """model.delta_weights: build_model -> load_checkpoint(..., delta_weights=True), the base from
    model.pretrained; without the key the same file loads as absolute weights (other logits)."""
    from study.config import ConfigError, load_config
    from study.models.build import build_model

    hf, backbone_file = write_official_delta(tmp_path)
    sets = ["model.variant=eomt", "model.size=tiny", "model.backbone=tiny_dinov3", f"model.img_size={IMG}",
            f"model.num_classes={CLASSES}", f"model.num_queries={QUERIES}", f"model.num_query_blocks={L2}",
            f"model.checkpoint={tmp_path / 'delta.bin'}", f"model.pretrained={backbone_file}"]
    model = build_model(load_config(None, sets + ["model.delta_weights=true"]).model).eval()
    x = torch.rand(1, 3, IMG, IMG)
    _logits_equal(model, hf, x)
    absolute = build_model(load_config(None, sets).model).eval()
    with torch.no_grad():
        assert not torch.allclose(absolute(x)[-1].mask_logits, model(x)[-1].mask_logits, atol=1e-3)
    with pytest.raises(ConfigError, match=r"model.delta_weights.*model.checkpoint \(or model.init_from\) is not set"):
        load_config(None, ["model.delta_weights=true"])


def test_train_layer_decay_query_blocks_reaches_the_optimizer():
    """train.layer_decay_query_blocks: false gives EoMT's query blocks the full lr through build_optimizer; the
    baselines accept the key (their ViT blocks decay either way)."""
    from study.models.build import build_model
    from study.models.config import ModelConfig
    from study.train.config import TrainConfig
    from study.train.optim import build_optimizer

    model = EoMT(ViTBackbone("tiny_dinov3", IMG), CLASSES, QUERIES, L2)
    last = next(model.backbone.blocks[DEPTH - 1].parameters())
    first_q = next(model.backbone.blocks[DEPTH - L2].parameters())
    before = next(model.backbone.blocks[DEPTH - L2 - 1].parameters())

    def lr_of(opt, p):
        return next(g["lr"] for g in opt.param_groups if any(q is p for q in g["params"]))

    paper = build_optimizer(model, TrainConfig())
    dinov3 = build_optimizer(model, TrainConfig(layer_decay_query_blocks=False))
    assert lr_of(paper, first_q) == pytest.approx(1e-4 * 0.8 ** (L2 - 1))
    assert lr_of(dinov3, first_q) == lr_of(dinov3, last) == pytest.approx(1e-4)
    assert lr_of(dinov3, before) == lr_of(paper, before) == pytest.approx(1e-4 * 0.8 ** L2)
    row0 = build_model(ModelConfig(variant="vit_adapter_m2f", size="tiny", img_size=IMG, num_classes=3,
                                   num_queries=5))
    a = build_optimizer(row0, TrainConfig())
    b = build_optimizer(row0, TrainConfig(layer_decay_query_blocks=False))
    assert [g["lr"] for g in a.param_groups] == [g["lr"] for g in b.param_groups]


def test_evaluation_loads_a_delta_checkpoint_on_its_pretrained_backbone(tmp_path, one_thread):
    """study eval / the launcher's eval step of a config whose model.checkpoint holds delta weights: the
    difference is added to model.pretrained (not loaded as absolute weights); a run's own weights stay
    absolute."""
    from study.config import load_config
    from study.eval.run import trained_model
    from study.models.build import build_model

    hf, backbone_file = write_official_delta(tmp_path)
    sets = ["model.variant=eomt", "model.size=tiny", "model.backbone=tiny_dinov3", f"model.img_size={IMG}",
            f"model.num_classes={CLASSES}", f"model.num_queries={QUERIES}", f"model.num_query_blocks={L2}",
            f"model.checkpoint={tmp_path / 'delta.bin'}", f"model.pretrained={backbone_file}",
            "model.delta_weights=true"]
    cfg = load_config(None, sets)
    x = torch.rand(1, 3, IMG, IMG)
    _logits_equal(trained_model(cfg, tmp_path / "delta.bin").eval(), hf, x)
    torch.save(build_model(cfg.model).state_dict(), tmp_path / "model_final.pt")  # a run's absolute weights
    _logits_equal(trained_model(cfg, tmp_path / "model_final.pt").eval(), hf, x)


def test_the_weights_readers_sit_below_the_backbones():
    """Issue 25 item 5: backbone.py, dinov3.py and checkpoint.py build on study/models/weights.py (readers, key
    rules, the fit check) and no circle runs through the model files any more."""
    from test_layering import REPO, circles, import_graph

    graph = import_graph(REPO)
    assert not graph["study/models/weights.py"] & {"study/models/backbone.py", "study/models/dinov3.py",
                                                    "study/models/checkpoint.py"}
    assert "study/models/backbone.py" not in graph["study/models/dinov3.py"]
    assert "study/models/checkpoint.py" not in graph["study/models/dinov3.py"]
    assert [sorted(c) for c in circles(graph) if any(f.startswith("study/models/") for f in c)
            and not c <= {"study/config.py", "study/models/build.py"}] == []
