"""The variant table is the ablation: consecutive rows differ by exactly the intended fields; bad input gives one
readable error naming the culprit."""
from __future__ import annotations

import sys

import pytest

from conftest import require
import torch

from baselines.config import ADAPTER_SIZES, BaselineConfig, check_interactions
from baselines.variants import VARIANTS, build_variant, differences
from study.config import ConfigError
from study.models import build as registry
from study.models.build import build_model, register_variant, table1_rows, variants
from study.models.config import ModelConfig

# Table 1 (docs/paper.md section 2): what each step removes, as the fields that change.
INTENDED = {
    "sfp_m2f": {"neck": ("adapter", "pyramid")},  # (1) w/o ViT-Adapter
    "sfp_no_pixel_decoder": {"pixel_decoder": (True, False)},  # (2) w/o pixel decoder
    "single_scale": {"neck_strides": ((4, 8, 16, 32), (4, 16)), "decoder_strides": ((32, 16, 8), (16,))},  # (3)
}


def test_consecutive_rows_differ_as_intended():
    rows = [VARIANTS[v.name] for v in table1_rows() if v.name in VARIANTS]
    assert [r.row for r in rows] == [0, 1, 2, 3]
    for parent, child in zip(rows, rows[1:]):
        diff = differences(parent, child)
        print(f"row {parent.row} -> row {child.row} ({child.name}): {diff}")
        assert diff == INTENDED[child.name]
        assert 1 <= len(diff) <= 2


# Table 1 (docs/paper.md section 2): the labels as printed there, row by row.
TABLE1_LABELS = ["ViT-Adapter + Mask2Former", "w/o ViT-Adapter", "w/o Pixel decoder", "w/o Multi-scale",
                 "w/o Transformer decoder", "w/o Masking = EoMT"]


def test_table1_rows_come_from_one_registry_in_row_order():
    rows = table1_rows()
    assert [v.row for v in rows] == [0, 1, 2, 3, 4, 5]
    assert [v.label for v in rows] == TABLE1_LABELS
    assert [v.name for v in rows][:4] == list(VARIANTS) and [v.name for v in rows][4:] == ["eomt_masked", "eomt"]
    assert list(variants())[:6] == [v.name for v in rows]
    assert all(v.builder.__module__ == "baselines.variants" for v in rows[:4])  # through the entry point


def test_a_duplicate_name_or_row_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # leave the real one untouched
    build = variants()["eomt"].builder
    with pytest.raises(ValueError, match="variant 'eomt' is already registered"):
        register_variant("eomt", build)
    with pytest.raises(ValueError, match="Table 1 row 5 is already registered as 'eomt'"):
        register_variant("eomt_copy", build, row=5)
    v = register_variant("eomt_copy", build)  # outside Table 1: listed after the rows, label = name
    assert list(variants())[-1] == "eomt_copy" and v.label == "eomt_copy" and len(table1_rows()) == 6


def test_registry_is_complete_in_a_process_that_never_imports_baselines(tmp_path):
    """A submitit job or a test process reads the registry without the CLI: the entry point fills it."""
    import subprocess

    code = ("import sys\n"
            "from study.models.build import build_model, variants\n"
            "from study.models.config import ModelConfig\n"
            "assert 'baselines' not in sys.modules\n"
            "print(','.join(variants()))\n"
            "m = build_model(ModelConfig(variant='single_scale', size='tiny', img_size=32, num_classes=3,"
            " num_queries=4))\n"
            "print(type(m).__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    names, module = out.stdout.split()
    assert names.split(",")[:6] == [v.name for v in table1_rows()] and module == "baselines.model"


def small_cfg(variant="vit_adapter_m2f", img_size=32, **baseline) -> ModelConfig:
    return ModelConfig(variant=variant, size="tiny", img_size=img_size, num_classes=3, num_queries=4,
                       baseline=dict(hidden_dim=32, encoder_layers=1, encoder_ffn=32, decoder_ffn=32,
                                     decoder_heads=4, encoder_heads=4, conv_inplane=32, **baseline))


def test_unknown_variant_is_named():
    from study.errors import UserError

    with pytest.raises(UserError, match="unknown variant 'vit_adaptor_m2f'.*vit_adapter_m2f.*study.variants"
                                        ".*pip install -e"):
        build_model(ModelConfig(variant="vit_adaptor_m2f", size="tiny"))
    with pytest.raises(ValueError, match="unknown baseline variant 'eomt'"):
        build_variant("eomt", small_cfg())


def test_unknown_baseline_key_and_wrong_type():
    with pytest.raises(ConfigError, match="model.baseline.deform_head"):
        build_model(small_cfg(deform_head=4))
    with pytest.raises(ConfigError, match="model.baseline.decoder_layers"):
        build_model(small_cfg(decoder_layers="nine"))
    with pytest.raises(ConfigError, match="model.baseline.adapter_norm"):
        build_model(small_cfg(adapter_norm="sync"))


@pytest.mark.parametrize("indexes,why", [
    ([[0, 0], [1, 1], [2, 2], [3, 2]], "4-block backbone.*should start at block 3"),  # ends before it starts
    ([[0, 0], [1, 1], [2, 2], [3, 4]], "4-block backbone.*cover blocks 0..4"),  # past the last block
    ([[0, 0], [1, 1], [2, 2], [2, 3]], "4-block backbone.*should start at block 3"),  # overlap
    ([[0, 0], [2, 2], [3, 3], [3, 3]], "4-block backbone.*should start at block 1"),  # a gap
    ([[0, 0], [1, 1], [2, 2], [3]], "\\[3\\] is not a \\[first, last\\] pair"),
    ([[0, 1], [2, 3]], "has 2 interactions; ViT-Adapter needs 4"),
])
def test_interaction_indexes_must_fit_the_depth(indexes, why):
    with pytest.raises(ValueError, match=f"model.baseline.interaction_indexes.*{why}"):
        build_model(small_cfg(interaction_indexes=indexes))


def test_adapter_split_of_every_size_fits_its_depth():
    depths = {"tiny": 4, "S": 12, "B": 12, "L": 24, "g": 40}  # docs/paper.md section 5
    for size, spec in ADAPTER_SIZES.items():
        check_interactions(spec.interaction_indexes, depths[size])
    with pytest.raises(ValueError, match="does not fit a 12-block backbone"):
        BaselineConfig().adapter("L", 12, 1024)  # L's split on a 12-block ViT


def test_heads_must_divide_the_adapter_width():
    with pytest.raises(ValueError, match="not divisible by model.baseline.deform_heads 5"):
        build_model(small_cfg(deform_heads=5))


def test_group_norm_option_and_own_split():
    model = build_model(small_cfg(img_size=64, adapter_norm="group",
                                  interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]]))
    assert len(model.adapter.interactions) == 4 and len(model.adapter.interactions[-1].extra_extractors) == 2
    assert isinstance(model.adapter.norms[0], torch.nn.GroupNorm)
    assert len(model(torch.rand(1, 3, 64, 64))) == 10  # 1/32 is 2x2: group norm of one value per group fails


def test_missing_compiled_op_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_ms_deform_attn", None)  # import now fails as if not installed
    with pytest.raises(ImportError, match="use_compiled_deform_attn.*pip install torch-ms-deform-attn"):
        build_model(small_cfg(use_compiled_deform_attn=True))


def test_compiled_op_runs_the_same_model():
    require("torch_ms_deform_attn")
    torch.manual_seed(0)
    ours = build_model(small_cfg(img_size=64)).eval()
    compiled = build_model(small_cfg(img_size=64, use_compiled_deform_attn=True)).eval()
    compiled.load_state_dict(ours.state_dict())
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images)[-1].mask_logits, ours(images)[-1].mask_logits,
                                   atol=1e-5, rtol=1e-5)


def test_compiled_op_is_counted_like_the_pytorch_form():
    require("torch_ms_deform_attn")
    from study.bench.flops import count_flops

    ours = count_flops(build_model(small_cfg(img_size=64)), 64)
    compiled = count_flops(build_model(small_cfg(img_size=64, use_compiled_deform_attn=True)), 64)
    assert compiled.by_operator["forward"] == ours.by_operator["grid_sampler"] > 0  # torch_ms_deform_attn::forward
    assert compiled.total == ours.total
