"""Parameters and GFLOPs with the paper's convention (docs/paper.md section 8).

The convention: fvcore, one multiply-add counted as one FLOP, attention matmuls (QK^T and AV) counted, on the
padded square input at batch 1. The counter knows nothing of any model: it applies fvcore's handles, plus
handlers for the operators fvcore cannot see, to the operators of ``model(images)``. A model may add its own
through a ``flop_handles()`` method (the baselines' deformable attention does). Two counters see those
operators (``count_flops(counter=...)``, ``study bench --counter``): ``fast`` (default) runs the forward on
FakeTensors, without arithmetic (study/bench/count_fake.py); ``fvcore`` traces a real forward with fvcore, the
reference. They give the same numbers, per module and per operator (tests/test_flop_counters.py).

Handlers added here (each counts multiply-adds):
- ``aten::scaled_dot_product_attention``: fvcore skips the fused attention silently (132 GFLOPs missing for
  EoMT-L at 640). Counted as QK^T (B*H*Lq*Lk*d) plus AV (B*H*Lq*Lk*dv); the mask, softmax and scale are
  element-wise and not counted, as fvcore does for every element-wise op. A masked block costs the same
  as an unmasked one: the dense matmuls run either way.

Operators that remain uncounted (element-wise ops, activations, indexing) are listed in the result, so a
count never hides what it could not see.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from study.errors import UserError

# fvcore itself ignores these (element-wise or data movement); anything else uncounted is reported.
_ELEMENTWISE = {
    "aten::add", "aten::add_", "aten::sub", "aten::mul", "aten::mul_", "aten::div", "aten::div_", "aten::gelu",
    "aten::silu", "aten::relu", "aten::relu_", "aten::sigmoid", "aten::softmax", "aten::neg", "aten::rsub",
    "aten::gt", "aten::lt", "aten::ge", "aten::le", "aten::eq", "aten::ne", "aten::__and__", "aten::__or__",
    "aten::bitwise_or", "aten::bitwise_not", "aten::exp", "aten::pow", "aten::sqrt", "aten::rsqrt",
    "aten::clamp", "aten::clamp_min", "aten::sum", "aten::mean", "aten::max", "aten::abs", "aten::log",
    "aten::cos", "aten::sin", "aten::tanh", "aten::masked_fill", "aten::masked_fill_", "aten::where",
    "aten::fill_", "aten::zeros", "aten::ones", "aten::zeros_like", "aten::ones_like", "aten::rand",
    "aten::full", "aten::arange", "aten::linspace", "aten::meshgrid", "aten::dropout", "aten::max_pool2d",
    "aten::flatten", "aten::cumsum", "aten::unflatten", "aten::any", "aten::all", "aten::prod",
}


def sdpa_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: QK^T plus AV multiply-adds."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    *batch, lq, d = q
    lk, dv = k[-2], v[-1]
    n = 1
    for b in batch:
        n *= b
    return n * lq * lk * d + n * lq * lk * dv


DEFAULT_HANDLES: dict[str, Callable] = {"aten::scaled_dot_product_attention": sdpa_flop_jit}


class _Flatten(nn.Module):
    """Wraps a contract model so that the traced output is a flat tuple of tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return tuple(t for s in self.model(images) for t in s)


@dataclass
class FlopCount:
    total: int  # multiply-adds (fvcore convention)
    by_module: dict[str, int] = field(default_factory=dict)
    # multiply-adds per entry of ``model.components()`` (the same split as the time breakdown), plus "other"
    by_component: dict[str, int] = field(default_factory=dict)
    by_operator: dict[str, int] = field(default_factory=dict)
    uncounted: dict[str, int] = field(default_factory=dict)  # operator -> occurrences fvcore could not count

    @property
    def gflops(self) -> float:
        return self.total / 1e9


def count_params(model: nn.Module) -> int:
    """All trainable parameters, the position embedding resized to the target grid included (section 8)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


COUNTERS = ("fast", "fvcore")  # the default first (study/bench/config.py: bench.counter)


def count_flops(model: nn.Module, img_size: int, extra_handles: dict | None = None,
                counter: str = "fast") -> FlopCount:
    """GFLOPs of one forward of ``model`` (eval mode) on a (1, 3, img_size, img_size) input.

    ``counter``: ``"fast"`` runs the forward on FakeTensors (study/bench/count_fake.py: no arithmetic, seconds
    at any size, the same numbers), ``"fvcore"`` traces a real forward with fvcore (the reference; minutes at
    ViT-g 1280). Both use the same handles; ``model`` may have meta parameters for ``"fast"`` only.
    """
    if counter not in COUNTERS:
        raise UserError(f"bench.counter '{counter}' is not one of {', '.join(COUNTERS)}")
    handles = handles_for(model, extra_handles)
    if counter == "fast":
        from study.bench.count_fake import count_fake

        counts, unsupported = count_fake(model, img_size, handles)
        every_module = {name: sum(c.values()) for name, c in counts.items()}
        total = every_module[""]
        by_op = dict(counts[""])
    else:
        every_module, total, by_op, unsupported = _fvcore_trace(model, img_size, handles)
    by_module = {k: v for k, v in every_module.items() if k and k.count(".") <= 1}
    by_component = _by_component(model, every_module, total)
    skipped = Counter({k: v for k, v in unsupported.items() if k not in _ELEMENTWISE})
    return FlopCount(total, by_module, by_component, by_op, dict(skipped))


def handles_for(model: nn.Module, extra: dict | None = None) -> dict:
    """The counters' operator handles for ``model``: ours (DEFAULT_HANDLES), the model's own
    (``flop_handles()``, e.g. the baselines' deformable attention) and ``extra``."""
    handles = dict(DEFAULT_HANDLES)
    own = getattr(model, "flop_handles", None)
    if callable(own):
        handles.update(own())
    handles.update(extra or {})
    return handles


def count_forward(model: nn.Module, images: torch.Tensor) -> int:
    """fvcore multiply-adds of one real forward of ``model`` on these ``images`` (1, 3, S, S): for a model
    whose work depends on the input (ALGM token merging, study/bench/merging.py)."""
    return _fvcore_trace(model, images.shape[-1], handles_for(model), images)[1]


def _fvcore_trace(model: nn.Module, img_size: int, handles: dict, images: torch.Tensor | None = None
                  ) -> tuple[dict[str, int], int, dict, Counter]:
    """fvcore on a real forward (of ``images``, else a random image): FLOPs per module (names relative to
    ``model``, "" = the model), the total, per operator, and the operators fvcore saw without a handle
    (neither counted nor ignored)."""
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if images is None:
        images = torch.rand(1, 3, img_size, img_size, device=device)
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(_Flatten(model), images).set_op_handle(**handles)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = analysis.total()
            traced = analysis.by_module()  # names under the _Flatten root: "model", "model.backbone", ...
            every_module = {"": traced["model"]}
            every_module.update({k.removeprefix("model."): v for k, v in traced.items() if k.startswith("model.")})
            by_op = dict(analysis.by_operator())
            unsupported = Counter(analysis.unsupported_ops())
    finally:
        model.train(was_training)
    return every_module, total, by_op, unsupported


def _by_component(model: nn.Module, every_module: dict[str, int], total: int) -> dict[str, int]:
    """Sum the per-module counts (names relative to ``model``) over each component of ``model.components()``
    (disjoint module lists); what runs outside every listed module is "other"."""
    components = getattr(model, "components", None)
    if not callable(components):
        return {}
    names = {id(m): name for name, m in model.named_modules()}
    out = {part: sum(every_module.get(names[id(m)], 0) for m in modules)
           for part, modules in components().items()}
    out["other"] = total - sum(out.values())
    return out
