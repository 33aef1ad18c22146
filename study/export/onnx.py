"""ONNX export of every segmenter of the suite, and ONNX Runtime as a benchmark runtime.

What is exported
----------------
The deployed forward: images in [0, 1], float32 (B, 3, H, W) at the model's ``img_size``, to the final
prediction set, ``mask_logits`` (B, Q, H/4, W/4) and ``class_logits`` (B, Q, C + 1) (study/models/contract.py;
the intermediate sets only supervise training). The batch axis is dynamic (``batch`` in the graph), H and W are
fixed (the ViT's position embeddings are built for one size, docs/paper.md section 5). The model is exported
in eval mode, as it infers: EoMT without masking (Table 1 row 5) or with it (row 4, ``model.masked_inference``),
and every baseline row with its masked-attention decoder; the deformable attention of rows 0-1 is exported
through its PyTorch form, ``F.grid_sample`` (ONNX ``GridSample``, opset >= 16; baselines/deform_attn.py).

Which exporter (torch 2.14)
---------------------------
Both of torch's exporters export every Table 1 variant, and ONNX Runtime reproduces PyTorch to about 1e-5 with
either (measured on tiny models of all six rows, batch 1 and 3 from a graph traced at batch 2). The default is
the TorchScript-based one (``torch.onnx.export(..., dynamo=False)``), because it is 5-15x faster to export: on
this machine, tiny ViT-Adapter + Mask2Former took 18 s against 246 s with ``dynamo=True`` (load average about 9;
most of the dynamo path's time is the translation to ONNX, not ``torch.export``), which would make the parity
test of every variant too slow for the default test run. torch deprecates it (a DeprecationWarning since 2.9,
silenced here because the choice is deliberate); ``exporter="dynamo"`` (``study export --exporter dynamo``)
uses the ``torch.export``-based exporter with a ``torch.export.Dim`` batch, and tests/test_export_onnx.py checks
it too, so the switch is one flag when the old one goes.

Not exportable, refused with a UserError: ALGM token merging (``model.token_merging``: token counts depend on
the image, study/models/algm.py), and masked inference with a masking probability strictly between 0 and 1
(queries are then dropped at random in the forward, contract.py ``drop_query_masks``).
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from torch import nn

from study.errors import UserError

INPUT_NAME = "images"
OUTPUT_NAMES = ("mask_logits", "class_logits")
BATCH_AXIS = "batch"
EXPORTERS = ("torchscript", "dynamo")
# Opset 18: GridSample (16+) and every op the six variants use; what torch 2.14's dynamo exporter emits too.
DEFAULT_OPSET = 18
# The example batch the graph is traced with: 2, not 1, so that no exporter can mistake the batch for a constant.
TRACE_BATCH = 2
# ONNX Runtime vs PyTorch, fp32 (the figure): both run the same fp32 arithmetic in other kernels
# (other summation orders, fused GELU / LayerNorm), so they differ by a few float32 ulps of the logits.
PARITY_ATOL = 1e-4

Exporter = Literal["torchscript", "dynamo"]


class FinalPrediction(nn.Module):
    """The deployed forward: images -> (mask logits, class logits) of the final prediction set."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        final = self.model(images)[-1]
        return final.mask_logits, final.class_logits


def check_exportable(model: nn.Module) -> None:
    """A UserError naming the config key when ``model``'s inference cannot be one static ONNX graph."""
    if getattr(model, "token_merging", None) is not None:
        raise UserError("model.token_merging is enabled: ALGM's token counts depend on the image, which a static "
                        "ONNX graph cannot follow; export with model.token_merging.enabled=false")
    probs = getattr(model, "attn_mask_probs", None)
    if getattr(model, "masked_inference", False) and getattr(model, "masked_attention", False) and probs is not None:
        between = [i for i, p in enumerate(probs.tolist()) if 0.0 < p < 1.0]
        if between:
            raise UserError(f"masked inference with masking probabilities strictly between 0 and 1 (layers {between}: "
                            f"{[round(probs[i].item(), 4) for i in between]}; a checkpoint saved during the "
                            "annealing) drops queries' masks at random in every forward, which an exported graph "
                            "would freeze; export a checkpoint from the end of training, or set "
                            "model.masked_inference=false")


def example_images(img_size: int, batch: int = TRACE_BATCH, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def export_onnx(model: nn.Module, path: str | Path, img_size: int, *, exporter: Exporter = "torchscript",
                opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` (put in eval mode; exported from the CPU, then put back on its device) to ``path`` with
    a dynamic batch axis.

    The file is written atomically (a temporary file beside it, renamed over it) and checked with
    ``onnx.checker``; its input's batch axis is checked to be symbolic.
    """
    if exporter not in EXPORTERS:
        raise UserError(f"unknown ONNX exporter '{exporter}' (--exporter); choose {' or '.join(EXPORTERS)}")
    if opset < 16:
        raise UserError(f"ONNX opset {opset} (--opset) has no GridSample (the deformable attention needs 16+); "
                        f"use {DEFAULT_OPSET}")
    onnx = _require("onnx")
    from study.io import atomic_write, refuse_foreign

    check_exportable(model)
    param = next(model.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    model = model.eval().cpu()
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give the file to write, e.g. {path / 'model.onnx'}")
    refuse_foreign(path)  # before the export's minutes: a file the suite did not write is never replaced
    wrapper = FinalPrediction(model).eval()
    images = example_images(img_size)

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            # torch's own warnings about tracing (Python ints from shapes, the deprecated exporter) are about
            # how the graph is built; its equality with PyTorch is checked (tests/test_export_onnx.py)
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                axes = {name: {0: BATCH_AXIS} for name in (INPUT_NAME, *OUTPUT_NAMES)}
                torch.onnx.export(wrapper, (images,), tmp, dynamo=False, input_names=[INPUT_NAME],
                                  output_names=list(OUTPUT_NAMES), dynamic_axes=axes, opset_version=opset)
            else:
                batch = torch.export.Dim(BATCH_AXIS, min=1, max=4096)
                program = torch.onnx.export(wrapper, (images,), dynamo=True, input_names=[INPUT_NAME],
                                            output_names=list(OUTPUT_NAMES), opset_version=opset,
                                            dynamic_shapes={"images": {0: batch}}, verbose=False)
                program.save(tmp, external_data=False)
        proto = onnx.load(tmp)
        onnx.checker.check_model(proto)
        dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
        if dim.HasField("dim_value"):  # a bug of the exporter call above, not the user's
            raise RuntimeError(f"the exported graph's batch axis is fixed at {dim.dim_value}, not dynamic")

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        atomic_write(path, write, lambda: size, guard=True)
    finally:
        model.to(home)
    return path


# ----------------------------------------------------------------------------------------------- ONNX Runtime


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{module} is not installed ({e}); pip install onnx onnxruntime "
                        "(both are in eomt-study[test])") from None


def providers_for(device: str | torch.device) -> list[str]:
    """ONNX Runtime's execution providers for a torch device (CUDA needs the onnxruntime-gpu build)."""
    ort = _require("onnxruntime")
    kind = torch.device(device).type
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise UserError(f"ONNX Runtime here has no execution provider for device '{device}' (available: "
                    f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for CUDA, or use "
                    "bench.device=cpu")


def ort_session(path: str | Path, threads: Optional[int] = None, device: str | torch.device = "cpu"):
    """An ONNX Runtime session on ``path``: ``threads`` intra-op threads (None = torch's current number), one
    inter-op thread (the graph is a chain), every graph optimisation on."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=providers_for(device))


def ort_forward(session) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """images (B, 3, H, W) -> (mask logits, class logits) as CPU tensors, through ``session``."""

    def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        masks, classes = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return torch.from_numpy(masks), torch.from_numpy(classes)

    return run


def max_abs_difference(model: nn.Module, run: Callable[[torch.Tensor], tuple], images: torch.Tensor) -> float:
    """The largest |PyTorch - other| over both outputs of the final prediction set, in fp32."""
    with torch.no_grad():
        ref = FinalPrediction(model.eval()).eval()(images)
    got = run(images)
    return max(float((r - g).abs().max()) for r, g in zip(ref, got))


def onnxruntime_runner(model: nn.Module, example: Any, protocol: Any) -> Callable[[Any], object]:
    """The ``onnxruntime`` runtime of the benchmark (study/bench/runtimes.py ``RunnerBuilder``).

    ``model`` is exported at the example's size (the default exporter), the file loaded into a session with
    the protocol's threads, and removed. ``run(images)`` is one ONNX Runtime call; a CPU tensor is handed over
    without a copy (``numpy()``), so the timed region holds the session's forward only (on CUDA it would also
    hold the copies to and from the host: no IO binding yet). ONNX Runtime runs the
    fp32 graph: a bf16 / fp16 protocol is refused rather than timed under another precision's name.
    """
    precision = getattr(protocol, "precision", "fp32")
    if precision not in ("fp32", "auto"):
        raise UserError(f"runtime onnxruntime runs the fp32 export, not precision '{precision}'; give that row "
                        "precision fp32 (bench.precision=fp32, or a bench.modes entry 'onnxruntime+fp32')")
    device = getattr(protocol, "device", "cpu")
    img_size = int(example.shape[-1])
    if example.shape[-2] != img_size:
        raise UserError(f"ONNX export needs square inputs, got {tuple(example.shape[-2:])}")
    with tempfile.TemporaryDirectory(prefix="study-onnx-") as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", img_size)
        session = ort_session(path, getattr(protocol, "threads", None), device)
    return ort_forward(session)
