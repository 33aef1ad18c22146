"""The forward passes of EoMT (masked and unmasked) and of row 0 read nothing back from the device.

A host sync in the forward (``.item()``, ``bool(t)``, ``if t < 1``, ``.tolist()``, boolean indexing, a tensor
built from Python values) stalls the GPU pipeline once per call and skews the FPS comparison between the
masked and unmasked models (issue 17 item 5). ``torch.cuda.set_sync_debug_mode`` only exists on CUDA; here a
stand-in sees every such request on the CPU: a ``TorchDispatchMode`` catches the ops that produce a Python
value or an output whose size depends on the data, plus tensors made from Python data (``lift_fresh``, a
host-to-device copy on the GPU), and ``Tensor.tolist`` (which bypasses the dispatcher) is wrapped.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from study.models.build import build_model
from study.models.config import ModelConfig

# ops whose result the host must wait for: a Python scalar, or an output sized by the data
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "equal", "is_nonzero",
            "repeat_interleave", "lift_fresh")


class HostSyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        base = func.overloadpacket.__name__  # aten.nonzero.default -> nonzero
        if base in SYNC_OPS:
            self.syncs.append(str(func))
        elif base in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in _flat(args)):
            self.syncs.append(f"{func} with a boolean index")
        return func(*args, **kwargs)


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


def count_syncs(fn, monkeypatch) -> list[str]:
    seen: list[str] = []
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        seen.append("Tensor.tolist")
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    try:
        with HostSyncCounter() as counter:
            fn()
    finally:
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return seen + counter.syncs


def test_the_counter_sees_each_kind_of_sync(monkeypatch):
    t = torch.rand(4)
    for fn in (lambda: t[0].item(), lambda: bool(t[0] > 0), lambda: 1 if t[0] < 1 else 0, lambda: t.tolist(),
               lambda: float(t[0]), lambda: t[t > 0.5], lambda: torch.tensor([1.0, 2.0])):
        assert len(count_syncs(fn, monkeypatch)) >= 1
    assert count_syncs(lambda: (t * 2).sum(), monkeypatch) == []


SMALL_BASELINE = dict(hidden_dim=32, encoder_layers=2, encoder_heads=4, encoder_ffn=48, decoder_heads=4,
                      decoder_ffn=48, conv_inplane=32)


def _model(variant: str, **kw):
    baseline = dict(SMALL_BASELINE) if variant not in ("eomt", "eomt_masked") else {}
    return build_model(ModelConfig(variant=variant, size="tiny", img_size=64, num_classes=3, num_queries=5,
                                   baseline=baseline, **kw))


@pytest.mark.parametrize("variant,mode,probs", [
    ("eomt", "eval", None),  # row 5: masking off at inference
    ("eomt_masked", "eval", None),  # row 4: masked attention at inference
    ("eomt", "train", 0.5),  # training while annealing: random query masks opened
    ("eomt", "train", 1.0),
    ("vit_adapter_m2f", "eval", None),  # row 0: deformable attention, masked decoder
    ("vit_adapter_m2f", "train", 0.5),
])
def test_forward_has_no_host_sync(variant, mode, probs, monkeypatch):
    model = _model(variant)
    model.train(mode == "train")
    if probs is not None:
        model.set_mask_probs([probs] * model.num_masked_layers)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        model(images)  # the first call may build per-shape constants (cached from then on)
        syncs = count_syncs(lambda: model(images), monkeypatch)
    assert syncs == [], syncs


def test_host_flags_follow_a_loaded_state_dict():
    """Resume loads the buffer; the forward's branches must follow it (P_mask = 0: no masking at inference)."""
    model = _model("eomt_masked").eval()
    state = model.state_dict()
    state["attn_mask_probs"] = torch.zeros(model.num_masked_layers)
    with torch.no_grad():
        assert len(model(torch.rand(1, 3, 64, 64))) == model.num_masked_layers + 1
        model.load_state_dict(state)
        assert len(model(torch.rand(1, 3, 64, 64))) == 1


@pytest.mark.slow
def test_masked_eomt_compiles_without_graph_breaks():
    """torch._dynamo.explain on tiny masked EoMT (training with annealing and masked inference)."""
    import torch._dynamo as dynamo

    for mode, probs in (("train", 0.5), ("eval", 1.0)):
        model = _model("eomt_masked")
        model.train(mode == "train")
        model.set_mask_probs([probs] * model.num_masked_layers)
        dynamo.reset()
        explanation = dynamo.explain(model)(torch.rand(1, 3, 64, 64))
        assert explanation.graph_break_count == 0, explanation.break_reasons
