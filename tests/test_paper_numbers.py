"""The paper's numbers (study/paper_numbers.csv): well-formed, unique rows, real configuration keys, and the
published counts other parts of the suite cite (docs/paper.md sections 2-4)."""
from __future__ import annotations

import csv

import pytest

from study import paper_numbers as pn
from study.errors import UserError


def test_every_line_has_every_column_and_rows_are_unique():
    path = pn.resources.files("study").joinpath("paper_numbers.csv")
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    widths = {len(r) for r in csv.reader(lines)}
    assert widths == {len(lines[0].split(","))}  # a missing comma would shift every later column
    rows = pn.paper_rows()
    assert not rows.duplicated(list(pn.ROW_ID)).any()
    assert sorted(rows["table"].unique()) == sorted(pn.TABLES + pn.REFERENCE_TABLES)
    # the rows the suite can configure are different models within each table
    for t in pn.TABLES + pn.REFERENCE_TABLES:
        keys = [str(pn.row_keys(r)) for _, r in pn.paper_table(t).iterrows() if r["needs"] == ""]
        assert len(keys) == len(set(keys)), t


def test_config_columns_are_configuration_keys():
    pn.check_config_keys()
    assert {"model.variant", "model.size", "model.img_size", "data.dataset", "train.mask_annealing"} <= \
        set(pn.config_columns())


@pytest.mark.parametrize("variant,size,img,params,gflops,fps,pq", [
    ("eomt", "L", 640, 316, 669, 128, 56.0),  # Table 1 row 5 (README: EoMT-L 640 316M / 669 GFLOPs)
    ("sfp_m2f", "L", 640, 342, 700, 36, 56.7),  # Table 1 row 1
    ("vit_adapter_m2f", "L", 640, 349, 830, 29, 57.1),  # Table 1 row 0
    ("eomt", "S", 640, 24, 68, 330, 44.7),  # Table 3
    ("eomt_masked", "g", 640, 1164, 2689, 35, 57.2),  # Table 3
    ("eomt", "L", 1280, 322, 4146, 30, 58.3),  # the 1280 rows
])
def test_known_rows(variant, size, img, params, gflops, fps, pq):
    p = pn.paper_numbers(variant, size, img)
    assert (p["params_M"], p["GFLOPs"], p["FPS"], p["PQ"]) == (params, gflops, fps, pq)


def test_lookup_resolves_defaults_like_the_builder():
    coco = {"data.dataset": "coco_panoptic"}
    # L2 = 4 is ViT-L's default: the same row whether set or not (Table D)
    assert pn.lookup({**coco, "model.num_query_blocks": 4}, "D")["row"] == "4"
    assert pn.lookup(coco, "D")["row"] == "4"
    assert pn.lookup({**coco, "model.num_query_blocks": 2}, "D")["GFLOPs"] == 660
    # Table 7: masking off, masked without annealing, annealed (explicitly or by default)
    assert pn.lookup({**coco, "model.masked_attention": False}, "7")["PQ"] == 53.2
    assert pn.lookup({**coco, "train.mask_annealing": False}, "7")["PQ"] == 27.4
    assert pn.lookup({**coco, "train.mask_annealing": True}, "7")["PQ"] == 56.0
    # Table C: the annealed baseline
    assert pn.lookup({**coco, "model.variant": "vit_adapter_m2f", "model.masked_inference": False,
                      "train.mask_annealing": True}, "C")["PQ"] == 56.8
    # Table 2: the backbone makes the row; Table 5 and 6: the setting
    assert pn.lookup({**coco, "model.backbone": "eva02_large_patch14_224.mim.m38m"}, "2")["FPS"] == 77
    assert pn.lookup({"task": "semantic", "data.dataset": "cityscapes", "model.img_size": 1024,
                      "model.num_classes": 19, "model.num_queries": 100}, "5")["mIoU"] == 84.2
    assert pn.paper_numbers("eomt", "L", 1280, "instance")["AP"] == 48.8
    assert pn.paper_numbers("eomt", "tiny", 128) is None and pn.lookup({"data.dataset": "synthetic"}) is None
    with pytest.raises(UserError, match="unknown table 'Z'"):
        pn.paper_table("Z")


@pytest.mark.parametrize("setting,variant,table,pq", [
    ("masked", "eomt", "7", 56.2), ("masked_train_only", "eomt", "7", 27.4), ("unmasked", "eomt", "7", 53.2),
    ("annealed", "eomt", "7", 56.0), ("masked", "vit_adapter_m2f", "C", 57.1),
    ("unmasked", "vit_adapter_m2f", "C", 54.0), ("annealed", "vit_adapter_m2f", "C", 56.8)])
def test_table7_and_C_rows_are_the_named_mask_settings(setting, variant, table, pq):
    coco = {"data.dataset": "coco_panoptic", "model.variant": variant}
    named = pn.lookup({**coco, "model.mask_setting": setting}, table)
    assert named["PQ"] == pq
    # the same row as the keys the setting stands for (study/models/config.py MASK_SETTINGS)
    from study.models.config import MASK_SETTINGS

    m = MASK_SETTINGS[setting]
    keyed = {**coco, "model.masked_attention": m.attention, "train.mask_annealing": m.annealing}
    if m.attention:
        keyed["model.masked_inference"] = m.inference
    assert pn.lookup(keyed, table)["row"] == named["row"]
    assert pn.run_keys({**coco, "model.mask_setting": setting})["model.mask_setting"] == setting


def test_eomt_masked_is_eomt_with_the_masked_setting():
    coco = {"data.dataset": "coco_panoptic"}
    assert pn.run_keys({**coco, "model.variant": "eomt_masked"}) == \
        pn.run_keys({**coco, "model.variant": "eomt", "model.mask_setting": "masked"})
    assert pn.lookup({**coco, "model.variant": "eomt_masked"}, "1")["row"] == "w/o Transformer decoder"
    assert pn.run_keys({**coco, "model.masked_inference": True, "train.mask_annealing": True})[
        "model.mask_setting"] == "custom"


def test_dinov3_zoo_rows_are_reference_rows_not_the_papers():
    """The official model zoo's EoMT-DINOv3 numbers (issue 13) are kept apart from the paper's tables."""
    zoo = pn.paper_table("zoo-dinov3")
    dinov3_l = {"data.dataset": "coco_panoptic", "model.backbone": "vit_large_patch16_dinov3"}
    assert pn.lookup(dinov3_l, "zoo-dinov3")["PQ"] == 56.8
    assert pn.lookup({**dinov3_l, "model.img_size": 1280}, "zoo-dinov3")["PQ"] == 58.9
    assert pn.lookup({**dinov3_l, "model.size": "S", "model.backbone": "vit_small_patch16_dinov3"},
                     "zoo-dinov3")["PQ"] == 47.2
    assert pn.lookup(dinov3_l) is None  # never found as a paper number
    assert pn.paper_numbers("eomt", "L", 1280, backbone="vit_large_patch16_dinov3") is None
    assert pn.paper_numbers("eomt", "L", 1280, backbone="vit_large_patch14_reg4_dinov2")["GFLOPs"] == 4146
    assert all("not the paper" in n for n in zoo["note"])
    assert sorted(zoo["PQ"].dropna()) == [47.2, 53.1, 56.8, 58.9]
    assert sorted(zoo["AP"].dropna()) == [45.9, 49.9] and zoo["mIoU"].dropna().tolist() == [59.5]
