"""``study predict``: a tiny run trained here by the project's trainer, predicting a real COCO image.

The outputs are read back by the official tools (panopticapi for the panoptic PNG + JSON, pycocotools for the
instance RLE JSON), the same weights in the official EoMT and Hugging Face layouts give the same predictions,
``--compare`` puts the models' overlays side by side, and bad inputs end in one UserError naming the path.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import data_dir, oracle, require
from study.config import load_config
from study.errors import UserError
from study.predict import cli as predict_cli
from study.runs import RunDir

panopticapi_eval = oracle("panopticapi.evaluation")
mask_utils = oracle("pycocotools.mask")

# A tiny panoptic EoMT on the built-in synthetic set (3 thing and 3 stuff classes), trained for 3 steps.
TINY = ["model.size=tiny", "model.img_size=64", "model.num_classes=6", "model.num_queries=8",
        "data.dataset=synthetic", "data.synthetic_image_size=64", "data.synthetic_train_images=4",
        "data.synthetic_val_images=1", "data.batch_size=2", "train.batch_size=2", "train.num_points=256",
        "train.warmup_steps=1", "train.backbone_warmup_steps=1", "train.tensorboard=false", "train.max_steps=3"]
# Thresholds of 0 keep every query whose top class is not no-object and give every pixel to a query: a
# 3-step model's few segments are never all thresholded away, so the format checks below always see segments.
OPEN = ["--set", "eval.score_threshold=0", "--set", "eval.overlap_threshold=0", "--set", "eval.mask_threshold=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> RunDir:
    from study.train.loop import train

    root = tmp_path_factory.mktemp("predict")
    cfg = load_config(None, TINY + [f"data.root={root / 'syn'}", f"output_dir={root / 'runs'}", "name=tiny"])
    run = train(cfg, progress=False)
    assert run.status()["state"] == "finished"
    return run


@pytest.fixture(scope="module")
def coco_image():
    return data_dir("coco_panoptic_sample") / "input_images" / "000000142238.jpg"


def predict(*argv) -> int:
    parser = argparse.ArgumentParser(prog="study")
    predict_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["predict", *map(str, argv), "--no-progress"])
    return args.func(args)


def test_panoptic_overlay_and_files_read_back_with_panopticapi(trained, coco_image, tmp_path):
    rgb2id = require("panopticapi.utils").rgb2id
    out = tmp_path / "out"
    assert predict(trained.path, coco_image, "--out", out, *OPEN) == 0
    w, h = Image.open(coco_image).size
    overlay = Image.open(out / "overlay" / "000000142238.png")
    assert overlay.size == (w, h) and overlay.mode == "RGB"
    pred = json.loads((out / "panoptic_pred.json").read_text())
    ann, = pred["annotations"]
    assert ann["image_id"] == 142238 and ann["file_name"] == "000000142238.png"
    assert pred["images"] == [{"id": 142238, "file_name": coco_image.name, "height": h, "width": w}]
    ids = rgb2id(np.asarray(Image.open(out / "panoptic_pred" / ann["file_name"])))  # panopticapi's decoder
    segs = ann["segments_info"]
    assert segs and ids.shape == (h, w)
    assert sorted(np.unique(ids[ids > 0]).tolist()) == sorted(s["id"] for s in segs)
    for s in segs:
        assert s["area"] == int((ids == s["id"]).sum())
    # panopticapi's own evaluation reads the JSON and PNGs (it checks that every PNG segment is in the JSON and
    # the reverse); the prediction scored against itself is PQ 1 over the classes it holds.
    res = panopticapi_eval.pq_compute(str(out / "panoptic_pred.json"), str(out / "panoptic_pred.json"),
                                      str(out / "panoptic_pred"), str(out / "panoptic_pred"))
    assert res["All"]["pq"] == pytest.approx(1.0) and res["All"]["n"] == len({s["category_id"] for s in segs})


def test_instance_results_read_back_with_pycocotools(trained, coco_image, tmp_path):
    coco = require("pycocotools.coco")
    out = tmp_path / "out"
    # The synthetic instance set has 3 classes, the model 6: the class names come from a categories file.
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps({"categories": [{"id": i, "name": f"thing {i}", "isthing": 1} for i in range(6, 0, -1)]}))
    predict(trained.path, coco_image, "--out", out, "--set", "task=instance", "--min-score", "0", "--categories", cats)
    results = json.loads((out / "instances_pred.json").read_text())
    w, h = Image.open(coco_image).size
    assert len(results) == 8 * 6  # top_k = 100 > queries x classes: every (query, class) pair
    assert sorted({r["category_id"] for r in results}) == [1, 2, 3, 4, 5, 6]  # each class with each query
    gt = coco.COCO()
    gt.dataset = {"images": [{"id": 142238, "height": h, "width": w}], "annotations": [],
                  "categories": [{"id": i} for i in range(1, 7)]}
    gt.createIndex()
    loaded = gt.loadRes(results)  # pycocotools' reader of COCO results
    assert len(loaded.getAnnIds(imgIds=[142238])) == len(results)
    for r in results[:5]:
        m = mask_utils.decode(r["segmentation"])
        assert m.shape == (h, w) and int(m.sum()) == int(mask_utils.area(r["segmentation"]))
    assert Image.open(out / "overlay" / "000000142238.png").size == (w, h)


def test_semantic_png_holds_the_windowed_argmax(trained, coco_image, tmp_path):
    from study.eval.inference import run_windowed
    from study.eval.run import trained_model

    out = tmp_path / "out"
    predict(trained.path, coco_image, "--out", out, "--set", "task=semantic")
    labels = np.asarray(Image.open(out / "semantic_pred" / "000000142238.png"))
    image = torch.from_numpy(np.asarray(Image.open(coco_image).convert("RGB")).transpose(2, 0, 1).copy())
    cfg = load_config(trained.config, ["task=semantic"])
    logits, = run_windowed(trained_model(cfg, trained.final_weights), [image], 64)
    # the same computation: the PNG is the argmax mapped to the synthetic set's semantic ids 1..6
    assert np.array_equal(labels, logits.argmax(0).numpy() + 1)


def ours_to_official(sd: dict, num_classes: int) -> dict:
    """Our state dict under the official EoMT code's names (tests/test_eomt.py lists them from the official
    code), with the loss buffer the official checkpoints carry."""
    rules = [("attn_mask_probs", "network.attn_mask_probs"), ("backbone.pixel_", "network.encoder.pixel_"),
             ("backbone.vit.", "network.encoder.backbone."), ("q.", "network.q."),
             ("head.class_head.", "network.class_head."), ("head.mask_head.", "network.mask_head."),
             ("head.upscale.", "network.upscale.")]
    out = {}
    for k, v in sd.items():
        old, new = next((o, n) for o, n in rules if k.startswith(o))
        out[new + k[len(old):]] = v
    out["criterion.empty_weight"] = torch.ones(num_classes + 1)
    return out


def test_official_and_huggingface_layouts_predict_the_same(trained, coco_image, tmp_path, capsys):
    """The same tensors under three layouts load to identical state dicts, so the predictions are the same
    computation run three times: compared exactly (tolerance 0)."""
    transformers = require("transformers")
    safetensors_torch = require("safetensors.torch")
    from test_eomt import official_to_hf

    ours = torch.load(trained.final_weights, map_location="cpu", weights_only=True)
    official = ours_to_official(ours, 6)
    torch.save({"state_dict": official}, tmp_path / "official.ckpt")
    hf_cfg = transformers.EomtConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=64,
                                     patch_size=16, num_queries=8, num_blocks=2, num_labels=6,
                                     num_register_tokens=4)
    hf = transformers.EomtForUniversalSegmentation(hf_cfg)
    hf.load_state_dict(official_to_hf(official), strict=True)  # every Hugging Face name real, none left out
    safetensors_torch.save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "hf.safetensors")

    outs = {}
    for name, weights in [("ours", trained.final_weights), ("official", tmp_path / "official.ckpt"),
                          ("hf", tmp_path / "hf.safetensors")]:
        outs[name] = tmp_path / name
        capsys.readouterr()
        predict(f"{trained.config}@{weights}", coco_image, "--out", outs[name], *OPEN)
        assert f"panoptic, {weights} on " in capsys.readouterr().out  # that file was loaded, not the run's own
    ref = json.loads((outs["ours"] / "panoptic_pred.json").read_text())["annotations"]
    png = np.asarray(Image.open(outs["ours"] / "panoptic_pred" / "000000142238.png"))
    assert ref[0]["segments_info"]
    for name in ("official", "hf"):
        assert json.loads((outs[name] / "panoptic_pred.json").read_text())["annotations"] == ref, name
        assert np.array_equal(np.asarray(Image.open(outs[name] / "panoptic_pred" / "000000142238.png")), png), name


def test_compare_puts_the_models_side_by_side(trained, coco_image, tmp_path):
    out = tmp_path / "out"
    sd = torch.load(trained.final_weights, map_location="cpu", weights_only=True)
    sd["head.class_head.bias"] = sd["head.class_head.bias"] + torch.arange(7.0)  # another model's predictions
    torch.save(sd, tmp_path / "shifted.pt")
    other = tmp_path / "other.yaml"
    other.write_text(trained.config.read_text())
    predict(trained.path, coco_image, "--out", out, "--compare", f"{other}@{tmp_path / 'shifted.pt'}", *OPEN)
    a = np.asarray(Image.open(out / trained.path.name / "overlay" / "000000142238.png"))
    b = np.asarray(Image.open(out / "other-shifted" / "overlay" / "000000142238.png"))
    both = np.asarray(Image.open(out / "compare" / "000000142238.png"))
    h, w = a.shape[:2]
    bar = both.shape[0] - h
    assert bar > 0 and both.shape[1] > 2 * w and not np.array_equal(a, b)
    assert np.array_equal(both[bar:, :w], a)  # left: the first model, under its title bar
    assert np.array_equal(both[bar:, -w:], b)  # right: the compared one
    assert (both[:bar] < 128).any()  # the titles are written in the bar
    assert (out / trained.path.name / "panoptic_pred.json").is_file()
    assert (out / "other-shifted" / "panoptic_pred.json").is_file()


def test_overlay_tints_segments_and_keeps_the_rest():
    from study.predict.overlay import TINT, class_colour, draw_overlay, to_palette
    from study.predict.run import Segment

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    mask = np.zeros((240, 320), bool)
    mask[150:230, 10:150] = True
    out = draw_overlay(image, [Segment(mask, 2, 0.9)], ["a", "b", "c"])
    assert out.shape == image.shape
    colour = np.asarray(class_colour(2), np.float32)
    want = ((1 - TINT) * image[152:160, 12:40].astype(np.float32) + TINT * colour).round()
    assert np.abs(out[152:160, 12:40].astype(int) - want).max() <= 1  # inside, away from the label: tinted
    assert np.array_equal(out[20:140, 10:150], image[20:140, 10:150])  # outside, away from the legend: unchanged
    assert not np.array_equal(out[:40, -120:], image[:40, -120:])  # the legend in the top-right corner
    assert (out[150, 20:140] == 255).all()  # the outline
    colours = {class_colour(c) for c in range(20)}
    assert len(colours) == 20
    # --palette: 256 colours, the class colour exact (the swatch), the photo approximated
    small = to_palette(out, [2])
    rgb = np.asarray(small.convert("RGB"))
    swatch = (out == np.asarray(class_colour(2))).all(-1)
    assert small.mode == "P" and swatch.sum() >= 81 and (rgb[swatch] == class_colour(2)).all()
    # uniform noise is a palette's worst case: 256 colours are about 6.3 levels a channel, 40 apart, so about 10
    # off per channel on average (PIL's octree does a little worse); the sample photos are 3.3-3.9 off (docs/predict.md)
    assert np.abs(rgb.astype(int) - out).mean() < 20


def test_bad_inputs_name_the_path(trained, coco_image, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="image .*nope.jpg does not exist"):
        predict(trained.path, tmp_path / "nope.jpg", "--out", out)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(UserError, match=f"{text} is not an image"):
        predict(trained.path, text, "--out", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"folder {empty} holds no image files"):
        predict(trained.path, empty, "--out", out)
    with pytest.raises(UserError, match="runs/gone does not exist"):
        predict(tmp_path / "runs" / "gone", coco_image, "--out", out)
    with pytest.raises(UserError, match=f"{empty} is a folder without config.yaml"):
        predict(empty, coco_image, "--out", out)
    with pytest.raises(UserError, match="neither a run folder"):
        predict(coco_image, coco_image, "--out", out)


def test_an_unfinished_run_is_refused(trained, coco_image, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained.path, copy)
    RunDir(copy).write_status("interrupted", step=1)
    with pytest.raises(UserError, match=f"run {copy} is interrupted, not finished"):
        predict(copy, coco_image, "--out", tmp_path / "out")


def test_a_file_the_suite_did_not_write_is_never_replaced(trained, coco_image, tmp_path):
    out = tmp_path / "out"
    (out / "overlay").mkdir(parents=True)
    mine = out / "overlay" / "000000142238.png"
    mine.write_bytes(b"my own picture")
    with pytest.raises(UserError, match="did not write"):
        predict(trained.path, coco_image, "--out", out)
    assert mine.read_bytes() == b"my own picture"
    assert not (out / "panoptic_pred.json").exists()  # refused before any work
    mine.unlink()
    predict(trained.path, coco_image, "--out", out)
    predict(trained.path, coco_image, "--out", out, "--palette")  # its own files are replaced on a second run
    assert Image.open(mine).size == Image.open(coco_image).size and Image.open(mine).mode == "P"


def test_categories_file_is_checked_naming_it(trained, coco_image, tmp_path):
    from study.predict.models import read_categories

    with pytest.raises(UserError, match=f"categories file {tmp_path / 'none.json'} does not exist"):
        read_categories(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]))
    with pytest.raises(UserError, match="lists an id twice"):
        read_categories(bad)
    bad.write_text(json.dumps({"categories": [{"id": "x", "name": "a"}]}))
    with pytest.raises(UserError, match="entry 0 needs an integer 'id'"):
        read_categories(bad)
    cats = data_dir("coco_panoptic_sample") / "panoptic_coco_categories.json"
    coco = read_categories(cats)
    assert len(coco) == 133 and sum(c["isthing"] for c in coco) == 80  # panopticapi's file, sorted by id
    assert [c["id"] for c in coco] == sorted(c["id"] for c in coco) and coco[0]["name"] == "person"
    with pytest.raises(UserError, match="predicts 6 classes .* but categories file .* has 133"):
        predict(trained.path, coco_image, "--out", tmp_path / "out", "--categories", cats)


def test_study_command_reports_a_bad_image_in_one_line(trained, tmp_path, monkeypatch, capsys):
    """Through ``study.cli.main``, where study/cli.py lists this sub-command:
    exit 2 and one line on stderr naming the file."""
    import study.cli as study_cli

    assert predict_cli in study_cli.COMMANDS  # `study predict` is a sub-command of the installed command
    text = tmp_path / "photo.png"
    text.write_text("not a picture")
    rc = study_cli.main(["predict", str(trained.path), str(text), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"study predict: error: {text} is not an image (no image format recognised)"]
