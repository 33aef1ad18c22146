"""ONNX export (study/export/onnx.py, `study export`): ONNX Runtime, the oracle, equals PyTorch within 1e-4 for
tiny models of every Table 1 variant at batches other than the traced one; the CLI with a checkpoint; refusals."""
from __future__ import annotations

import pytest
import torch

from conftest import require
from study.cli import main
from study.config import load_config
from study.errors import UserError
from study.models.build import build_model, table1_rows

IMG, CLASSES, QUERIES = 64, 5, 7
ROWS = [v.name for v in table1_rows()]  # rows 0-5: the four baselines, EoMT with and without masked inference


def tiny(variant: str, **over) -> torch.nn.Module:
    sets = [f"model.{k}={v}" for k, v in dict(variant=variant, size="tiny", img_size=IMG, num_classes=CLASSES,
                                                  num_queries=QUERIES, **over).items()]
    return build_model(load_config(None, sets).model).eval()


def _shuffle_weights(model: torch.nn.Module) -> None:
    """Random values in every parameter (scaled by fan-in): several are initialised to zeros (deformable
    attention weights, biases) or tiny (layer scale), which would hide a wrongly exported branch."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise * p.shape[1:].numel() ** -0.5)
            elif name.endswith("weight") or name.endswith("gamma"):  # norms and layer scale around 1
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def _parity(model, path, exporter: str) -> list[float]:
    from study.export import onnx as ox

    ox.export_onnx(model, path, IMG, exporter=exporter)
    run = ox.ort_forward(ox.ort_session(path, threads=1))
    diffs = []
    for batch in (1, 3):  # traced at 2: both prove the batch axis is dynamic
        images = ox.example_images(IMG, batch, seed=batch)
        masks, classes = run(images)
        assert masks.shape == (batch, QUERIES, IMG // 4, IMG // 4)
        assert classes.shape == (batch, QUERIES, CLASSES + 1)
        diffs.append(ox.max_abs_difference(model, run, images))
    return diffs


@pytest.mark.parametrize("variant", ROWS)
def test_onnxruntime_equals_pytorch_every_variant(variant, tmp_path, one_thread):
    require("onnxruntime")
    from study.export.onnx import PARITY_ATOL

    model = tiny(variant)
    _shuffle_weights(model)
    diffs = _parity(model, tmp_path / f"{variant}.onnx", "torchscript")
    assert max(diffs) <= PARITY_ATOL, diffs


def test_eomt_masked_inference_export_holds_the_masks(tmp_path, one_thread):
    """Masked inference is in the graph: the exported row 4 is not the exported row 5 with the same weights."""
    require("onnxruntime")
    from study.export import onnx as ox

    masked = tiny("eomt_masked")
    _shuffle_weights(masked)
    plain = tiny("eomt")
    plain.load_state_dict(masked.state_dict())
    images = ox.example_images(IMG, 2, seed=5)
    outs = []
    for name, model in (("masked", masked), ("plain", plain)):
        ox.export_onnx(model, tmp_path / f"{name}.onnx", IMG)
        outs.append(ox.ort_forward(ox.ort_session(tmp_path / f"{name}.onnx", threads=1))(images)[0])
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_dynamo_exporter_equals_pytorch(tmp_path, one_thread):
    require("onnxscript")
    require("onnxruntime")
    from study.export.onnx import PARITY_ATOL

    model = tiny("eomt")
    _shuffle_weights(model)
    assert max(_parity(model, tmp_path / "m.onnx", "dynamo")) <= PARITY_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("variant", [r for r in ROWS if r != "eomt"])
def test_dynamo_exporter_equals_pytorch_baselines(variant, tmp_path, one_thread):
    """Minutes per model on 2 cores: most of the dynamo exporter's time is the translation to ONNX."""
    require("onnxscript")
    require("onnxruntime")
    from study.export.onnx import PARITY_ATOL

    model = tiny(variant)
    _shuffle_weights(model)
    assert max(_parity(model, tmp_path / "m.onnx", "dynamo")) <= PARITY_ATOL


def test_cli_exports_the_checkpoint(tmp_path, capsys, one_thread):
    require("onnxruntime")
    from study.export import onnx as ox

    trained = tiny("eomt")
    _shuffle_weights(trained)
    ckpt = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), ckpt)
    config = tmp_path / "tiny.yaml"
    config.write_text(f"model:\n  size: tiny\n  img_size: {IMG}\n  num_classes: {CLASSES}\n  num_queries: {QUERIES}\n")
    out = tmp_path / "out" / "eomt.onnx"
    assert main(["export", str(config), "--checkpoint", str(ckpt), "--format", "onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dynamic batch" in printed and "ONNX Runtime vs PyTorch at batch 3" in printed
    images = ox.example_images(IMG, 2, seed=7)
    run = ox.ort_forward(ox.ort_session(out, threads=1))
    assert ox.max_abs_difference(trained, run, images) <= ox.PARITY_ATOL  # the checkpoint's weights, not random
    assert ox.max_abs_difference(tiny("eomt"), run, images) > 1e-2
    assert not list(out.parent.glob("*.tmp"))


def test_cli_flags_set_model_keys(tmp_path, capsys, one_thread):
    require("onnx")
    import onnx

    config = tmp_path / "tiny.yaml"
    config.write_text(f"model:\n  size: tiny\n  num_classes: {CLASSES}\n  num_queries: {QUERIES}\n")
    out = tmp_path / "sfp.onnx"
    assert main(["export", str(config), "--variant", "eomt_masked", "--img-size", "32", str(out), "--no-verify", "--random-weights"]) == 0
    assert "eomt_masked (tiny, 32px" in capsys.readouterr().out
    graph = onnx.load(out).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 32, 32]
    assert [o.name for o in graph.output] == ["mask_logits", "class_logits"]


def test_cli_bad_checkpoint_is_one_line(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  size: tiny\n  img_size: 32\n")
    code = main(["export", str(config), "--checkpoint", str(tmp_path / "missing.pt"), str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "missing.pt" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_refuses_what_one_static_graph_cannot_hold(tmp_path):
    from study.export.onnx import export_onnx
    from study.models.config import TokenMerging

    merging = tiny("eomt")
    merging.set_token_merging(TokenMerging(0, 1, 0.9, None, 2))
    with pytest.raises(UserError, match="model.token_merging"):
        export_onnx(merging, tmp_path / "a.onnx", IMG)
    annealing = tiny("eomt_masked")
    annealing.set_mask_probs([0.5, 1.0])
    with pytest.raises(UserError, match="masked_inference"):
        export_onnx(annealing, tmp_path / "b.onnx", IMG)
    annealing.set_mask_probs([0.0, 1.0])  # 0 and 1 are deterministic: exportable
    with pytest.raises(UserError, match="opset"):
        export_onnx(annealing, tmp_path / "c.onnx", IMG, opset=13)
    assert not list(tmp_path.iterdir())


def test_onnxruntime_runner_for_the_benchmark(one_thread):
    require("onnxruntime")
    from types import SimpleNamespace

    from study.export.onnx import PARITY_ATOL, max_abs_difference, onnxruntime_runner

    model = tiny("sfp_no_pixel_decoder")
    images = torch.rand(2, 3, IMG, IMG)
    run = onnxruntime_runner(model, images, SimpleNamespace(precision="fp32", device="cpu", threads=1))
    assert max_abs_difference(model, run, images) <= PARITY_ATOL
    with pytest.raises(UserError, match="fp32"):
        onnxruntime_runner(model, images, SimpleNamespace(precision="bf16", device="cpu", threads=1))
