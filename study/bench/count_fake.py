"""The fast FLOP counter: fvcore's count without fvcore's forward (docs/paper.md section 8's convention).

fvcore traces a real forward with ``torch.jit`` and applies one handle per traced ATen operator; at ViT-g 1280
the arithmetic of that forward takes minutes and gigabytes. This counter runs the forward on FakeTensors (shapes,
dtypes and devices, no storage, no arithmetic) and sees the same operators at the same level as the tracer:

- a ``TorchFunctionMode`` sees every call into torch from Python. A call into a C function (``F.linear``,
  ``torch.conv2d``, ``Tensor.softmax``, ...) is one ATen operator, the one the tracer records (convolutions are
  recorded as ``aten::_convolution``), and nothing inside it is seen, as in the tracer. A call into a torch
  function written in Python (``F.layer_norm``, ``F.interpolate``, ``torch.einsum``, ``Tensor.unflatten``, ...)
  is entered, as the tracer enters it, so the C calls inside it are the operators seen (``aten::layer_norm``,
  ``aten::upsample_bilinear2d``, ``aten::einsum``, ...);
- each operator is counted by fvcore's own handle for it (fvcore's defaults, our SDPA handle and the model's
  ``flop_handles()``), called with stand-ins for the tracer's graph values that carry the FakeTensors' shapes, so
  every formula is fvcore's;
- module scopes come from global forward hooks, as fvcore's own per-module hooks (an operator belongs to the
  innermost module whose ``__call__`` runs it, and to that module's ancestors by name).

The model is never run for real: its parameters and buffers are replaced by FakeTensors on a structural copy
(:func:`fake_twin`), or the model is built with meta parameters in the first place (:func:`build_meta_model`).
What cannot run on FakeTensors (a value read on the host in the forward) raises; the models of this suite read
none (tests/test_host_syncs.py). FakeTensors rather than plain meta tensors because they keep the device: the
deformable attention opens ``torch.autocast(value.device.type)``, which has no "meta" form. Tensors the forward
builds from Python values (``torch.linspace``, ``torch.tensor``) stay real; they are small.

Where the two counters differ, fvcore is blind and says so (tests/test_flop_counters.py), and neither case occurs
in the suite's models: an ``autograd.Function`` is one opaque ``prim::PythonOp`` to fvcore and transparent here;
``nn.MultiheadAttention`` in eval takes its fused path under fvcore (uncounted ``aten::_native_multi_head_attention``)
but not while a TorchFunctionMode is active, so here its projections and attention are counted.
"""
from __future__ import annotations

import copy
import types
from collections import Counter
from typing import Any, Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode


class _Value:
    """Stands for a ``torch._C.Value`` of the traced graph in an fvcore handle: ``isCompleteTensor``,
    ``type().sizes()`` (the shape), ``toIValue()`` (a constant argument) and, for a tensor list (einsum's
    operands), ``node().inputs()``."""

    __slots__ = ("v",)

    def __init__(self, v: Any):
        self.v = v

    def isCompleteTensor(self) -> bool:  # noqa: N802 - the torch._C.Value API
        return isinstance(self.v, torch.Tensor)

    def type(self) -> "_Value":
        return self

    def sizes(self) -> list[int]:
        return list(self.v.shape)

    def toIValue(self) -> Any:  # noqa: N802
        return self.v

    def node(self) -> "_Value":
        return self

    def inputs(self) -> list["_Value"]:
        return [_Value(t) for t in self.v]


_CONV = {"conv1d": False, "conv2d": False, "conv3d": False,  # name -> transposed
         "conv_transpose1d": True, "conv_transpose2d": True, "conv_transpose3d": True}
# Python operator methods -> the ATen operator the tracer records. Only names matter here: none is ever counted
# (``__matmul__`` is Tensor.matmul, ``__rmatmul__`` Python code that calls torch.matmul).
_BINARY = {"add", "sub", "mul", "truediv", "div", "pow", "mod", "and", "or", "xor", "lshift", "rshift"}
_RENAMED = {"invert": "bitwise_not", "truediv": "div", "mod": "remainder", "and": "__and__", "or": "__or__",
            "xor": "__xor__", "lshift": "__lshift__", "rshift": "__rshift__"}
_NOT_OPS = {"__getitem__", "__setitem__", "tensor", "as_tensor", "__get__", "__set__"}  # indexing, constants


def _aten_name(func: Callable) -> str | None:
    """The operator the tracer records for a C-level torch call (None: indexing or a constant)."""
    if isinstance(func, torch._ops.OpOverload):
        return func._schema.name  # "namespace::op", e.g. a compiled kernel's
    if isinstance(func, torch._ops.OpOverloadPacket):
        return func._qualified_op_name
    name = getattr(func, "__name__", None)
    if not name or name in _NOT_OPS:
        return None
    if name in _CONV:
        return "aten::_convolution"
    if name.startswith("__") and name.endswith("__"):
        core, suffix = name[2:-2], ""
        if core[:1] in ("r", "i") and core[1:] in _BINARY:  # reflected (x.__radd__) or in place (x.__iadd__)
            core, suffix = core[1:], ("_" if core[0] == "i" else "")
        return f"aten::{_RENAMED.get(core, core)}{suffix}"
    return f"aten::{name}"


def _jit_inputs(func: Callable, name: str, args: tuple, kwargs: dict) -> list[_Value]:
    """The traced node's inputs, in the order of the ATen schema that fvcore's handles index into: a C-level
    call's positional arguments are in that order already (torch's Python wrappers pass them positionally);
    keyword arguments follow. A convolution is rebuilt as ``aten::_convolution``'s 13 inputs."""
    if name == "aten::_convolution":
        # aten::_convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups,
        # benchmark, deterministic, cudnn_enabled, allow_tf32)
        fname = func.__name__
        names = (["input", "weight", "bias", "stride", "padding", "dilation", "groups"] if not _CONV[fname] else
                 ["input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"])
        bound = dict(zip(names, args)) | kwargs
        order = ["input", "weight", "bias", "stride", "padding", "dilation", None, "output_padding", "groups"]
        values = [bound.get(k) for k in order]
        values[6] = _CONV[fname]
        return [_Value(v) for v in values + [False, False, True, True]]
    return [_Value(a) for a in (*args, *kwargs.values())]


class FvcoreCountMode(TorchFunctionMode):
    """Counts fvcore-convention FLOPs of the torch calls made while active (see the module docstring).

    ``handles``: ATen name (``"aten::linear"``) -> fvcore handle. ``names``: id(module) -> its canonical name.
    After the forward, ``counts[name]`` holds the Counter per operator of every module (ancestors included, as
    fvcore's ``by_module_and_operator``) and ``unsupported`` the operators seen without a handle (fvcore's
    ``unsupported_ops`` of the root: neither counted nor ignored).
    """

    def __init__(self, handles: dict[str, Callable], names: dict[int, str], ignored: set[str]):
        super().__init__()
        self.handles, self.names, self.ignored = handles, names, ignored
        self.counts: dict[str, Counter] = {name: Counter() for name in names.values()}
        self.unsupported: Counter = Counter()
        self._scopes: list[str] = [""]
        self._entering: Any = None

    # ------------------------------------------------------------------ module scopes (fvcore's scope hooks)
    def push(self, module: nn.Module, _inputs: Any) -> None:
        self._scopes.append(self.names.get(id(module), self._scopes[-1]))

    def pop(self, _module: nn.Module, _inputs: Any, _outputs: Any) -> None:
        self._scopes.pop()

    def _ancestors(self) -> set[str]:
        parts = self._scopes[-1].split(".") if self._scopes[-1] else []
        return {".".join(parts[:k]) for k in range(len(parts) + 1)}

    # ------------------------------------------------------------------ operators
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        entering, self._entering = self._entering, None
        if isinstance(func, types.FunctionType):
            if entering is func:  # the Python function re-dispatched to us: it checks for modes another way
                return func(*args, **kwargs)
            return self._enter(func, args, kwargs)
        out = func(*args, **kwargs)
        name = _aten_name(func)
        if name is None:
            return out
        handle = self.handles.get(name)
        if handle is None:
            if name not in self.ignored and _has_tensor(out):
                self.unsupported[name] += 1
            return out
        outputs = [_Value(o) for o in (out if isinstance(out, (tuple, list)) else (out,))]
        op_counts = handle(_jit_inputs(func, name, args, kwargs), outputs)
        if not isinstance(op_counts, Counter):
            op_counts = Counter({name.partition("::")[2]: op_counts})
        for scope in self._ancestors():
            self.counts[scope] += op_counts  # Counter addition, as fvcore (drops zero entries)
        return out

    def _enter(self, func: types.FunctionType, args: tuple, kwargs: dict):
        """Run a torch function written in Python with this mode active inside it, as the tracer sees its C
        calls: a copy of it whose torch-function checks answer False (the mode is re-entered instead)."""
        copy_ = _ENTERABLE.get(func)
        if copy_ is None:
            glob = dict(func.__globals__)  # torch's own module globals, taken once
            for k in ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic"):
                if k in glob:
                    glob[k] = _false
            copy_ = types.FunctionType(func.__code__, glob, func.__name__, func.__defaults__, func.__closure__)
            copy_.__kwdefaults__ = func.__kwdefaults__
            _ENTERABLE[func] = copy_
        self._entering = func
        with self:
            return copy_(*args, **kwargs)


_ENTERABLE: dict[Callable, Callable] = {}  # torch function written in Python -> its enterable copy


def _false(*_args, **_kwargs) -> bool:
    return False


def _has_tensor(out: Any) -> bool:
    return isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and any(
        isinstance(o, torch.Tensor) for o in out))


# ---------------------------------------------------------------------------------------------- fake models


def build_meta_model(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with every parameter on the meta device as it is registered (no storage, no initialisation
    arithmetic; buffers stay where the builder puts them, they are small). The parameter count is the real one."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    def to_meta(_module, _name, p):
        if p is None or p.is_meta:
            return None
        return nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    handle = register_module_parameter_registration_hook(to_meta)
    try:
        return build()
    finally:
        handle.remove()


def fake_twin(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are FakeTensors of the same shapes, dtypes,
    strides and devices (meta becomes CPU); shared tensors stay shared. ``model`` is not changed."""
    memo: dict[int, Any] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        device = "cpu" if t.is_meta else t.device
        with mode:
            f = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
        return nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else f

    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in memo:
            memo[id(t)] = fake(t)
    return copy.deepcopy(model, memo)


def canonical_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> the first name it has in ``model`` (fvcore's canonical name; the model itself is "")."""
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    return names


def count_fake(model: nn.Module, img_size: int, handles: dict[str, Callable]) -> tuple[dict, Counter]:
    """Per-module Counters of fvcore FLOPs (``""`` = the model) and the unsupported operators, for one eval
    forward of ``model`` on a (1, 3, img_size, img_size) input, run on FakeTensors."""
    from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS
    from fvcore.nn.jit_analysis import _IGNORED_OPS
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    mode = FakeTensorMode(allow_non_fake_inputs=True)  # constants the forward builds stay real
    twin = fake_twin(model, mode).eval()
    device = next(iter(p.device for p in twin.parameters()), torch.device("cpu"))
    with mode:
        images = torch.empty(1, 3, img_size, img_size, device=device)
    counter = FvcoreCountMode({**_DEFAULT_SUPPORTED_OPS, **handles}, canonical_names(twin), set(_IGNORED_OPS))
    pre = register_module_forward_pre_hook(counter.push)
    post = register_module_forward_hook(counter.pop)
    try:
        with torch.no_grad(), counter:
            twin(images)
    finally:
        pre.remove()
        post.remove()
    return counter.counts, counter.unsupported
