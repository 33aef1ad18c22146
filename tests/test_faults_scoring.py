"""Issue 28's scoring faults, one test per mechanism: one reader of panoptic annotations for eval and score,
the PNG type named, the file's own label value named, a subset evaluation recorded apart, exports that never
replace a file the suite did not write."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import data_dir
from study.errors import UserError
from study.eval.errors import EvalInputError


@pytest.fixture
def sample(tmp_path):
    d = data_dir("coco_panoptic_sample")
    gt = json.loads((d / "panoptic_examples.json").read_text())
    gt["categories"] = json.loads((d / "panoptic_coco_categories.json").read_text())
    shutil.copytree(d / "panoptic_examples", tmp_path / "gt")
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    return tmp_path, gt


@pytest.mark.parametrize("flag", ["0", "1", 2, 1.0])
def test_crowd_flags_other_than_0_1_are_refused_by_score_and_by_evals_reader(sample, flag):
    from study.eval.pq_files import annotations_by_image, score_panoptic_files

    tmp, gt = sample
    gt["annotations"][1]["segments_info"][2]["iscrowd"] = flag
    (tmp / "bad.json").write_text(json.dumps(gt))
    messages = []
    for call in (lambda: annotations_by_image(tmp / "bad.json"),  # what study eval reads
                 lambda: score_panoptic_files(tmp / "bad.json", tmp / "gt.json", tmp / "gt", tmp / "gt")):
        with pytest.raises(EvalInputError, match=r"iscrowd .*expected 0 or 1") as e:
            call()
        messages.append(str(e.value))
    seg = gt["annotations"][1]["segments_info"][2]["id"]
    assert all(f"segment {seg}" in m for m in messages)


def test_a_listed_segment_the_png_lacks_is_one_false_negative_in_eval_and_in_score(sample):
    """score (hotcoco, panopticapi's rule: the JSON lists it, so it is ground truth) and eval's ground truth
    (the sample's drawn segments plus listed_but_not_drawn) give the same FN count."""
    from study.eval.pq import PQAccumulator, rgb_to_id
    from study.eval.pq_files import listed_but_not_drawn, score_panoptic_files

    tmp, gt = sample
    pred = {"annotations": json.loads(json.dumps(gt["annotations"]))}
    gt["annotations"][0]["segments_info"].append({"id": 4242, "category_id": 1, "iscrowd": 0, "area": 50})
    (tmp / "listed.json").write_text(json.dumps(gt))
    (tmp / "pred.json").write_text(json.dumps(pred))
    score = score_panoptic_files(tmp / "listed.json", tmp / "pred.json", tmp / "gt", tmp / "gt")
    acc = PQAccumulator(gt["categories"])  # eval: segments drawn in the PNG, then the listed ones it lacks
    for a in gt["annotations"]:
        ids = rgb_to_id(np.asarray(Image.open(tmp / "gt" / a["file_name"]).convert("RGB")))
        drawn = [s for s in a["segments_info"] if (ids == s["id"]).any()]
        segs = drawn + listed_but_not_drawn(a, [s["id"] for s in drawn])
        acc.add(ids, segs, ids, [{"id": s["id"], "category_id": s["category_id"]} for s in drawn])
    ev = acc.summary()
    assert score["per_class"][1]["fn"] == ev["per_class"][1]["fn"] == 1
    assert score["All"]["pq"] == pytest.approx(ev["All"]["pq"], abs=1e-12)


@pytest.mark.parametrize("engine", ["hotcoco", "ours"])
def test_a_16_bit_panoptic_png_is_named_as_the_wrong_png_type(sample, engine):
    from study.eval.pq_files import score_panoptic_files
    from study.eval.pq import rgb_to_id

    tmp, gt = sample
    shutil.copytree(tmp / "gt", tmp / "pred")
    name = gt["annotations"][0]["file_name"]
    ids = rgb_to_id(np.asarray(Image.open(tmp / "gt" / name).convert("RGB")))
    Image.fromarray((ids % 65536).astype(np.uint16)).save(tmp / "pred" / name)
    with pytest.raises(EvalInputError, match=r"16-bit grayscale PNG .* needs 8-bit RGB"):
        score_panoptic_files(tmp / "gt.json", tmp / "gt.json", tmp / "gt", tmp / "pred", engine=engine)


def test_a_semantic_value_is_reported_as_the_file_holds_it(tmp_path):
    from study.eval.miou import score_semantic_dirs

    for d in ("gt", "pred"):
        (tmp_path / d).mkdir()
    lab = np.full((8, 8), 5, np.uint8)
    lab[0, 0] = 200
    Image.fromarray(lab).save(tmp_path / "gt" / "a.png")
    Image.fromarray(np.full((8, 8), 5, np.uint8)).save(tmp_path / "pred" / "a.png")
    with pytest.raises(EvalInputError, match=r"value\(s\) \[200\] \(class 199\), outside 1..150") as e:
        score_semantic_dirs(tmp_path / "gt", tmp_path / "pred", 150, 255, 1, None)
    assert "[199]" not in str(e.value)  # the file's value is 200; 199 is only named as the class it would be


@pytest.mark.parametrize("kind", ["panoptic", "instance", "semantic"])
def test_export_never_replaces_a_file_the_suite_did_not_write(tmp_path, kind):
    from study.eval.export import InstanceExporter, PanopticExporter, SemanticExporter

    make = {"panoptic": lambda: PanopticExporter(tmp_path), "instance": lambda: InstanceExporter(tmp_path),
            "semantic": lambda: SemanticExporter(tmp_path)}[kind]
    theirs = {"panoptic": tmp_path / "panoptic_pred.json", "instance": tmp_path / "instances_pred.json",
              "semantic": tmp_path / "semantic_pred"}[kind]
    if kind == "semantic":
        theirs.mkdir()
        (theirs / "mine.png").write_bytes(b"user data")
    else:
        theirs.write_text("user data")
    with pytest.raises(UserError, match="did not write"):
        make()
    assert (theirs / "mine.png" if kind == "semantic" else theirs).read_bytes() == b"user data"
    shutil.rmtree(theirs) if kind == "semantic" else theirs.unlink()
    ex = make()  # absent: written, then recorded as the suite's, so a second export may replace it
    if kind == "panoptic":
        ex.add(1, "a.jpg", np.ones((4, 4), np.int64), [{"id": 1, "category_id": 1}])
        ex.finish([{"id": 1, "isthing": 1}])
    elif kind == "instance":
        ex.finish()
    else:
        ex.add(1, "a.jpg", np.ones((4, 4), np.int64))
    make()


def test_eval_of_a_subset_is_recorded_apart_from_the_runs_full_evaluation(tmp_path):
    import yaml

    from study.config import load_config
    from study.runs import RunDir
    from test_eval_run import _run, _save_weights, _tiny_config

    _, tree = _tiny_config(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_config(tmp_path / "c.yaml")
    run = RunDir.for_config(cfg)
    run.claim(cfg)
    _save_weights(cfg, run.final_weights)
    assert _run(["eval", str(run.config), "--no-progress"])[0] == 0
    full, headline = run.evaluation("panoptic", "val"), run.metrics()["eval"]
    assert full["num_images"] > 1 and full["engine"] == "ours" and full["protocol"] == "standard"
    rc, text = _run(["eval", str(run.config), "--no-progress", "--max-images", "1"])
    assert rc == 0 and "kept apart" in text
    assert run.evaluation("panoptic", "val") == full and run.metrics()["eval"] == headline  # untouched
    sub = json.loads((run.path / "eval_panoptic_val_first1.json").read_text())
    assert sub["num_images"] == 1 and sub["subset_of"] == full["num_images"]
