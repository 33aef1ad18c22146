"""model.mask_setting: the training settings of Tables 7 and C by name (study/models/config.py MASK_SETTINGS),
accepted by every variant (EoMT and Table 1 rows 0-3), and the trainer's annealing following them."""
from __future__ import annotations

import pytest
import torch

from study.config import ConfigError, load_config
from study.errors import UserError
from study.models.build import build_model, variants
from study.models.config import MASK_SETTINGS, ModelConfig
from study.train.config import TrainConfig
from study.train.schedules import build_mask_annealing

SETTINGS = list(MASK_SETTINGS)
VARIANTS = ["eomt", "eomt_masked", "vit_adapter_m2f", "sfp_m2f", "sfp_no_pixel_decoder", "single_scale"]


def _model(variant: str, setting: str | None):
    torch.manual_seed(0)
    return build_model(ModelConfig(variant=variant, size="tiny", img_size=64, num_classes=3, num_queries=4,
                                   mask_setting=setting))


def test_every_table1_variant_is_covered():
    assert set(VARIANTS) <= set(variants())


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_takes_every_setting(variant, setting, one_thread):
    m = _model(variant, setting)
    want = MASK_SETTINGS[setting]
    assert (m.masked_attention, m.masked_inference, m.mask_annealing) == tuple(want)
    x = torch.rand(2, 3, 64, 64)
    m.train()
    sets = m(x)
    # Training: with masked attention every masked layer adds an intermediate (supervised) set; never masked:
    # the final set only, so the loss supervises no intermediate prediction.
    assert len(sets) == (m.num_masked_layers + 1 if want.attention else 1)
    m.eval()
    with torch.no_grad():
        assert len(m(x)) == (m.num_masked_layers + 1 if want.inference else 1)


@pytest.mark.parametrize("variant,default", [("eomt", (True, False, None)), ("eomt_masked", (True, True, None)),
                                             ("vit_adapter_m2f", (True, True, None))])
def test_without_a_setting_the_variant_decides(variant, default, one_thread):
    m = _model(variant, None)
    assert (m.masked_attention, m.masked_inference, m.mask_annealing) == default


def test_contradicting_keys_are_refused_naming_them():
    with pytest.raises(ConfigError, match="model.mask_setting.*masked_inference"):
        load_config(None, ["model.mask_setting=masked_train_only", "model.masked_inference=true"])
    with pytest.raises(ConfigError, match="model.mask_setting.*masked_attention"):
        load_config(None, ["model.mask_setting=annealed", "model.masked_attention=false"])
    with pytest.raises(ConfigError, match="model.mask_setting"):
        load_config(None, ["model.mask_setting=sometimes"])
    cfg = load_config(None, ["model.mask_setting=masked", "model.masked_inference=true"])  # agreeing: fine
    assert cfg.model.mask_setting == "masked"


@pytest.mark.parametrize("setting,anneals", [("masked", False), ("masked_train_only", False), ("unmasked", False),
                                             ("annealed", True)])
def test_the_trainer_anneals_exactly_the_annealed_setting(setting, anneals, one_thread):
    m = _model("eomt", setting)
    ann = build_mask_annealing(TrainConfig(), 600, m.num_masked_layers, m.masked_inference, m.mask_annealing)
    assert (ann is not None) == anneals
    if anneals:
        assert ann.apply(m, 599) == [0.0] * m.num_masked_layers


def test_a_schedule_built_without_the_model_keeps_masks_of_a_non_annealed_setting(one_thread):
    # The trainer's older call (no model_annealing) builds a schedule for masked_train_only, whose masked
    # inference is off; the model's setting still keeps P_mask = 1 (Table 7 "Masking / w/o Masking").
    m = _model("eomt", "masked_train_only")
    ann = build_mask_annealing(TrainConfig(), 600, m.num_masked_layers, m.masked_inference)
    assert ann is not None
    assert ann.apply(m, 599) == [1.0] * m.num_masked_layers
    assert m.attn_mask_probs.tolist() == [1.0] * m.num_masked_layers
    assert ann.apply(_model("eomt", None), 599) == [0.0] * m.num_masked_layers  # the default still anneals
    explicit = build_mask_annealing(TrainConfig(mask_annealing=True), 600, m.num_masked_layers, False)
    with pytest.raises(UserError, match="train.mask_annealing=true contradicts model.mask_setting"):
        explicit.apply(m, 10)
    with pytest.raises(UserError, match="train.mask_annealing=true contradicts model.mask_setting"):
        build_mask_annealing(TrainConfig(mask_annealing=True), 600, 4, False, model_annealing=False)
