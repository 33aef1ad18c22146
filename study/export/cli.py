"""``study export CONFIG [--checkpoint PATH] --format onnx OUT.onnx``: the model a config describes, as ONNX.

The flags that choose the model set ``model.*`` config keys (study/flags.py), like ``--set``; ``--format``,
``--exporter``, ``--opset`` and ``--no-verify`` are the export's own. After writing the file the command runs
it in ONNX Runtime on a batch of 3 (the graph is traced at batch 2: this also checks the dynamic batch) and
prints the largest difference from PyTorch; above the tolerance (study/export/onnx.py ``PARITY_ATOL``) it fails.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from study.errors import UserError
from study.flags import add_set_flag, config_flag

FORMATS = ("onnx",)
VERIFY_BATCH = 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (dynamic batch), checked in ONNX Runtime",
                       description="Export the model of a config (EoMT, with or without masking at inference, or "
                                   "any baseline row) for deployment: the final prediction set (mask_logits, "
                                   "class_logits) of images in [0, 1] at model.img_size, with a dynamic batch axis.")
    p.add_argument("config", help="YAML config (its model section)")
    p.add_argument("output", metavar="OUT.onnx", help="the file to write (atomically)")
    add_set_flag(p, "model.num_classes=150")
    config_flag(p, "--checkpoint", "model.checkpoint", type=str, metavar="PATH",
                help="trained weights (a run's checkpoint or a state dict)")
    config_flag(p, "--variant", "model.variant", type=str, help="model variant (study bench --list)")
    config_flag(p, "--size", "model.size", type=str, help="S, B, L, g or tiny")
    config_flag(p, "--img-size", "model.img_size", type=int, help="square input size the graph is built for")
    config_flag(p, "--masked-inference", "model.masked_inference", const=True,
                help="keep masked attention at inference (Table 1 row 4)")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="output format (onnx)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch's exporter: torchscript (default, fast) or dynamo (torch.export); see "
                        "study/export/onnx.py for why")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; 16 at least)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check after export")
    p.add_argument("--random-weights", action="store_true",
                   help="export without trained weights (random heads; for testing a deployment path only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from study.config import load_config
    from study.export import onnx as ox
    from study.models.build import build_model

    cfg = load_config(args.config, args.overrides)
    m = cfg.model
    if not (m.checkpoint or args.random_weights):
        raise UserError(f"no trained weights: give --checkpoint PATH (a run's checkpoints/model_final.pt) or "
                        f"model.checkpoint in {args.config}; --random-weights exports an untrained model on purpose")
    model = build_model(m).eval()
    t0 = time.perf_counter()
    out = ox.export_onnx(model, Path(args.output), m.img_size, exporter=args.exporter,
                         opset=args.opset or ox.DEFAULT_OPSET)
    size_mb = out.stat().st_size / 2**20
    print(f"study export: {m.variant} ({m.size}, {m.img_size}px, {m.num_queries} queries, {m.num_classes} classes"
          f"{', masked inference' if model.masked_inference else ''}) -> {out} ({size_mb:.1f} MiB, {args.exporter} "
          f"exporter, opset {args.opset or ox.DEFAULT_OPSET}, dynamic batch) in {time.perf_counter() - t0:.1f} s")
    if args.no_verify:
        return 0
    images = ox.example_images(m.img_size, VERIFY_BATCH, seed=1)
    diff = ox.max_abs_difference(model, ox.ort_forward(ox.ort_session(out, torch.get_num_threads())), images)
    print(f"ONNX Runtime vs PyTorch at batch {VERIFY_BATCH}: max |difference| {diff:.2e} "
          f"(tolerance {ox.PARITY_ATOL:g})")
    if not diff <= ox.PARITY_ATOL:  # an exporter or runtime bug, not the user's: keep the traceback
        raise RuntimeError(f"{out}: ONNX Runtime differs from PyTorch by {diff:.3g} > {ox.PARITY_ATOL:g}")
    return 0
