"""The evaluation loop end to end on the real samples, its exports re-scored by the official tools, and the
``study score`` / ``study eval`` commands.

An oracle model (it predicts each sample's ground truth through the same resize/pad/crop geometry as the
protocols) makes the scores high and known; the exported files must give the same numbers in panopticapi,
pycocotools and the semantic folder scorer as the loop reported.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import data_dir, require
from study.data import build_dataset
from study.data.config import DataConfig
from study.eval import cli as eval_cli
from study.eval.config import EvalConfig
from study.eval.inference import window_crops
from study.eval.run import evaluate
from study.models.contract import PredictionSet

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2


class Oracle(nn.Module):
    """Predicts the GT segments of ``samples`` (in order), one query each, extra queries no-object."""

    masked_inference = False

    def __init__(self, samples, num_classes, size, windowed=False, queries=None):
        super().__init__()
        self.num_classes, self.size = num_classes, size
        self.q = queries or max(len(s.labels) for s in samples) + 2
        self.queue = []  # per model input: (masks (N, S, S) in [0, 1], labels (N,))
        for s in samples:
            m = s.masks.float()
            if windowed:  # one entry per crop, as the windowed protocol cuts them
                crops, _, _ = window_crops(m, size)
                self.queue.extend((c, s.labels) for c in crops)
            else:  # resize longer side, pad bottom/right
                h, w = m.shape[-2:]
                f = size / max(h, w)
                nh, nw = round(h * f), round(w * f)
                pad = torch.zeros(len(m), size, size)
                pad[:, :nh, :nw] = F.interpolate(m[None], (nh, nw), mode="bilinear", align_corners=False)[0]
                self.queue.append((pad, s.labels))

    def forward(self, images):
        b = images.shape[0]
        masks = torch.full((b, self.q, self.size // 4, self.size // 4), -20.0)
        classes = torch.zeros(b, self.q, self.num_classes + 1)
        classes[..., -1] = 20.0  # no-object by default
        for i in range(b):
            m, labels = self.queue.pop(0)
            small = F.interpolate(m[None], (self.size // 4,) * 2, mode="bilinear", align_corners=False)[0]
            n = len(labels)
            masks[i, :n] = (small - 0.5) * 40
            classes[i, :n, -1] = 0.0
            classes[i, torch.arange(n), labels] = 20.0
        return [PredictionSet(masks, classes)]


def _settings(**kw):
    return EvalConfig(**kw)


def test_panoptic_loop_and_export_agree_with_panopticapi(tmp_path):
    pq_compute = require("panopticapi.evaluation").pq_compute
    root = data_dir("coco_panoptic_sample")
    ds = build_dataset(DataConfig(dataset="coco_panoptic", root=str(root), image_dir="input_images",
                                  ann_file="panoptic_examples.json", ann_dir="panoptic_examples"), "val", "panoptic")
    model = Oracle([ds[i] for i in range(len(ds))], ds.info.num_classes, 320)
    out = evaluate(model, ds, "panoptic", _settings(batch_size=2, export_dir=str(tmp_path)), 320, progress=False)
    assert out["All"]["pq"] > 0.85 and out["num_images"] == 2
    gt = json.loads((root / "panoptic_examples.json").read_text())
    gt["categories"] = json.loads((root / "panoptic_coco_categories.json").read_text())
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = pq_compute(str(tmp_path / "gt.json"), out["exported"], str(root / "panoptic_examples"),
                            str(tmp_path / "panoptic_pred"))
    for g in ("All", "Things", "Stuff"):
        assert abs(out[g]["pq"] - theirs[g]["pq"]) < 1e-9 and out[g]["n"] == theirs[g]["n"]
    for cid, r in theirs["per_class"].items():
        assert abs(out["per_class"][cid]["pq"] - r["pq"]) < 1e-9


def test_instance_loop_and_export_agree_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root = data_dir("coco_mini")
    ds = build_dataset(DataConfig(dataset="coco_instance", root=str(root)), "val", "instance")
    n = 4
    model = Oracle([ds[i] for i in range(n)], ds.info.num_classes, 320)
    out = evaluate(model, ds, "instance", _settings(max_images=n, export_dir=str(tmp_path)), 320, progress=False)
    assert out["ground_truth"].endswith("instances_val2017.json") and out["AP"] > 0.5 and len(out["stats"]) == 12
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "annotations" / "instances_val2017.json"))
        ev = COCOeval(coco, coco.loadRes(out["exported"]), "segm")
        ev.params.imgIds = [ds[i].image_id for i in range(n)]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert np.array_equal(out["stats"], ev.stats)
    results = json.loads(open(out["exported"]).read())
    per_image = {}
    for r in results:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert max(per_image.values()) <= 100  # docs/paper.md section 7: top 100 per image


def test_semantic_loop_and_export_agree_with_folder_scorer(tmp_path):
    from study.eval.miou import score_semantic_dirs

    root = data_dir("ade20k_sample")
    ds = build_dataset(DataConfig(dataset="ade20k", root=str(root), image_dir="images", ann_dir="annotations"),
                       "val", "semantic")
    model = Oracle([ds[i] for i in range(len(ds))], ds.info.num_classes, 128, windowed=True)
    out = evaluate(model, ds, "semantic", _settings(batch_size=2, export_dir=str(tmp_path)), 128, progress=False)
    assert out["miou"] > 0.7 and out["num_classes_present"] >= 15
    again = score_semantic_dirs(root / "annotations", out["exported"], 150, label_offset=1)
    assert again["miou"] == out["miou"] and again["miou_all_classes"] == out["miou_all_classes"]


def test_model_dataset_class_mismatch_is_readable():
    root = data_dir("ade20k_sample")
    ds = build_dataset(DataConfig(dataset="ade20k", root=str(root), image_dir="images", ann_dir="annotations"),
                       "val", "semantic")
    model = Oracle([ds[0]], 7, 64, windowed=True)
    with pytest.raises(ValueError, match="7 classes.*150"):
        evaluate(model, ds, "semantic", _settings(), 64, progress=False)


# ------------------------------------------------------------------------------------------- commands


def _run(argv):
    parser = argparse.ArgumentParser(prog="study")
    eval_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = args.func(args)
    return rc, buf.getvalue()


def test_score_commands_write_json(tmp_path):
    pan = data_dir("coco_panoptic_sample")
    gt = json.loads((pan / "panoptic_examples.json").read_text())
    gt["categories"] = json.loads((pan / "panoptic_coco_categories.json").read_text())
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    rc, text = _run(["score", "panoptic", "--gt-json", str(tmp_path / "gt.json"), "--gt-dir",
                     str(pan / "panoptic_examples"), "--pred-json", str(tmp_path / "gt.json"), "--pred-dir",
                     str(pan / "panoptic_examples"), "--json", str(tmp_path / "pq.json")])
    res = json.loads((tmp_path / "pq.json").read_text())
    assert rc == 0 and res["All"]["pq"] == 1.0 and res["All"]["n"] == 8 and "person" in text
    # A GT JSON without categories needs them from a separate file: --categories.
    bare = {k: v for k, v in gt.items() if k != "categories"}
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    argv = ["score", "panoptic", "--gt-json", str(tmp_path / "bare.json"), "--gt-dir", str(pan / "panoptic_examples"),
            "--pred-json", str(tmp_path / "bare.json"), "--pred-dir", str(pan / "panoptic_examples"), "--no-per-class"]
    rc, text = _run(argv + ["--categories", str(pan / "panoptic_coco_categories.json")])
    assert rc == 0 and "All       | 100.00" in text
    with pytest.raises(ValueError, match="no 'categories'"):
        _run(argv)

    det = pan / "panoptic_coco_detection_format.json"
    from study.eval.coco_ap import results_from_ground_truth
    (tmp_path / "res.json").write_text(json.dumps(results_from_ground_truth(json.loads(det.read_text()))))
    rc, text = _run(["score", "instance", "--gt-json", str(det), "--pred-json", str(tmp_path / "res.json"),
                     "--json", str(tmp_path / "ap.json")])
    res = json.loads((tmp_path / "ap.json").read_text())
    assert len(res["stats"]) == 12 and res["stats"][0] == pytest.approx(1.0)

    ade = data_dir("ade20k_sample") / "annotations"
    rc, text = _run(["score", "semantic", "--gt-dir", str(ade), "--pred-dir", str(ade), "--num-classes", "150",
                     "--label-offset", "1", "--average", "all", "--json", str(tmp_path / "miou.json")])
    res = json.loads((tmp_path / "miou.json").read_text())
    assert res["miou"] == 1.0 and res["miou_all_classes"] == pytest.approx(0.1) and "ADE20K official" in text


def _tiny_config(tmp_path):
    data = dict(dataset="synthetic", root=str(tmp_path / "syn"), synthetic_image_size=64,
                synthetic_train_images=1, synthetic_val_images=2)
    ds = build_dataset(DataConfig(**data), "val", "panoptic")
    return data, {"task": "panoptic", "data": data, "output_dir": str(tmp_path / "runs"),
                  "model": {"size": "tiny", "img_size": 64, "num_classes": ds.info.num_classes, "num_queries": 5,
                            "num_query_blocks": 2}}


def _save_weights(cfg, path):
    """Weights of the configuration's model (untrained: the eval command only needs a checkpoint file)."""
    from study.models.build import build_model

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_model(cfg.model).state_dict(), path)


def test_eval_command_on_synthetic_data_with_tiny_eomt(tmp_path):
    import yaml

    from study.config import load_config

    data, cfg = _tiny_config(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="no trained weights to evaluate: give --checkpoint"):
        _run(["eval", str(tmp_path / "c.yaml"), "--no-progress"])  # random weights are never scored
    ckpt = tmp_path / "w.pt"
    _save_weights(load_config(tmp_path / "c.yaml"), ckpt)
    rc, text = _run(["eval", str(tmp_path / "c.yaml"), "--checkpoint", str(ckpt), "--set", "eval.batch_size=2",
                     "--no-progress", "--export", str(tmp_path / "exp"), "--json", str(tmp_path / "m.json")])
    res = json.loads((tmp_path / "m.json").read_text())
    assert rc == 0 and res["num_images"] == 2 and res["task"] == "panoptic" and "All" in res
    assert res["settings"]["export_dir"] == str(tmp_path / "exp")  # the flag became eval.export_dir
    assert (tmp_path / "exp" / "panoptic_pred.json").is_file()
    # Semantic (windowed) with masked attention kept on at inference.
    sem = build_dataset(DataConfig(**data), "val", "semantic")
    rc, text = _run(["eval", str(tmp_path / "c.yaml"), "--checkpoint", str(ckpt), "--set", "task=semantic",
                     "--set", f"model.num_classes={sem.info.num_classes}", "--masked", "on", "--no-progress",
                     "--max-images", "1", "--json", str(tmp_path / "s.json")])
    res = json.loads((tmp_path / "s.json").read_text())
    assert rc == 0 and 0 <= res["miou"] <= 1 and "mIoU (classes present" in text
    assert res["num_images"] == 1 and res["settings"]["masked"] is True
    with pytest.raises(ValueError, match="does not exist"):
        _run(["eval", str(tmp_path / "c.yaml"), "--checkpoint", str(tmp_path / "nope.pt")])


def test_eval_command_records_a_run_folders_evaluation_where_status_finds_it(tmp_path):
    """`study eval` of a run folder's weights writes eval_<task>_<split>.json and metrics.json's eval there,
    in the launcher's format: the results table shows it and the run's eval step counts as done."""
    from study.config import load_config
    from study.launch.collect import collect
    from study.runs import RunDir

    _, tree = _tiny_config(tmp_path)
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_config(tmp_path / "c.yaml")
    run = RunDir.for_config(cfg)
    run.claim(cfg)
    _save_weights(cfg, run.final_weights)
    assert run.pending_steps(["eval"]) == ["eval"]
    rc, text = _run(["eval", str(run.config), "--no-progress"])  # the run folder's own weights
    assert rc == 0 and "recorded in" in text
    full = run.evaluation("panoptic", "val")
    assert "per_class" in full and full["weights"] == str(run.final_weights)
    assert run.metrics()["eval"]["All"] == full["All"] and "per_class" not in run.metrics()["eval"]
    assert run.pending_steps(["eval"]) == []  # same settings as the launcher's eval step
    row = collect(tmp_path / "runs").iloc[0]
    assert row["PQ"] == pytest.approx(100 * full["All"]["pq"])
    # another configuration's evaluation is not written into this folder
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**tree, "model": {**tree["model"], "num_queries": 6}}))
    with pytest.raises(ValueError, match="belongs to run folder .* of another configuration"):
        _run(["eval", str(other), "--checkpoint", str(run.final_weights), "--no-progress"])


def test_study_command_reports_bad_input_in_one_line(tmp_path, monkeypatch, capsys):
    """Through ``study.cli.main`` (with this module registered): exit 2 and one line naming the image."""
    import study.cli as study_cli
    pan = data_dir("coco_panoptic_sample")
    gt = json.loads((pan / "panoptic_examples.json").read_text())
    gt["categories"] = json.loads((pan / "panoptic_coco_categories.json").read_text())
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": gt["annotations"][:1]}))
    rc = study_cli.main(["score", "panoptic", "--gt-json", str(tmp_path / "gt.json"), "--gt-dir",
                         str(pan / "panoptic_examples"), "--pred-json", str(tmp_path / "pred.json"),
                         "--pred-dir", str(pan / "panoptic_examples")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "000000439180" in err and "no prediction" in err


class TinySet(torch.utils.data.Dataset):
    """Two in-memory images with rectangles: things (ids 5, 9) and one stuff class (id 20), one crowd."""

    def __init__(self):
        from study.data.types import DatasetInfo, Sample

        self.info = DatasetInfo(name="tiny", num_classes=3, class_names=["a", "b", "ground"],
                                category_ids=[5, 9, 20], is_thing=[True, True, False])
        self.samples = []
        for k, (h, w) in enumerate([(48, 64), (64, 40)]):
            masks = torch.zeros(4, h, w, dtype=torch.bool)
            masks[0, 4:20, 4:24] = True
            masks[1, 24:40, 8:30] = True
            masks[2, 40:, :] = True
            masks[3, 2:10, 30:38] = True  # a crowd region of class a
            masks[2] &= ~(masks[0] | masks[1] | masks[3])
            image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
            self.samples.append(Sample(image=image, masks=masks, labels=torch.tensor([0, 1, 2, 0]),
                                       is_crowd=torch.tensor([False, False, False, True]), image_id=k + 1,
                                       file_name=f"img{k}.jpg", segment_ids=torch.tensor([11, 12, 13, 14])))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_loop_on_an_in_memory_dataset(task, tmp_path):
    ds = TinySet()
    keep = [0, 1, 2]  # the oracle predicts the non-crowd segments only
    from study.data.types import Sample

    visible = [Sample(image=s.image, masks=s.masks[keep], labels=s.labels[keep], is_crowd=s.is_crowd[keep])
               for s in ds.samples]
    model = Oracle(visible, 3, 64, windowed=task == "semantic")
    out = evaluate(model, ds, task, _settings(batch_size=2, export_dir=str(tmp_path)), 64, progress=False)
    if task == "panoptic":
        assert out["All"]["pq"] > 0.9 and out["All"]["n"] == 3 and out["per_class"][5]["fp"] == 0
        pred = json.loads((tmp_path / "panoptic_pred.json").read_text())
        assert {s["category_id"] for a in pred["annotations"] for s in a["segments_info"]} == {5, 9, 20}
    elif task == "instance":
        assert out["ground_truth"] == "sample masks" and out["AP50"] == pytest.approx(1.0)
        res = json.loads((tmp_path / "instances_pred.json").read_text())
        assert len(res) == 2 * model.q * 3  # fewer than 100 (query, class) pairs: every pair is kept
        assert {r["category_id"] for r in res} == {5, 9, 20}  # dataset ids, not contiguous ones
    else:
        assert out["miou"] > 0.9
        from PIL import Image
        assert set(np.unique(np.asarray(Image.open(tmp_path / "semantic_pred" / "img0.png")))) <= {5, 9, 20}


# --------------------------------------------------------------------------- batched, overlapped evaluation


class PerImage(nn.Module):
    """Tiny EoMT run image by image inside each batch it is given, so that its numbers do not depend on the
    batch size (a batched CPU matmul may round differently, ~1e-6, from one of a single image: that is the
    BLAS library's, not the loop's); records the batch sizes the loop gave it."""

    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes, self.masked_inference = model, model.num_classes, model.masked_inference
        self.batches = []

    def forward(self, images):
        self.batches.append(images.shape[0])
        outs = [self.model(images[i:i + 1])[-1] for i in range(images.shape[0])]
        return [PredictionSet(torch.cat([o.mask_logits for o in outs]), torch.cat([o.class_logits for o in outs]))]


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same(a, b):
    """Equal results, NaN equal to NaN (classes without GT), pycocotools' printed summary (timings) aside."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a if k != "summary")
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return a == b


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_batched_overlapped_evaluation_equals_batch_one(task, tmp_path):
    """eval.batch_size 3 with 2 DataLoader workers and overlapped post-processing gives the same metrics and
    byte-identical exports as one image at a time in one thread, on real COCO images with tiny EoMT."""
    from study.config import load_config
    from study.models.build import build_model

    ds = build_dataset(DataConfig(dataset="coco_instance", root=str(data_dir("coco_mini"))), "val", "instance")
    model = build_model(load_config(None, ["model.size=tiny", "model.img_size=96", "model.num_classes=80",
                                           "model.num_queries=16", "model.num_query_blocks=2"]).model).eval()
    # Thresholds at 0 so that the untrained model's queries make segments (the paper's would drop them all).
    common = dict(max_images=5, score_threshold=0.0, overlap_threshold=0.0)
    one = evaluate(PerImage(model), ds, task, _settings(**common, batch_size=1, overlap=False,
                                                        export_dir=str(tmp_path / "one")), 96, progress=False)
    wrapped = PerImage(model)
    many = evaluate(wrapped, ds, task, _settings(**common, batch_size=3, num_workers=2, query_chunk=8,
                                                 export_dir=str(tmp_path / "many")), 96, progress=False)
    if task == "semantic":  # crops per forward; every 96-wide crop of 5 images, 3 at a time
        assert max(wrapped.batches) == 3 and sum(wrapped.batches) > 5
    else:
        assert wrapped.batches == [3, 2]
    one.pop("exported"), many.pop("exported")
    assert _same(one, many)
    files = _files(tmp_path / "one")
    assert files and files == _files(tmp_path / "many")
    if task == "panoptic":  # something was predicted, so equality says something
        assert sum(len(a["segments_info"]) for a in json.loads(files["panoptic_pred.json"])["annotations"]) > 5


def test_an_error_while_scoring_stops_the_overlapped_loop_with_its_traceback():
    ds = TinySet()
    ds.samples = ds.samples * 4  # 8 images, one per batch

    class Broken(nn.Module):
        num_classes, masked_inference = 3, False
        calls = 0

        def forward(self, images):
            Broken.calls += 1
            b = images.shape[0]
            return [PredictionSet(torch.full((b, 2, 16, 16), float("nan")), torch.zeros(b, 2, 4))]

    import study.eval.run as run_mod

    def boom(*a, **k):
        raise KeyError("scoring failed")

    orig = run_mod.PQAccumulator.add
    run_mod.PQAccumulator.add = boom
    try:
        with pytest.raises(KeyError, match="scoring failed"):
            evaluate(Broken(), ds, "panoptic", _settings(batch_size=1, queue_size=1), 64, progress=False)
    finally:
        run_mod.PQAccumulator.add = orig
    assert Broken.calls <= 3  # stopped after the failing batch: 1 scored, at most 1 queued and 1 running


def test_eval_settings_are_checked_naming_the_key():
    from study.errors import UserError

    for kw, key in [({"query_chunk": 12}, "eval.query_chunk"), ({"num_workers": -1}, "eval.num_workers"),
                    ({"batch_size": 0}, "eval.batch_size")]:
        with pytest.raises(UserError, match=key):
            _settings(**kw).validate()
