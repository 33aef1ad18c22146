"""ALGM token merging in EoMT (Table 9; study/models/algm.py, model.token_merging)."""
from __future__ import annotations

import math

import pytest
import torch

from study.config import ConfigError, load_config
from study.errors import UserError
from study.models import algm
from study.models.build import build_model
from study.models.config import ALGM_DEFAULTS, ModelConfig, TokenMerging, TokenMergingConfig


def tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(size="tiny", img_size=64, num_classes=5, num_queries=7, **kw)
    return build_model(cfg).eval()


def merging(**kw) -> TokenMerging:
    return TokenMergingConfig(enabled=True, **kw).resolve("tiny")


def halves(batch: int = 2) -> torch.Tensor:
    """Images of two flat halves: large uniform regions."""
    img = torch.zeros(batch, 3, 64, 64)
    img[:, 0, :, 32:] = 1.0
    img[:, 2, :, :32] = 0.5
    return img


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.mask_logits, y.mask_logits) and torch.equal(x.class_logits, y.class_logits)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("masked", [False, True])
def test_thresholds_above_one_give_plain_eomt_bit_for_bit(masked):
    model = tiny(masked_inference=masked)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(images)
        model.set_token_merging(merging(threshold=1.01, global_threshold=1.01))
        merged = model(images)
    assert model.last_merges == [(0, 16, 16), (1, 16, 16)]  # the merge code ran, and removed nothing
    assert len(plain) == (3 if masked else 1)
    assert same(plain, merged)


@pytest.mark.parametrize("masked", [False, True])
def test_merging_removes_tokens_on_uniform_regions(masked):
    model = tiny(masked_inference=masked)
    model.set_token_merging(merging())  # ALGM's default for the size: local at block 0, global at block 1
    with torch.no_grad():
        plain_model = tiny(masked_inference=masked)
        out = model(halves())
        ref = plain_model(halves())
    (b0, before0, after0), (b1, before1, after1) = model.last_merges
    assert (b0, b1, before0) == (0, 1, 16)
    assert after0 < before0 and after1 <= after0 and before1 == after0
    assert after0 == 16 - 3 * ((16 - after0) // 3)  # whole 2x2 windows collapse into one token
    assert [p.mask_logits.shape for p in out] == [p.mask_logits.shape for p in ref]  # unmerged to the grid
    assert all(torch.isfinite(p.mask_logits).all() for p in out)


def test_training_never_merges():
    model = tiny()
    model.set_token_merging(merging())
    model.train()
    model(halves())
    assert model.last_merges == []


def test_local_merge_takes_the_batch_minimum_of_similar_windows():
    torch.manual_seed(0)
    grid = (4, 4)
    members = algm.window_members(grid, 2, "cpu")
    assert members[0].tolist() == [0, 1, 4, 5] and members[3].tolist() == [10, 11, 14, 15]
    uniform = torch.ones(16, 8) + 0.01 * torch.randn(16, 8)  # every window similar
    noise = torch.randn(16, 8)
    noise[members[1]] = torch.tensor([1.0] * 8) + 0.01 * torch.randn(4, 8)  # one similar window
    rep, removed = algm.local_targets(torch.stack([uniform, noise]), grid, 0.9, 2)
    assert removed == 3  # one window per image, though the first image has four similar ones
    assert rep[1].tolist() == [0, 1, 2, 2, 4, 5, 2, 2] + list(range(8, 16))
    assert (rep[0] != torch.arange(16)).sum() == 3


def test_window_similarity_is_the_mean_pairwise_cosine():
    x = torch.randn(1, 16, 5)
    members = algm.window_members((4, 4), 2, "cpu")
    sim = algm.window_similarity(x, members)
    for w, idx in enumerate(members.tolist()):
        pairs = [torch.cosine_similarity(x[0, i], x[0, j], dim=0) for i in idx for j in idx if i != j]
        assert math.isclose(sim[0, w].item(), (sum(pairs) / len(pairs)).item(), abs_tol=1e-6)


def test_odd_grid_leaves_the_last_row_and_column_out_of_every_window():
    members = algm.window_members((5, 5), 2, "cpu")
    assert members.shape == (4, 4)
    assert not set(members.flatten().tolist()) & {4, 9, 14, 19, 20, 21, 22, 23, 24}


def test_global_adaptive_threshold_is_mean_plus_std_over_the_block_number():
    # A tokens (even positions) 0 and 2 equal B tokens (odd) 1 and 3; A tokens 4 and 6 are orthogonal to every
    # B token: best scores [1, 1, 0, 0], mean 0.5, unbiased std 0.577.
    e = torch.eye(8)
    tokens = torch.stack([e[0], e[0], e[1], e[1], e[2], e[3], e[4], e[5]])[None]
    rep, removed = algm.global_targets(tokens, layer_number=2, threshold=None)  # 0.5 + 0.289: both ones
    assert removed == 2 and rep[0].tolist() == [1, 1, 3, 3, 4, 5, 6, 7]
    _, removed = algm.global_targets(tokens, layer_number=1, threshold=None)  # 0.5 + 0.577 > 1: none
    assert removed == 0
    _, removed = algm.global_targets(tokens, layer_number=1, threshold=-1.0)  # fixed: every A token
    assert removed == 4


def test_merged_tokens_are_size_weighted_averages_of_their_patches():
    torch.manual_seed(0)
    patches = torch.randn(2, 16, 3)
    state = algm.initial_state(2, 16, "cpu", torch.float32)
    local = torch.arange(16).expand(2, -1).clone()
    local[:, [1, 4, 5]] = 0  # window 0 -> token 0
    x1, s1 = algm.apply_targets(patches, state, local, 3)
    assert x1.shape == (2, 13, 3) and s1.size[:, 0, 0].tolist() == [4.0, 4.0]
    glob = torch.arange(13).expand(2, -1).clone()
    glob[:, 2] = 0  # token 2 (patch 3) joins the merged window: sizes 4 and 1
    x2, s2 = algm.apply_targets(x1, s1, glob, 1)
    for b in range(2):
        for t in range(12):
            held = (s2.assign[b] == t).nonzero().flatten()
            assert s2.size[b, t, 0] == len(held)
            torch.testing.assert_close(x2[b, t], patches[b, held].mean(0))  # not the mean of 2 tokens
    assert s2.assign[0, [0, 1, 3, 4, 5]].unique().tolist() == [0]
    grid = algm.unmerge(x2, s2)
    torch.testing.assert_close(grid[:, 3], x2[:, 0])
    values = torch.randn(2, 4, 16)
    pooled = algm.pool_to_tokens(values, s2)
    torch.testing.assert_close(pooled[:, :, 0], values[:, :, [0, 1, 3, 4, 5]].mean(-1))


def test_prefix_tokens_are_never_merged():
    model = tiny()
    backbone = model.backbone
    x = backbone.embed(backbone.normalize(halves()))
    p = backbone.num_prefix_tokens
    state = algm.initial_state(2, x.shape[1] - p, x.device, x.dtype)
    with torch.no_grad():
        plain = backbone.run_block(0, x)
        merged, state = algm.merging_block(backbone.blocks[0], x, p, state,
                                           lambda t: algm.local_targets(t, backbone.grid_size, 0.0, 2))
    assert merged.shape[1] == p + 4  # every window merged (threshold 0)
    # The prefix rows see the same attention and the same per-row MLP, but the MLP's matrix products now have
    # p + 4 rows instead of p + N: another GEMM shape, which some BLAS kernels block differently (bitwise on
    # Intel's MKL path, not with MKL_ENABLE_INSTRUCTIONS=AVX2, as on an AMD EPYC). Each MLP output is a chain of
    # K-term fp32 dot products (K = C in fc1, 4C in fc2), so the two stay within gamma_K = K u / (1 - K u),
    # u = 2^-24, of the magnitudes involved; we allow 2 gamma_(5C) of the largest |value| (1e-5 for tiny).
    k = 5 * x.shape[-1]
    gamma = k * 2.0 ** -24 / (1 - k * 2.0 ** -24)
    scale = float(plain[:, :p].abs().max()) + float(backbone.blocks[0].mlp(backbone.blocks[0].norm2(plain)).abs().max())
    torch.testing.assert_close(merged[:, :p], plain[:, :p], rtol=0, atol=2 * gamma * scale)
    assert not torch.allclose(merged[:, p:p + 4], plain[:, p:p + 4], atol=1e-3)  # the merged rows did change


def test_host_syncs_plain_none_merged_one_per_merge(monkeypatch):
    """The plain forward reads nothing back; each merge reads its batch minimum r (one integer) back: two per
    forward. tests/test_host_syncs.py covers the plain models and leaves merging out on purpose."""
    from test_host_syncs import count_syncs

    model = tiny()
    images = halves()
    with torch.no_grad():
        assert count_syncs(lambda: model(images), monkeypatch) == []
        model.set_token_merging(merging())
        syncs = count_syncs(lambda: model(images), monkeypatch)
    assert syncs == ["aten._local_scalar_dense.default"] * 2


def test_defaults_per_size_and_config_keys():
    assert ALGM_DEFAULTS["L"] == (0, 6, 0.95) and ALGM_DEFAULTS["S"] == (0, 4, 0.88)
    cfg = load_config(None, ["model.token_merging.enabled=true", "model.size=L"])
    assert cfg.model.token_merging.resolve("L") == TokenMerging(0, 6, 0.95, None, 2)
    assert TokenMergingConfig().resolve("L") is None
    assert TokenMergingConfig(enabled=True, global_merge=False).resolve("S").global_block is None
    with pytest.raises(ConfigError, match="token_merging"):
        load_config(None, ["model.token_merging.enabled=true", "model.variant=vit_adapter_m2f"])
    with pytest.raises(ConfigError, match="global_block"):
        load_config(None, ["model.token_merging.local_block=3", "model.token_merging.global_block=2"])


def test_merging_after_the_queries_join_is_refused():
    model = tiny()  # 4 blocks, queries from block 2
    with pytest.raises(UserError, match="model.token_merging.global_block is 2"):
        model.set_token_merging(merging(global_block=2))
    torch.manual_seed(0)
    eva = build_model(ModelConfig(size="tiny", backbone="tiny_eva02", img_size=64, num_classes=5, num_queries=7))
    with pytest.raises(UserError, match="rotary"):
        eva.set_token_merging(merging())


def test_the_config_reaches_the_model():
    """model.token_merging.* in a config file builds a merging EoMT (training, evaluation and the Table 9 grid
    all build through build_model); off by default."""
    cfg = load_config("experiments/quickstart.yaml", ["model.token_merging.enabled=true",
                                                      "model.token_merging.threshold=0.5"])
    model = build_model(cfg.model).eval()
    assert model.token_merging == TokenMergingConfig(enabled=True, threshold=0.5).resolve("tiny")
    with torch.no_grad():
        model(halves().repeat(1, 1, 2, 2))  # the quickstart's 128 px
    assert model.last_merges and model.last_merges[0][2] < model.last_merges[0][1]
    assert build_model(load_config("experiments/quickstart.yaml").model).token_merging is None
