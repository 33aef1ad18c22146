"""The runtimes a speed row is timed through (docs/speed.md): a runtime's builder turns (model, example
inputs, protocol) into ``run(inputs)``, one timed iteration. ``pytorch`` (eager, or compiled by
``torch.compile`` in a stated mode, optionally with inductor's freezing, under the protocol's autocast) and
``onnxruntime`` (study/export/onnx.py) are built in; another runtime registers its builder with
:func:`register_runtime` and is then timed in the same rounds as the PyTorch rows. :func:`apply_mode` reads
one ``bench.modes`` entry (eager, compile, freeze, a precision or a runtime name)."""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from study.bench.protocol import SpeedProtocol
from study.device import autocast
from study.errors import UserError

# build(model, example_inputs, protocol) -> run(inputs); model on the protocol's device, in eval mode
RunnerBuilder = Callable[[nn.Module, Any, SpeedProtocol], Callable[[Any], object]]


def pytorch_runner(model: nn.Module, example: Any, protocol: SpeedProtocol) -> Callable[[Any], object]:
    """The PyTorch runtime: the model, compiled if the protocol says so, under the protocol's autocast."""
    device = torch.device(protocol.device)
    net = compiled(model, protocol.compile_mode, protocol.freezing) if protocol.compile else model

    def run(inputs):
        with autocast(device, protocol.precision):
            return net(inputs)

    return run


def compiled(model: nn.Module, mode: str = "default", freezing: bool = False) -> Callable[..., Any]:
    """``torch.compile(model)`` in ``mode``; with ``freezing``, inductor's freezing: the parameters become
    constants of the graph, so that autocast's weight casts and the weights' layouts are done once, at compile
    time (on the CPU the linear layers' weights are pre-packed for oneDNN); no-grad inference only, which is
    what the benchmark times.

    Freezing needs inductor's ``freezing`` config while dynamo traces (at the first call), so the returned
    callable sets it around every call; and it compiles through its own backend (:func:`_frozen_inductor`):
    dynamo reuses a compiled graph of the same code whose guards pass, and a graph of the same model compiled
    without freezing (another row in the same process) passes them, so with the config alone a frozen row
    silently ran the unfrozen graph (tests/test_compile_parity.py). A different backend gets its own graphs."""
    if not freezing:
        return torch.compile(model, mode=mode)
    import torch._inductor.config as inductor_config

    net = torch.compile(model, backend=functools.partial(_frozen_inductor, mode=mode))

    def run(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return net(*args, **kwargs)
    return run


def _frozen_inductor(gm, example_inputs, mode: str = "default"):
    """Inductor with ``mode``'s options and freezing (the backend of :func:`compiled` with freezing)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches={**list_mode_options(mode), "freezing": True})


def _onnxruntime_runner(model, example, protocol):
    """ONNX Runtime (study/export/onnx.py): the model exported at the example's size, one session call a
    forward; imported on first use so that onnx and onnxruntime stay optional for everything else."""
    from study.export.onnx import onnxruntime_runner

    return onnxruntime_runner(model, example, protocol)


RUNTIMES: dict[str, RunnerBuilder] = {"pytorch": pytorch_runner, "onnxruntime": _onnxruntime_runner}


def register_runtime(name: str, build: RunnerBuilder) -> None:
    """Make ``bench.runtime=<name>`` (and a ``bench.modes`` entry naming it) time rows through ``build``."""
    RUNTIMES[name] = build


def runtime_builder(name: str) -> RunnerBuilder:
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime '{name}' (bench.runtime or bench.modes); available: "
                        f"{', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def apply_mode(mode: str, protocol: SpeedProtocol) -> SpeedProtocol:
    """``protocol`` changed by one ``bench.modes`` entry: '+'-joined words among eager, compile, fp32, bf16,
    fp16, auto and a runtime name (e.g. ``compile+bf16``, ``onnxruntime``); unnamed settings stay."""
    p = protocol
    for word in (w.strip() for w in mode.split("+")):
        if word == "eager":
            p = replace(p, compile=False, freezing=False)
        elif word == "compile":
            p = replace(p, compile=True)
        elif word == "freeze":
            p = replace(p, compile=True, freezing=True)
        elif word in ("fp32", "bf16", "fp16", "auto"):
            p = replace(p, precision=word)
        elif word in RUNTIMES:
            # ONNX Runtime runs the fp32 export: a mode naming it alone is an fp32 row (a later word may
            # still ask for another precision, which the runner then refuses by name)
            p = replace(p, runtime=word, precision="fp32" if word == "onnxruntime" else p.precision)
        else:
            raise UserError(f"bench.modes entry '{mode}': unknown word '{word}'; use eager, compile, freeze, fp32, "
                            f"bf16, fp16, auto or a runtime ({', '.join(RUNTIMES)}), joined by '+'")
    if p.compile and p.runtime != "pytorch":
        raise UserError(f"bench.modes entry '{mode}': compile applies to the pytorch runtime only")
    if not p.compile:  # freezing (bench.freezing or a 'freeze' word) belongs to the compiled rows only
        p = replace(p, freezing=False)
    return p
