"""EoMT: the contract, Hugging Face equivalence with the same weights, and the three checkpoint layouts."""
from __future__ import annotations

import pytest

from conftest import oracle
import torch

from study.config import load_config
from study.models.backbone import IMAGENET_MEAN, IMAGENET_STD
from study.models.build import build_model
from study.models.checkpoint import load_checkpoint

transformers = oracle("transformers")

IMG, CLASSES, QUERIES, L2 = 64, 5, 7, 2


def tiny_eomt(**over) -> torch.nn.Module:
    sets = [f"model.{k}={v}" for k, v in dict(size="tiny", img_size=IMG, num_classes=CLASSES,
                                                  num_queries=QUERIES, num_query_blocks=L2, **over).items()]
    return build_model(load_config(None, sets).model).eval()


def hf_eomt() -> torch.nn.Module:
    cfg = transformers.EomtConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=IMG,
                                  patch_size=16, num_queries=QUERIES, num_blocks=L2, num_labels=CLASSES,
                                  num_register_tokens=4, layerscale_value=0.5)
    torch.manual_seed(1)
    return transformers.EomtForUniversalSegmentation(cfg).eval()


def hf_forward(hf, images):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = hf(pixel_values=(images - mean) / std)  # HF leaves normalisation to its image processor
    return out.masks_queries_logits, out.class_queries_logits


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    hf = hf_eomt()
    path = tmp_path_factory.mktemp("hf") / "pytorch_model.bin"
    torch.save(hf.state_dict(), path)
    return hf, path


def test_contract_prediction_sets():
    model = tiny_eomt()
    images = torch.rand(2, 3, IMG, IMG)
    model.train()
    sets = model(images)
    assert len(sets) == L2 + 1  # one before each query block, one at the end (docs/paper.md section 5)
    for s in sets:
        assert s.mask_logits.shape == (2, QUERIES, IMG // 4, IMG // 4)
        assert s.class_logits.shape == (2, QUERIES, CLASSES + 1)
    model.eval()
    assert len(model(images)) == 1  # row 5: masking off at inference, a single set
    model.masked_inference = True
    assert len(model(images)) == L2 + 1  # row 4
    model.train()
    model.masked_attention = False  # Table 7 "never masked": one set, no intermediate supervision
    assert len(model(images)) == 1


@pytest.mark.parametrize("masked", [False, True])
def test_same_outputs_as_huggingface(hf_checkpoint, masked):
    hf, path = hf_checkpoint
    ours = tiny_eomt(masked_inference=masked)
    assert load_checkpoint(ours, path) == "huggingface"
    probs = torch.ones(L2) if masked else torch.zeros(L2)  # HF masks at inference iff P_mask > 0
    hf.attn_mask_probs.copy_(probs)
    ours.set_mask_probs(probs)
    images = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        masks_hf, classes_hf = hf_forward(hf, images)
        sets = ours(images)
    assert len(sets) == (L2 + 1 if masked else 1)
    torch.testing.assert_close(sets[-1].mask_logits, masks_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sets[-1].class_logits, classes_hf, atol=1e-5, rtol=1e-5)


def test_masking_changes_the_output(hf_checkpoint):
    """Guards the equivalence test above: masked and unmasked outputs must differ with these weights."""
    _, path = hf_checkpoint
    a, b = tiny_eomt(masked_inference=False), tiny_eomt(masked_inference=True)
    load_checkpoint(a, path)
    load_checkpoint(b, path)
    images = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        assert (a(images)[-1].mask_logits - b(images)[-1].mask_logits).abs().max() > 1e-3


# ---- the official checkpoint layout, written from the official code (github tue-mps/eomt, commit 7bd19dd) ----
# training/lightning_module.py: the training module holds the model as ``self.network``;
#   training/mask_classification_panoptic.py adds ``self.criterion`` (training/mask_classification_loss.py),
#   whose only tensor is the buffer ``empty_weight`` (C + 1,).
# models/eomt.py, class EoMT: ``encoder`` (models/vit.py), buffer ``attn_mask_probs`` (num_blocks,),
#   ``q`` = nn.Embedding(num_q, D), ``class_head`` = nn.Linear(D, C + 1),
#   ``mask_head`` = nn.Sequential(Linear(D, D), GELU, Linear(D, D), GELU, Linear(D, D)) -> indices 0, 2, 4,
#   ``upscale`` = nn.Sequential of max(1, log2(patch) - 2) ScaleBlocks (2 for patch 16).
# models/scale_block.py, class ScaleBlock: ``conv1`` = ConvTranspose2d(D, D, 2, stride 2), ``act``,
#   ``conv2`` = Conv2d(D, D, 3, padding 1, groups D, bias False), ``norm`` = timm LayerNorm2d(D).
# models/vit.py, class ViT: ``backbone`` = timm.create_model(name, img_size, patch_size, num_classes=0), buffers
#   ``pixel_mean`` and ``pixel_std`` of shape (1, 3, 1, 1).
OFFICIAL_D, OFFICIAL_DEPTH, OFFICIAL_MLP, OFFICIAL_PATCH = 64, 4, 256, 16  # the tiny size of this file's models


def official_key_shapes() -> dict:
    """Every key of an official EoMT checkpoint of the tiny model, with its shape."""
    D, G = OFFICIAL_D, (IMG // OFFICIAL_PATCH) ** 2
    vit = "network.encoder.backbone."
    keys = {
        "criterion.empty_weight": (CLASSES + 1,),
        "network.attn_mask_probs": (L2,),
        "network.encoder.pixel_mean": (1, 3, 1, 1),
        "network.encoder.pixel_std": (1, 3, 1, 1),
        "network.q.weight": (QUERIES, D),
        "network.class_head.weight": (CLASSES + 1, D),
        "network.class_head.bias": (CLASSES + 1,),
        # timm VisionTransformer, DINOv2 with 4 registers (no_embed_class: no position embedding on prefix tokens)
        vit + "cls_token": (1, 1, D),
        vit + "reg_token": (1, 4, D),
        vit + "pos_embed": (1, G, D),
        vit + "patch_embed.proj.weight": (D, 3, OFFICIAL_PATCH, OFFICIAL_PATCH),
        vit + "patch_embed.proj.bias": (D,),
        vit + "norm.weight": (D,),
        vit + "norm.bias": (D,),
    }
    for i in range(OFFICIAL_DEPTH):
        b = f"{vit}blocks.{i}."
        keys.update({
            b + "norm1.weight": (D,), b + "norm1.bias": (D,),
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "ls1.gamma": (D,),
            b + "norm2.weight": (D,), b + "norm2.bias": (D,),
            b + "mlp.fc1.weight": (OFFICIAL_MLP, D), b + "mlp.fc1.bias": (OFFICIAL_MLP,),
            b + "mlp.fc2.weight": (D, OFFICIAL_MLP), b + "mlp.fc2.bias": (D,),
            b + "ls2.gamma": (D,),
        })
    for j in (0, 2, 4):
        keys[f"network.mask_head.{j}.weight"] = (D, D)
        keys[f"network.mask_head.{j}.bias"] = (D,)
    for i in range(2):
        u = f"network.upscale.{i}."
        keys.update({u + "conv1.weight": (D, D, 2, 2), u + "conv1.bias": (D,), u + "conv2.weight": (D, 1, 3, 3),
                     u + "norm.weight": (D,), u + "norm.bias": (D,)})
    return keys


def official_to_hf(sd: dict) -> dict:
    """The same tensors under the names of transformers' EomtForUniversalSegmentation (checked strictly by
    load_state_dict below), written per module: HF splits the fused qkv and keeps pos_embed as (N, D)."""
    out = {}
    vit = "network.encoder.backbone."
    simple = {vit + "cls_token": "embeddings.cls_token", vit + "reg_token": "embeddings.register_tokens",
              vit + "norm.weight": "layernorm.weight", vit + "norm.bias": "layernorm.bias",
              "network.q.weight": "query.weight", "network.attn_mask_probs": "attn_mask_probs",
              "network.class_head.weight": "class_predictor.weight", "network.class_head.bias": "class_predictor.bias",
              "criterion.empty_weight": "criterion.empty_weight"}
    block = {"norm1": "norm1", "attn.proj": "attention.out_proj", "norm2": "norm2", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
    upscale = {"conv1": "conv1", "conv2": "conv2", "norm": "layernorm2d"}
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
        elif k == vit + "pos_embed":
            out["embeddings.position_embeddings.weight"] = v[0]
        elif k.startswith(vit + "patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + k.rsplit(".", 1)[1]] = v
        elif k.startswith(vit + "blocks."):
            i, rest = k[len(vit + "blocks."):].split(".", 1)
            mod, kind = rest.rsplit(".", 1)
            if mod == "attn.qkv":
                for name, part in zip("qkv", v.chunk(3)):
                    out[f"layers.{i}.attention.{name}_proj.{kind}"] = part
            elif mod in ("ls1", "ls2"):
                out[f"layers.{i}.layer_scale{mod[-1]}.lambda1"] = v
            else:
                out[f"layers.{i}.{block[mod]}.{kind}"] = v
        elif k.startswith("network.mask_head."):
            j, kind = k[len("network.mask_head."):].split(".")
            out[f"mask_head.fc{int(j) // 2 + 1}.{kind}"] = v
        elif k.startswith("network.upscale."):
            i, mod, kind = k[len("network.upscale."):].split(".")
            out[f"upscale_block.block.{i}.{upscale[mod]}.{kind}"] = v
        elif k not in ("network.encoder.pixel_mean", "network.encoder.pixel_std"):  # HF normalises outside
            raise AssertionError(f"no Hugging Face name for {k}")
    return out


def test_official_key_list_matches_timm_backbone():
    """The backbone part of the list is what timm's DINOv2 ViT (the official encoder) names its tensors."""
    import timm

    vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=IMG,
                            patch_size=OFFICIAL_PATCH, num_classes=0, embed_dim=OFFICIAL_D, depth=OFFICIAL_DEPTH,
                            num_heads=4)
    prefix = "network.encoder.backbone."
    listed = {k[len(prefix):]: v for k, v in official_key_shapes().items() if k.startswith(prefix)}
    assert listed == {k: tuple(v.shape) for k, v in vit.state_dict().items()}


@pytest.mark.parametrize("masked", [False, True])
def test_official_and_hf_layouts_load_to_identical_outputs(tmp_path, masked):
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(shape, generator=g) * 0.3 for k, shape in official_key_shapes().items()}
    sd["network.encoder.pixel_mean"] = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    sd["network.encoder.pixel_std"] = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    probs = torch.ones(L2) if masked else torch.zeros(L2)  # HF masks at inference iff P_mask > 0
    sd["network.attn_mask_probs"] = probs
    official = tmp_path / "official.bin"
    torch.save({"state_dict": sd}, official)  # the released files may nest it under state_dict
    from_official = tiny_eomt(masked_inference=masked)
    assert load_checkpoint(from_official, official) == "official"
    from_official.set_mask_probs(probs)

    hf = hf_eomt()
    hf.load_state_dict(official_to_hf(sd), strict=True)  # every HF name real, none left out
    hf_path = tmp_path / "hf.bin"
    torch.save(hf.state_dict(), hf_path)
    from_hf = tiny_eomt(masked_inference=masked)
    assert load_checkpoint(from_hf, hf_path) == "huggingface"
    from_hf.set_mask_probs(probs)

    images = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        a, b = from_official(images), from_hf(images)
        masks_hf, classes_hf = hf_forward(hf, images)
    assert len(a) == len(b) == (L2 + 1 if masked else 1)
    for x, y in zip(a, b):
        assert torch.equal(x.mask_logits, y.mask_logits) and torch.equal(x.class_logits, y.class_logits)
    # and the oracle: Hugging Face's own model with the official tensors
    torch.testing.assert_close(a[-1].mask_logits, masks_hf, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a[-1].class_logits, classes_hf, atol=1e-4, rtol=1e-4)


def test_checkpoint_with_wrong_shapes_names_the_keys(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint
    model = build_model(load_config(None, ["model.size=tiny", f"model.img_size={IMG}", "model.num_classes=9",
                                           f"model.num_queries={QUERIES}", f"model.num_query_blocks={L2}"]).model)
    with pytest.raises(ValueError, match=r"huggingface layout.*shape mismatches.*head\.class_head\.weight"):
        load_checkpoint(model, path)


def test_checkpoint_with_foreign_keys_is_rejected(tmp_path):
    path = tmp_path / "foreign.bin"
    torch.save({"network.decoder.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="key 'network.decoder.weight' has no counterpart"):
        load_checkpoint(tiny_eomt(), path)


def test_layer_wise_decay_groups():
    model = tiny_eomt()
    depth = model.backbone.depth
    scale = {id(p): g.lr_scale for g in model.param_groups(0.8) for p in g.params}
    backbone = {id(p): g.backbone for g in model.param_groups(0.8) for p in g.params}
    vit = model.backbone.vit
    # block i of L gets 0.8^(L-1-i); embeddings get block 0's; final norm and new parts the full lr
    assert scale[id(vit.blocks[depth - 1].attn.qkv.weight)] == pytest.approx(1.0)
    assert scale[id(vit.blocks[0].mlp.fc1.weight)] == pytest.approx(0.8 ** (depth - 1))
    for p in (vit.patch_embed.proj.weight, vit.pos_embed, vit.cls_token, vit.reg_token):
        assert scale[id(p)] == pytest.approx(0.8 ** (depth - 1)) and backbone[id(p)]
    assert scale[id(vit.norm.weight)] == 1.0 and backbone[id(vit.norm.weight)]
    assert scale[id(model.q.weight)] == 1.0 and not backbone[id(model.q.weight)]
    assert sum(len(g.params) for g in model.param_groups()) == len(list(model.parameters()))


def test_masked_attention_restricts_only_query_to_patch():
    model = tiny_eomt(masked_inference=True)
    n = QUERIES + model.backbone.num_prefix_tokens + (IMG // 16) ** 2
    pred = model.predict(torch.randn(1, n, 64))
    mask = model.attention_mask(pred, n, layer=0)
    start = QUERIES + model.backbone.num_prefix_tokens
    assert mask[:, :, :start].all()  # query -> query and query -> prefix stay open
    assert mask[:, QUERIES:].all()  # every non-query row stays open
    assert not mask[:, :QUERIES, start:].all()  # some query -> patch entries closed
    model.set_mask_probs(torch.zeros(L2))  # P_mask = 0: every query's mask switched off
    assert model.attention_mask(pred, n, layer=0).all()


def test_query_blocks_beyond_the_backbone_depth_are_a_user_error_naming_the_key():
    """L2 larger than the ViT (tiny has 4 blocks) is the user's setting at fault: one message naming
    model.num_query_blocks and the valid range, not a bare ValueError with a traceback."""
    from study.config import load_config
    from study.errors import UserError
    from study.models.build import build_model

    cfg = load_config(None, ["model.size=tiny", "model.num_query_blocks=5", "model.img_size=32"])
    with pytest.raises(UserError, match=r"model.num_query_blocks \(L2\) is 5, but this backbone has 4 blocks"):
        build_model(cfg.model)
