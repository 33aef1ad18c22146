"""The two GFLOPs counters agree exactly: ``fast`` (the forward on FakeTensors, study/bench/count_fake.py) against
``fvcore`` (a real traced forward, the reference), per module, per component and per operator.

Default run: every registered variant (Table 1 rows 0-5) at tiny and S (a 64 px input and shallower heads, see
SMALL: the operators and modules are the same), and the operators' conventions on a toy model that uses every
handle. Slow: the whole real-size table (study/bench/run.py
REAL_SIZE_TABLE), fvcore taking up to minutes per row.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from study.bench.count_fake import build_meta_model
from study.bench.flops import count_flops, count_params
from study.bench.run import REAL_SIZE_TABLE
from study.cli import main
from study.models.build import build_model, table1_rows
from study.models.config import ModelConfig

FIELDS = ("total", "by_module", "by_component", "by_operator", "uncounted")


# The default run's economy: 20 queries, and for rows 0-3 one deformable encoder layer and three decoder layers (one
# per level) instead of 6 and 9; every operator and module kind is still there. The slow test counts the defaults.
SMALL = {"num_queries": 20}
SMALL_CHAIN = {"encoder_layers": 1, "decoder_layers": 3}


def counted(variant: str, size: str, img: int):
    """(fvcore on the real model, fast on the real model (tiny only, else None), fast on the meta-built model,
    params of the real model, of the meta-built one)."""
    torch.manual_seed(0)
    takes_options = {v.name: v for v in table1_rows()}[variant].options is not None  # rows 0-3
    cfg = ModelConfig(variant=variant, size=size, img_size=img, **SMALL, baseline=SMALL_CHAIN if takes_options else {})
    model = build_model(cfg)
    meta = build_meta_model(lambda: build_model(cfg))
    assert all(p.is_meta for p in meta.parameters())  # no weights at all: nothing to compute with
    return (count_flops(model, img, counter="fvcore"), count_flops(model, img) if size == "tiny" else None,
            count_flops(meta, img), count_params(model), count_params(meta))


def assert_same(ref, fast):
    for name in FIELDS:
        assert getattr(fast, name) == getattr(ref, name), name


@pytest.mark.parametrize("size", ["tiny", "S"])
@pytest.mark.parametrize("variant", [v.name for v in table1_rows()])
def test_fast_counter_equals_fvcore(variant, size):
    ref, fast, fast_meta, params, params_meta = counted(variant, size, 64)
    assert ref.total > 0 and ref.by_component and ref.by_module
    if fast is not None:
        assert_same(ref, fast)
    assert_same(ref, fast_meta)
    assert params_meta == params


@pytest.mark.slow
@pytest.mark.parametrize("variant, size, img", REAL_SIZE_TABLE)
def test_fast_counter_equals_fvcore_real_sizes(variant, size, img):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, size=size, img_size=img)
    fast = count_flops(build_meta_model(lambda: build_model(cfg)), img)
    model = build_model(cfg)
    assert_same(count_flops(model, img, counter="fvcore"), fast)


# ---------------------------------------------------------------------------------------------- conventions


class Toy(nn.Module):
    """Every operator fvcore counts by default (and a few it does not), a shared module, a module whose forward
    is called directly, and operators outside any submodule."""

    def __init__(self, mha: bool = False, function: bool = False):
        super().__init__()
        self.mha_on, self.function_on = mha, function
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, 2)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8)
        self.ln_plain = nn.LayerNorm(8, elementwise_affine=False)
        self.lin = nn.Linear(8, 16)
        self.alias = self.lin  # one module, two names: counted under its first
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.inner = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        x = self.gn(self.bn(self.up(self.conv(x))))
        y = F.interpolate(x, scale_factor=0.5, mode="bilinear") + F.interpolate(x, scale_factor=0.5, mode="nearest")
        y = y + F.adaptive_avg_pool2d(x, y.shape[-2:]) + F.interpolate(x, scale_factor=0.5, mode="bicubic")
        t = self.ln_plain(self.ln(y.flatten(2).transpose(1, 2)))  # (1, N, 8)
        a, b = self.lin(t), self.alias(t)
        c = torch.einsum("bnc,bmc->bnm", a, b) + torch.einsum("bnc,bnc->bnc", a, b).sum(-1, keepdim=True)
        e = a @ self.w + torch.matmul(a, self.w.expand(1, 16, 16))
        f = torch.bmm(a, self.w[None]) + torch.baddbmm(a, a, self.w[None])  # baddbmm: not counted by fvcore
        h = self.inner.forward(e)  # no scope for ``inner`` itself; its Linear has one
        s = F.scaled_dot_product_attention(a[:, None], b[:, None], a[:, None], attn_mask=c[:, None] > 0)
        out = c.sum() + f.sum() + h.sum() + s.sum() + torch.addmm(self.w, self.w, self.w).sum()
        if self.mha_on:
            out = out + self.mha(h, h, h, need_weights=False)[0].sum()
        if self.function_on:
            out = out + _Opaque.apply(h, self.w).sum()
        return [[out[None]]]


class _Opaque(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        return x @ w

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def test_toy_model_every_handle_and_scope():
    torch.manual_seed(0)
    model = Toy()
    ref, fast = count_flops(model, 16, counter="fvcore"), count_flops(model, 16)
    assert_same(ref, fast)
    assert set(ref.by_operator) == {"conv", "batch_norm", "group_norm", "upsample_bilinear2d", "upsample_nearest2d",
                                    "adaptive_avg_pool2d", "layer_norm", "linear", "einsum", "matmul", "bmm",
                                    "scaled_dot_product_attention", "addmm"}
    assert "aten::baddbmm" in fast.uncounted and "aten::upsample_bicubic2d" in fast.uncounted
    tokens = 16 * 16
    assert "alias" not in fast.by_module and fast.by_module["lin"] == 2 * tokens * 8 * 16  # both calls, one name
    assert fast.by_module["inner"] == fast.by_module["inner.0"] == tokens * 16 * 16
    # fvcore's conventions hold (not just the two counters agreeing): batch_norm in eval 2 per element,
    # layer_norm 5 with and 4 without affine, the transposed convolution over its input positions
    assert fast.by_module["bn"] == 2 * 8 * 32 * 32
    assert fast.by_module["ln"] == 5 * tokens * 8 and fast.by_module["ln_plain"] == 4 * tokens * 8
    assert fast.by_module["up"] == 8 * 8 * 2 * 2 * 16 * 16


def test_known_differences_are_fvcore_blind_spots():
    """Where the counters differ, fvcore leaves FLOPs uncounted and says so; fast counts them. Neither occurs in
    the suite's models (test_fast_counter_equals_fvcore): nn.MultiheadAttention's fused inference path (not
    taken while a TorchFunctionMode is active, so fast counts its projections and attention) and an autograd
    Function (one opaque prim::PythonOp for fvcore; its operators are seen here)."""
    torch.manual_seed(0)
    base = count_flops(Toy(), 16)
    mha = Toy(mha=True)
    ref, fast = count_flops(mha, 16, counter="fvcore"), count_flops(mha, 16)
    assert ref.total == base.total and ref.uncounted.get("aten::_native_multi_head_attention") == 1
    tokens, dim = 16 * 16, 16
    assert fast.total - base.total == 4 * tokens * dim * dim + 2 * tokens * tokens * dim  # q, k, v, out + QK^T, AV
    fn = Toy(function=True)
    ref, fast = count_flops(fn, 16, counter="fvcore"), count_flops(fn, 16)
    assert ref.total == base.total and ref.uncounted.get("prim::PythonOp._Opaque") == 1
    assert fast.total - base.total == tokens * dim * dim


def test_unknown_counter_is_a_user_error():
    from study.errors import UserError

    with pytest.raises(UserError, match="bench.counter 'jit' is not one of fast, fvcore"):
        count_flops(Toy(), 16, counter="jit")


def test_cli_counters_give_the_same_rows(tmp_path):
    rows = {}
    for counter in ("fast", "fvcore"):
        out = tmp_path / f"{counter}.json"
        assert main(["bench", "--no-fps", "--sizes", "tiny", "--img-size", "64", "--counter", counter,
                     "--json", str(out)]) == 0
        rows[counter] = json.loads(out.read_text())
    for fast, ref in zip(rows["fast"], rows["fvcore"], strict=True):
        assert fast.pop("flop_counter") == "fast" and ref.pop("flop_counter") == "fvcore"
        for key in ("seconds", "host"):
            fast.pop(key), ref.pop(key)
        assert fast == ref  # params (meta-built model vs real), GFLOPs, per module and component, uncounted
