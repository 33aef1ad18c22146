"""Evaluating a run that started from another run's weights (model.init_from, Table 4) loads only its own
trained weights: the init file is not read first (it may be gone, or not fit, by the time of evaluation)."""
from __future__ import annotations

import pytest
import torch

from study.config import load_config
from study.eval.run import evaluate_run
from study.models.build import build_model


def test_evaluation_does_not_load_the_init_file(tmp_path, one_thread):
    over = ["data.dataset=synthetic", f"data.root={tmp_path / 'syn'}", "data.synthetic_image_size=64",
            "data.synthetic_train_images=1", "data.synthetic_val_images=1", f"output_dir={tmp_path / 'runs'}",
            "task=panoptic", "model.size=tiny", "model.img_size=64", "model.num_queries=5",
            "model.num_query_blocks=2"]
    probe = load_config(None, over)
    from study.data import build_dataset

    classes = build_dataset(probe.data, "val", "panoptic").info.num_classes
    init = tmp_path / "coco_run.pt"
    init.write_bytes(b"not a checkpoint: reading it would fail")
    cfg = load_config(None, over + [f"model.num_classes={classes}", f"model.init_from={init}",
                                    "model.reinit_class_head=true"])
    with pytest.raises(ValueError, match="coco_run.pt"):  # the file is read when a training starts from it
        build_model(cfg.model)
    trained = tmp_path / "final.pt"
    model = build_model(load_config(None, over + [f"model.num_classes={classes}"]).model)
    torch.save(model.state_dict(), trained)
    result = evaluate_run(cfg, weights=trained, progress=False)
    assert result["num_images"] == 1 and result["weights"] == str(trained)
