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


def official_state_dict(model) -> dict:
    """Our model's weights renamed into the official EoMT training module's layout (docs/paper.md section 5)."""
    out = {"criterion.empty_weight": torch.ones(CLASSES + 1)}
    for k, v in model.state_dict().items():
        if k.startswith("backbone.vit."):
            out["network.encoder.backbone." + k[len("backbone.vit."):]] = v
        elif k.startswith("backbone.pixel_"):
            out["network.encoder." + k[len("backbone."):]] = v
        elif k.startswith("head."):
            out["network." + k[len("head."):]] = v
        else:
            out["network." + k] = v
    return out


def test_official_and_hf_layouts_load_to_identical_outputs(hf_checkpoint, tmp_path):
    _, hf_path = hf_checkpoint
    from_hf = tiny_eomt()
    load_checkpoint(from_hf, hf_path)
    official = tmp_path / "official.bin"
    torch.save({"state_dict": official_state_dict(from_hf)}, official)  # released files may nest it
    from_official = tiny_eomt()
    assert load_checkpoint(from_official, official) == "official"
    images = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        a, b = from_hf(images)[-1], from_official(images)[-1]
    assert torch.equal(a.mask_logits, b.mask_logits) and torch.equal(a.class_logits, b.class_logits)


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
