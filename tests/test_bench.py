"""study bench: parameter and GFLOPs counts against the paper, the SDPA handler, the JSON rows, errors."""
from __future__ import annotations

import json

import pytest
import torch

from study.bench.count_fake import build_meta_model
from study.bench.flops import count_flops, count_params
from study.cli import main
from study.config import load_config
from study.models.build import build_model
from study.paper_numbers import paper_numbers


def eomt(size: str, img: int, variant: str = "eomt"):
    return build_model(load_config(None, [f"model.size={size}", f"model.img_size={img}",
                                          f"model.variant={variant}"]).model)


# docs/paper.md section 8: the recount with the paper's conventions (params in M, GFLOPs)
RECOUNT = {("eomt", "S", 640): (23.98, 67.9), ("eomt_masked", "S", 640): (23.98, 88.5),
           ("eomt", "B", 640): (93.66, 215.7), ("eomt_masked", "B", 640): (93.66, 285.8),
           ("eomt", "L", 640): (316.70, 668.3), ("eomt_masked", "L", 640): (316.70, 827.1),
           ("eomt", "g", 640): (1163.62, 2261.0), ("eomt_masked", "g", 640): (1163.62, 2687.0),
           ("eomt", "L", 1280): (321.61, 4145.5), ("eomt", "g", 1280): (None, 12710.6)}


def check_against_paper(variant, size, img):
    model = build_meta_model(lambda: eomt(size, img, variant))  # counted without weights (the fast counter)
    params, gflops = count_params(model) / 1e6, count_flops(model, img).gflops
    paper = paper_numbers(variant, size, img)
    paper_params, paper_gflops = paper["params_M"], paper["GFLOPs"]
    assert params == pytest.approx(paper_params, rel=0.01)  # within 1% of the published column
    assert gflops == pytest.approx(paper_gflops, rel=0.01)
    recount_params, recount_gflops = RECOUNT[(variant, size, img)]
    if recount_params is not None:
        assert params == pytest.approx(recount_params, abs=0.01)
    # docs/paper.md section 8's recount: unmasked rows agree to 0.2 GFLOPs; our masked rows read 0.3 (S) to 2.0 (g)
    # above it (the recount is itself "within 2 GFLOPs" of the paper)
    assert gflops == pytest.approx(recount_gflops, abs=2.5)


@pytest.mark.parametrize("variant", ["eomt", "eomt_masked"])
def test_eomt_small_matches_paper(variant):
    check_against_paper(variant, "S", 640)


@pytest.mark.slow
@pytest.mark.parametrize("variant, size, img", [k for k in RECOUNT if k[1] != "S"])
def test_eomt_full_table_matches_paper(variant, size, img):
    check_against_paper(variant, size, img)


def test_sdpa_is_counted():
    """fvcore skips fused attention silently; our handler adds QK^T and AV for every block."""
    model = eomt("tiny", 64)
    flops = count_flops(model, 64)
    vit = model.backbone
    patches, prefix, dim = (64 // 16) ** 2, vit.num_prefix_tokens, vit.embed_dim
    l2, depth = model.num_query_blocks, vit.depth
    tokens = [prefix + patches] * (depth - l2) + [model.num_queries + prefix + patches] * l2
    expected = sum(2 * n * n * dim for n in tokens)  # QK^T + AV, all heads together
    assert flops.by_operator["scaled_dot_product_attention"] == expected
    assert flops.uncounted == {}


def test_cli_writes_json_rows_and_table(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["bench", "--variants", "eomt,eomt_masked", "--sizes", "tiny", "--img-size", "64",
                 "--warmup", "1", "--iters", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["size"], r["img_size"]) for r in rows] == [("eomt", "tiny", 64),
                                                                        ("eomt_masked", "tiny", 64)]
    for r in rows:
        assert r["params"] > 0 and r["gflops"] > 0 and r["fps"] > 0
        assert r["protocol"]["warmup"] == 1 and r["protocol"]["iters"] == 2 and r["protocol"]["batch"] == 1
        assert r["protocol"]["device"] == "cpu" and r["protocol"]["timer"] == "perf_counter"
        assert r["n_iters"] == 2 and r["ms_p5"] <= r["ms_median"] <= r["ms_p95"]
        assert r["fps"] == pytest.approx(1000 / r["ms_median"]) and r["ratio_to"] == "eomt"
        assert {"patch_embed", "blocks_before_queries", "blocks_with_queries", "mask_module_and_upscaler", "other",
                "total"} \
            == set(r["breakdown_ms"])
        assert r["env"]["batch"] == 1 and r["env"]["precision"] == "fp32" and r["env"]["git_commit"]
    assert rows[0]["ratio"] == 1.0 and rows[0]["ratio_ci"] == [1.0, 1.0]
    assert rows[1]["gflops"] > rows[0]["gflops"]  # the mask module before each query block costs FLOPs
    printed = capsys.readouterr().out
    assert "protocol: device=cpu" in printed and "speed relative" in printed and "environment: torch=" in printed


def test_cli_modes_are_rows_of_the_same_rounds(tmp_path):
    """--modes: every variant in every setting, timed together; --reference picks the ratios' base."""
    out = tmp_path / "rows.json"
    assert main(["bench", "--variants", "eomt", "--sizes", "tiny", "--img-size", "32", "--warmup", "1",
                 "--iters", "2", "--modes", "eager,bf16", "--reference", "eomt:bf16", "--batch", "2",
                 "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["env"]["precision"]) for r in rows] == [("eager", "fp32"), ("bf16", "bf16")]
    assert all(r["ratio_to"] == "eomt:bf16" and r["env"]["threads"] == 1 and r["env"]["batch"] == 2
               and r["n_iters"] == 2 for r in rows)
    assert rows[1]["ratio"] == 1.0
    assert rows[0]["fps"] / rows[1]["fps"] == pytest.approx(rows[0]["ratio"])


def test_cli_no_fps(tmp_path):
    out = tmp_path / "rows.json"
    assert main(["bench", "--sizes", "tiny", "--img-size", "32", "--no-fps", "--json", str(out)]) == 0
    assert all(r["fps"] is None for r in json.loads(out.read_text()))


@pytest.mark.parametrize("argv, message", [
    (["--variants", "eomt_huge"], "unknown variant 'eomt_huge'"),
    (["--sizes", "XL"], "unknown model size 'XL'"),
    (["--img-size", "650"], "650 is not divisible by the patch size 16"),
    (["--set", "model.num_querys=3"], "unknown config key 'model.num_querys'"),
    (["--set", "bench.iters=many"], "'bench.iters' (from --set) must be int"),
    (["--reference", "sfp_m2f"], "'bench.reference' (from --reference): reference 'sfp_m2f' names no variant"),
    (["--modes", "eager,eager"], "'bench.modes' (from --modes): modes ['eager', 'eager'] names an entry twice"),
    (["--threads", "0"], "'bench.threads' (from --threads): threads must be >= 1"),
])
def test_cli_bad_input_one_line(argv, message, capsys):
    assert main(["bench", "--no-fps"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_end_to_end_scope_times_pre_and_post_processing(monkeypatch):
    """What the timed region holds with scope end_to_end: the padded pre-processing + forward and the
    panoptic merge of every image of the batch run between the two clock reads of each timed iteration."""
    from study.bench import speed, timing
    from study.bench.protocol import SpeedProtocol
    from study.eval import inference, postprocess

    log = []
    real_run, real_merge = inference.run_padded, postprocess.panoptic_merge
    monkeypatch.setattr(timing, "_clock", lambda: log.append("clock") or float(len(log)))
    monkeypatch.setattr(inference, "run_padded", lambda *a, **k: log.append("pre+forward") or real_run(*a, **k))
    monkeypatch.setattr(postprocess, "panoptic_merge", lambda *a, **k: log.append("merge") or real_merge(*a, **k))
    model = build_model(load_config(None, ["model.size=tiny", "model.img_size=64", "model.num_queries=5",
                                           "model.num_classes=3"]).model)
    p = SpeedProtocol(device="cpu", warmup=0, iters=2, scope="end_to_end", batch=2)
    timing.time_rounds([speed.build_entry("e2e", model, 64, p)], torch.device("cpu"), p.warmup, p.iters)
    assert log == ["clock", "pre+forward", "merge", "merge", "clock"] * 2


def test_flops_by_component_explain_each_table1_step():
    """The per-component split sums to the total, and consecutive Table 1 rows differ only in the components
    their step replaces (docs/paper.md section 2): the FLOP side of 'the table is the ablation'."""
    rows = {}
    for variant in ("vit_adapter_m2f", "sfp_m2f", "sfp_no_pixel_decoder", "single_scale", "eomt_masked", "eomt"):
        model = build_model(load_config(None, [f"model.variant={variant}", "model.size=tiny",
                                               "model.img_size=64"]).model)
        flops = count_flops(model, 64)
        split = flops.by_component
        assert set(split) == set(model.components()) | {"other"}
        assert sum(split.values()) == flops.total
        assert 0 <= split["other"] <= 0.01 * flops.total  # every module that computes belongs to a component
        rows[variant] = split
    r0, r1, r2, r3 = (rows[v] for v in ("vit_adapter_m2f", "sfp_m2f", "sfp_no_pixel_decoder", "single_scale"))
    # (1) the adapter becomes the pyramid; the ViT's blocks, the pixel decoder and the decoder are unchanged
    assert r0["pixel_decoder"] == r1["pixel_decoder"]
    # the same ViT blocks; the pyramid reads the final LayerNorm's output, the adapter does not (fvcore: 5 per
    # element of the 16 patch + 5 prefix tokens, 64 wide)
    assert r1["backbone"] - r0["backbone"] == 5 * (16 + 5) * 64
    assert r0["decoder"] == r1["decoder"] and "adapter" in r0 and "pyramid" in r1
    # (2) the pixel decoder becomes plain projections; nothing else changes
    assert (r1["backbone"], r1["pyramid"], r1["decoder"]) == (r2["backbone"], r2["pyramid"], r2["decoder"])
    assert r2["projection"] < r1["pixel_decoder"]
    # (3) no F8 / F32: a cheaper pyramid and decoder, the same ViT
    assert r3["backbone"] == r2["backbone"] and r3["pyramid"] < r2["pyramid"] and r3["decoder"] < r2["decoder"]
    # (5) EoMT without masking at inference: the mask module runs once instead of before every query block
    assert rows["eomt"]["mask_module_and_upscaler"] < rows["eomt_masked"]["mask_module_and_upscaler"]
    assert rows["eomt"]["blocks_with_queries"] == rows["eomt_masked"]["blocks_with_queries"]


def test_printed_gflops_are_the_counts_own_rounding():
    """The table prints each count rounded once: row 0 at S 640 counts 166.049 GFLOPs, which reads 166.0 (a
    row rounded to 2 decimals first read 166.05 and printed 166.1)."""
    from study.bench.run import _count_row, format_table
    from study.config import load_config

    row, _ = _count_row(load_config(None, ["bench.fps=false", "bench.img_size=640"]), "vit_adapter_m2f", "S")
    assert 166.04 < row["gflops"] < 166.05
    assert " 166.0 " in format_table([row])


def test_paper_numbers_beside_a_row_belong_to_its_backbone():
    """study bench prints the paper's numbers of the row's own backbone: Table 2's EVA-02 row for EVA-02,
    none for DINOv3 (the paper has no DINOv3 row), never DINOv2's beside another backbone."""
    from study.paper_numbers import paper_numbers

    assert paper_numbers("eomt", "S", 640, backbone="vit_small_patch16_dinov3") is None
    eva = paper_numbers("eomt", "L", 640, backbone="eva02_large_patch14_224.mim.m38m")
    assert eva["GFLOPs"] == 667 and paper_numbers("eomt", "L", 640)["GFLOPs"] == 669


@pytest.mark.slow
@pytest.mark.parametrize("variant,paper", [("vit_adapter_m2f", 829), ("eomt_masked", 826), ("eomt", 667)])
def test_table2_eva02_counts(variant, paper):
    """Table 2's EVA-02-L row at 640: 829 / 826 / 667 GFLOPs; ours (fast counter) 830.4 / 826.9 / 667.2."""
    from study.bench.run import _count_row
    from study.config import load_config

    cfg = load_config(None, ["bench.fps=false", "bench.img_size=640",
                             "model.backbone=eva02_large_patch14_224.mim.m38m"])
    row, _ = _count_row(cfg, variant, "L")
    assert row["gflops"] == pytest.approx(paper, rel=0.002)
    assert row["paper"]["gflops"] == paper
