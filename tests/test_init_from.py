"""model.init_from + model.reinit_class_head: a run starts from another run's weights with a fresh class head
for other classes (Table 4: ADE20K panoptic from COCO); any other mismatch fails naming the tensor. The
checkpoints are written by the test."""
from __future__ import annotations

import pytest
import torch

from study.config import ConfigError, load_config
from study.errors import UserError
from study.models.build import build_model
from study.models.config import ModelConfig

IMG = 64


def _cfg(variant, classes, **kw):
    return ModelConfig(variant=variant, size="tiny", img_size=IMG, num_classes=classes, num_queries=5, **kw)


@pytest.mark.parametrize("variant,head", [("eomt", "head.class_head."), ("vit_adapter_m2f", "decoder.class_head.")])
def test_new_classes_from_a_run_folder(tmp_path, variant, head, one_thread):
    torch.manual_seed(1)
    source = build_model(_cfg(variant, 5))
    source.set_mask_probs([0.0] * source.num_masked_layers)  # annealed to 0 by the end of its training
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "run" / "checkpoints" / "model_final.pt")
    torch.manual_seed(2)
    fresh = build_model(_cfg(variant, 7)).state_dict()
    torch.manual_seed(2)
    model = build_model(_cfg(variant, 7, init_from=str(tmp_path / "run"), reinit_class_head=True))
    src = source.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith(head):
            assert v.shape[0] == 8 and torch.equal(v, fresh[k]), k  # C + 1 rows, as initialised
        elif k == "attn_mask_probs":
            assert v.tolist() == [1.0] * model.num_masked_layers  # a new training anneals anew
        else:
            assert torch.equal(v, src[k]), k


def test_other_mismatches_fail_naming_the_tensor(tmp_path, one_thread):
    torch.save(build_model(_cfg("eomt", 5)).state_dict(), tmp_path / "coco.pt")
    with pytest.raises(UserError, match=r"model.init_from: .*head.class_head.weight.*set model.reinit_class_head"):
        build_model(_cfg("eomt", 7, init_from=str(tmp_path / "coco.pt")))
    with pytest.raises(UserError, match=r"model.init_from: .*q.weight: file \(5, 64\) vs model \(6, 64\)"):
        build_model(ModelConfig(variant="eomt", size="tiny", img_size=IMG, num_classes=7, num_queries=6,
                                init_from=str(tmp_path / "coco.pt"), reinit_class_head=True))
    with pytest.raises(UserError, match="is a folder without checkpoints/model_final.pt"):
        build_model(_cfg("eomt", 7, init_from=str(tmp_path), reinit_class_head=True))
    # same classes, no re-initialisation: every tensor from the file
    same = build_model(_cfg("eomt", 5, init_from=str(tmp_path / "coco.pt")))
    assert torch.equal(same.head.class_head.weight, torch.load(tmp_path / "coco.pt")["head.class_head.weight"])


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="model.reinit_class_head.*model.init_from is not set"):
        load_config(None, ["model.reinit_class_head=true"])
    with pytest.raises(ConfigError, match="model.init_from.*both set"):
        load_config(None, ["model.init_from=a.pt", "model.checkpoint=b.pt"])
